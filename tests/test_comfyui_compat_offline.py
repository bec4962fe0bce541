"""ComfyUI compatibility without a ComfyUI: the signature check catches drift, base calls drop only
what an older ComfyUI lacks, op classes are classified, and a too-old ComfyUI gets nodes that say
what they need. (The same checks against a real ComfyUI: test_comfyui_compat.py.)"""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from vbar_loaders.loaders.comfyui.ops import LEFT_OUT, OP_NAMES, comfy_op_names, unclassified_ops
from vbar_loaders.loaders.comfyui.patcher import _call_base, make_patcher_class, signature_problems

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ModelPatcher033:
    """The signatures of the methods we override, as ComfyUI 0.33.0 declares them."""
    def model_size(self): ...
    def loaded_size(self): ...
    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False,
             full_load=False): ...
    def cleanup(self): ...
    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False): ...
    def detach(self, unpatch_all=True): ...
    def patch_weight_to_device(self, key, device_to=None, inplace_update=False,
                               return_weight=False, force_cast=False): ...


def ours_over(base):
    return make_patcher_class(types.SimpleNamespace(ModelPatcher=base))


def test_our_patcher_takes_everything_0_33_passes():
    assert signature_problems(ours_over(ModelPatcher033)) == []


def test_a_new_parameter_in_comfyui_fails_the_check():
    class Next(ModelPatcher033):
        def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False,
                             keep_pinned=False): ...

        def detach(self, unpatch_all=True, *, reason=None): ...

    problems = signature_problems(ours_over(Next))
    assert any("partially_unload" in p and "keep_pinned" in p for p in problems), problems
    assert any("detach" in p and "reason" in p for p in problems), problems


def test_the_0_3_64_override_would_have_failed():
    """What the pack shipped before: partially_unload and patch_weight_to_device without 0.33's
    parameters, i.e. the TypeError users hit."""
    base = type("Base", (), {
        "partially_unload": ModelPatcher033.partially_unload,
        "patch_weight_to_device": ModelPatcher033.patch_weight_to_device})
    old = type("Old", (base,), {
        "partially_unload": lambda self, device_to, memory_to_free=0: 0,
        "patch_weight_to_device": lambda self, key, device_to=None, inplace_update=False: None})
    problems = signature_problems(old)
    for name in ("force_patch_weights", "return_weight", "force_cast"):
        assert any(name in p for p in problems), (name, problems)


def test_moved_or_redefaulted_parameters_are_problems():
    class Base:
        def load(self, device_to=None, lowvram_model_memory=0): ...
        def detach(self, unpatch_all=True): ...

    class Ours(Base):
        def load(self, lowvram_model_memory=0, device_to=None): ...
        def detach(self, unpatch_all=False): ...

    problems = signature_problems(Ours)
    assert any("load" in p and "'device_to' is argument 1" in p for p in problems), problems
    assert any("detach" in p and "defaults" in p for p in problems), problems


def test_base_calls_drop_only_defaults_an_older_comfyui_lacks():
    seen = []

    class Old:
        def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
            seen.append((key, device_to, inplace_update))
            return "patched"

    old = Old()
    assert _call_base(old.patch_weight_to_device, "k", "dev", False, return_weight=False,
                      force_cast=False) == "patched"
    assert seen == [("k", "dev", False)]
    with pytest.raises(TypeError, match="return_weight"):
        _call_base(old.patch_weight_to_device, "k", return_weight=True)


def test_op_classes_are_classified_and_new_ones_reported():
    class Ops:
        class Linear(torch.nn.Linear): ...
        class RMSNorm(torch.nn.RMSNorm): ...
        class BatchNorm2d(torch.nn.BatchNorm2d): ...
        class BatchNorm3d(torch.nn.BatchNorm3d): ...
        not_a_layer = 3

    assert comfy_op_names(Ops) == {"Linear", "RMSNorm", "BatchNorm2d", "BatchNorm3d"}
    assert unclassified_ops(Ops) == ["BatchNorm3d"]
    assert not set(OP_NAMES) & set(LEFT_OUT)


# --- the version floor ----------------------------------------------------------------------------
def test_versions_parse():
    from vbar_loaders import nodes

    assert nodes._version_tuple("0.3.40") == (0, 3, 40)
    assert nodes._version_tuple("0.33.0") == (0, 33, 0)
    assert nodes._version_tuple("0.4") == (0, 4, 0)
    assert nodes._version_tuple("0.3.41rc1") == (0, 3, 41)
    assert nodes._version_tuple("dev") is None
    assert nodes.version_problem("0.3.40") is None and nodes.version_problem("0.33.0") is None
    assert nodes.version_problem("1.0.0") is None


@pytest.mark.parametrize("version", ["0.3.30", "0.2.7", None, "garbage"])
def test_too_old_comfyui_gets_nodes_that_say_what_they_need(version):
    from vbar_loaders import nodes

    guarded = nodes.guard_version(nodes.NODE_CLASS_MAPPINGS, version)
    assert sorted(guarded) == sorted(nodes.NODE_CLASS_MAPPINGS)
    for name, cls in guarded.items():
        assert "0.3.40" in cls.DESCRIPTION and str(version or "unknown") in cls.DESCRIPTION, name
        assert isinstance(cls.INPUT_TYPES(), dict)       # no ComfyUI here: never raises
        with pytest.raises(RuntimeError, match=r"need ComfyUI 0\.3\.40 or newer") as e:
            getattr(cls(), cls.FUNCTION)()
        assert "Update ComfyUI" in str(e.value)
    current = nodes.guard_version(nodes.NODE_CLASS_MAPPINGS, "0.3.64")
    assert current is nodes.NODE_CLASS_MAPPINGS


_OLD_COMFY = r"""
import importlib.util, json, logging, os, sys, types
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(message)s")
sys.modules["comfy"] = types.ModuleType("comfy")                  # inside an old ComfyUI
version = types.ModuleType("comfyui_version"); version.__version__ = "0.3.30"
sys.modules["comfyui_version"] = version
root = sys.argv[1]
spec = importlib.util.spec_from_file_location("vbar-loaders", os.path.join(root, "__init__.py"),
                                              submodule_search_locations=[root])
mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod
spec.loader.exec_module(mod)
cls = mod.NODE_CLASS_MAPPINGS["VBARCheckpointLoader"]
try:
    cls().load(ckpt_name="x.safetensors")
except RuntimeError as e:
    print(json.dumps({"error": str(e), "count": len(mod.NODE_CLASS_MAPPINGS)}))
"""


def test_pack_imports_on_an_old_comfyui_without_a_traceback():
    p = subprocess.run([sys.executable, "-c", _OLD_COMFY, ROOT], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert p.returncode == 0 and "Traceback" not in p.stdout + p.stderr, p.stdout + p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert "0.3.40" in res["error"] and "0.3.30" in res["error"] and res["count"] >= 11
    assert "LOG VBAR loaders need ComfyUI 0.3.40" in p.stdout
