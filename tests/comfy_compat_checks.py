"""Run inside ComfyUI's interpreter (see test_comfyui_compat.py): the pack against the installed
ComfyUI's own classes and functions. Prints one 'CHECK name ok' line per check; any failure raises.

* every method our ModelPatcher overrides takes what ComfyUI's takes (inspect.signature);
* every layer class of comfy.ops is VBAR-backed or deliberately left out;
* ComfyUI's own partial load/unload functions, driven with a fake device budget (``--cpu`` never
  reaches them), shrink a VBAR model through ``partially_unload`` (0.33 passes
  ``force_patch_weights``: the TypeError that reached users);
* ``force_patch_weights`` and ``patch_weight_to_device(return_weight=True)`` give exactly the
  weights ComfyUI's stock loader gives, LoRA-style patches included.
"""
import os
import sys

comfy_dir, repo = sys.argv[1], sys.argv[2]
from comfy_boot import boot, check  # noqa: E402  (this script's folder is on sys.path)

boot(comfy_dir)

import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher as mp  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
import torch  # noqa: E402

from vbar_loaders.loaders.comfyui.loading import load_checkpoint  # noqa: E402
from vbar_loaders.loaders.comfyui.ops import LEFT_OUT, OP_NAMES, unclassified_ops  # noqa: E402
from vbar_loaders.loaders.comfyui.patcher import signature_problems, stores_of  # noqa: E402
from vbar_loaders.loaders.runtime.vbar_modules import vbar_class  # noqa: E402
from vbar_loaders.vram import get_pool  # noqa: E402


# --- what the installed ComfyUI declares ---------------------------------------------------------
check("every override takes every parameter of ComfyUI's method", signature_problems() == [],
      signature_problems())
check("every comfy.ops layer class is classified", unclassified_ops() == [], unclassified_ops())
for name in OP_NAMES:
    cls = getattr(comfy.ops.manual_cast, name, None)
    if cls is not None:
        check(f"comfy.ops {name} has a VBAR layer", vbar_class(cls) is not None)
check("left-out op classes say why", all(isinstance(v, str) and v for v in LEFT_OUT.values()))

# --- the same checkpoint, stock and VBAR, with the same weight patches ---------------------------
ckpt = os.path.join(os.environ["COMFY_HARNESS_MODELS"], "checkpoints", "tiny_sd15.safetensors")
pool = get_pool("cpu", budget=8 << 30)
vbar, clip, vae = load_checkpoint(ckpt)
stock = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False, output_clip=False)[0]

g = torch.Generator().manual_seed(0)
keys = [k for k in vbar.model.state_dict() if k.endswith("attn1.to_q.weight")][:2]
keys.append(next(k for k in vbar.model.state_dict() if k.endswith("proj_in.weight")))
patches = {}
for k in keys:
    shape = stock.model.state_dict()[k].shape
    patches[k] = (torch.randn(shape, generator=g) * 0.1,)     # a "diff" patch, as merges make
vbar = vbar.clone()
stock = stock.clone()
check("patches land on the VBAR model", len(vbar.add_patches(patches, 1.0)) == len(keys))
stock.add_patches(patches, 1.0)
unpatched = "diffusion_model.out.2.weight"
managed = vbar._vbar_managed()
check("the compared weights are VBAR-managed", all(k in managed for k in keys + [unpatched]))

# 0.33 saves checkpoints and extracts LoRAs through patch_weight_to_device(return_weight=True)
if "return_weight" in mp.ModelPatcher.patch_weight_to_device.__code__.co_varnames:
    mm.load_models_gpu([stock])        # on a CPU: fully loaded, patches written into the module
    stock_sd = stock.model.state_dict()
    for k in keys + [unpatched]:
        want = stock_sd[k]
        got = vbar.patch_weight_to_device(k, vbar.load_device, return_weight=True)
        check(f"return_weight {k.split('.', 1)[1]} equals the stock loader's",
              got.dtype == want.dtype and torch.equal(got, want), (got.dtype, want.dtype))
    check("return_weight leaves the module's weights alone", not vbar.backup)
    mm.unload_all_models()

# before 0.33 they load with force_patch_weights=True and read state_dict()
mm.load_models_gpu([stock], force_patch_weights=True)
want = stock.model.state_dict()
mm.load_models_gpu([vbar], force_patch_weights=True)
got = vbar.model.state_dict()
diff = [k for k in want if k not in got or got[k].dtype != want[k].dtype
        or not torch.equal(got[k], want[k])]
check("force_patch_weights: state_dict equals the stock loader's, patches included", not diff,
      diff[:5])
store = stores_of(vbar)[0]
mm.unload_all_models()
handle = next(h for h in store.handles if keys[0].endswith("." + h.key))   # store keys: per model
check("unloading restores the file's tensors (ComfyUI's backup)",
      vbar.model.state_dict()[keys[0]].data_ptr() == handle.source.data_ptr() and not vbar.backup)

# --- ComfyUI's partial load/unload with a fake device budget ------------------------------------
cond = clip.encode_from_tokens_scheduled(clip.tokenize("a cube"))
lat = torch.zeros(1, 4, 8, 8)
comfy.sample.sample(vbar, comfy.sample.prepare_noise(lat, 1), 1, 7.0, "euler", "normal", cond,
                    cond, lat, seed=1, disable_pbar=True)
loaded = vbar.loaded_size()
check("sampling left pages resident", loaded > 32 << 20, loaded)
lm = next(x for x in mm.current_loaded_models if x.model is vbar)


def resident():
    return sum(s.resident_bytes() for s in stores_of(vbar))


res0 = resident()

# LoadedModel.model_use_more_vram(<0) -> partially_load -> partially_unload(force_patch_weights=)
calls = []
real_unload = type(vbar).partially_unload


def spy(self, *args, **kwargs):
    calls.append((args, kwargs, real_unload(self, *args, **kwargs)))
    return calls[-1][-1]


type(vbar).partially_unload = spy
try:
    lm.model_use_more_vram(-(8 << 20))
finally:
    type(vbar).partially_unload = real_unload
after = vbar.loaded_size()
import inspect  # noqa: E402

if "partially_unload" in inspect.getsource(mp.ModelPatcher.partially_load):     # 0.33+
    check("ComfyUI's partially_load reaches partially_unload", len(calls) == 1, calls)
    freed = calls[0][-1]
    check("ComfyUI's partially_load shrinks a VBAR model by what it asked",
          freed >= 8 << 20 and resident() == res0 - freed and after < loaded,
          (loaded, after, res0, resident(), calls))
else:   # older: a smaller partially_load is a load with less memory; the budget decides
    check("ComfyUI's partially_load with less memory runs", after <= loaded, (loaded, after))

vbar.partially_unload(vbar.offload_device, 4 << 20, force_patch_weights=True)
check("partially_unload(force_patch_weights=True) presents the patched weights",
      torch.equal(vbar.model.state_dict()[keys[0]], want[keys[0]]))

budget = {"free": 0}
real_free = mm.get_free_memory


def fake_free(dev=None, torch_free_too=False):
    return (budget["free"], budget["free"]) if torch_free_too else budget["free"]


mm.get_free_memory = fake_free
try:
    before, res1 = vbar.loaded_size(), resident()
    need = 16 << 20
    # ComfyUI frees for a device that has 0 bytes free: it asks the VBAR model to give back
    # what it needs, and keeps it loaded when partially_unload frees enough.
    mm.free_memory(need, vbar.load_device)
    now = vbar.loaded_size()
    check("free_memory shrinks the VBAR model by what was asked",
          res1 - resident() >= need and now < before, (before, now, res1, resident()))
    check("and keeps it loaded", any(x.model is vbar for x in mm.current_loaded_models))
    check("the model's record matches its residency",
          vbar.model.model_loaded_weight_memory == now)
finally:
    mm.get_free_memory = real_free

del vbar, stock, clip, vae, cond, lm
mm.unload_all_models()
import gc  # noqa: E402

gc.collect()
check("every reservation returned", pool.stats()["reserved_bytes"] == 0, pool.stats())
print("ALL OK")
