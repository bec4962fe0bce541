"""The VBAR patcher's load() without ComfyUI (a stand-in ModelPatcher): a module outside the VBAR
that load() patches into (a text encoder's token embedding) is marked ``comfy_patched_weights``
as a stock full load marks it, so ComfyUI's readers (0.33's LoRA extraction, checkpoint save)
take its tensor instead of patching it a second time; VBAR layers are not marked (their module
tensor is the file's, readers must ask patch_weight_to_device)."""
import contextlib
import functools
import sys
import types

import torch
import torch.nn as nn

from vbar_loaders.loaders.comfyui.patcher import make_patcher_class
from vbar_loaders.loaders.runtime.vbar_modules import vbarize
from vbar_loaders.loaders.runtime.weight_store import WeightStore
from vbar_loaders.vram import Pool
from vbar_loaders.vram.host_backend import HostBackend


class StockPatcher:
    """What load() uses of ComfyUI's ModelPatcher; patches add their value into the module."""
    def __init__(self, model, patches):
        self.model, self.patches = model, patches
        self.backup, self.weight_wrapper_patches, self.forced_hooks = {}, {}, None
        self.patches_uuid, self.offload_device = "uuid-1", torch.device("cpu")
        self.load_device = torch.device("cpu")

    def use_ejected(self):
        return contextlib.nullcontext()

    def unpatch_hooks(self):
        pass

    def apply_hooks(self, hooks, force_apply=False):
        pass

    def get_all_callbacks(self, kind):
        return []

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False,
                               return_weight=False, force_cast=False):
        name, _, pname = key.rpartition(".")
        m = self.model.get_submodule(name)
        w = getattr(m, pname)
        if key not in self.backup and not return_weight:
            self.backup[key] = (w, False)
        out = w + self.patches[key]
        if return_weight:
            return out
        setattr(m, pname, nn.Parameter(out, requires_grad=False))


class Embedding(nn.Embedding):
    comfy_cast_weights = False      # a ComfyUI op class (extraction reads only those)


def reader(patcher, key):
    """How 0.33's calc_lora_model (and model_state_dict_for_saving) reads a patched weight."""
    name, _, pname = key.rpartition(".")
    op = patcher.model.get_submodule(name)
    if hasattr(op, "comfy_cast_weights") and not getattr(op, "comfy_patched_weights", False):
        return patcher.patch_weight_to_device(key, patcher.offload_device, return_weight=True)
    return getattr(op, pname)


def test_modules_outside_the_vbar_are_marked_patched(monkeypatch):
    comfy, utils = types.ModuleType("comfy"), types.ModuleType("comfy.utils")
    utils.get_attr = lambda obj, attr: functools.reduce(getattr, attr.split("."), obj)
    comfy.utils = utils
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.utils", utils)
    model = nn.Module()
    model.emb = Embedding(16, 8)
    model.lin = nn.Linear(8, 8)
    with torch.no_grad():
        model.emb.weight.zero_()
    pool = Pool(HostBackend(), budget=8 << 20)
    store = WeightStore("m", pool, page_size=64 << 10)
    vbarize(model, store, include=lambda name, m: name == "lin")
    model._vbar_stores = [store]
    patches = {"emb.weight": torch.ones(16, 8)}
    cls = make_patcher_class(types.SimpleNamespace(ModelPatcher=StockPatcher,
                                                   CallbacksMP=types.SimpleNamespace(ON_LOAD=0)))
    p = cls(model, patches)
    try:
        with torch.no_grad():
            p.load(torch.device("cpu"))
            assert torch.equal(model.emb.weight, torch.ones(16, 8))   # patched once, in place
            assert model.emb.comfy_patched_weights is True
            assert not hasattr(model.lin, "comfy_patched_weights")
            # the reader takes the module's tensor: the LoRA counted once, not twice
            assert torch.equal(reader(p, "emb.weight"), torch.ones(16, 8))
            p.load(torch.device("cpu"))                                  # loaded again: no change
            assert torch.equal(reader(p, "emb.weight"), torch.ones(16, 8))
    finally:
        pool.close()
