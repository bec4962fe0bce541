"""Run inside ComfyUI's interpreter (see test_comfyui_compat.py): VBAR loaders beside Dynamic VRAM.

aimdo needs an NVIDIA card, so this does on a CPU what ComfyUI's main.py does when Dynamic VRAM
is on (``aimdo_enabled``, ``CoreModelPatcher = ModelPatcherDynamic``), gives ComfyUI a fake
device ('meta') with a fake free-memory figure, and replaces aimdo's entry points with
stand-ins: size-0 host buffers are recorded, and the first real aimdo allocation (a model's
ModelVBAR) stops the run. Asserted: which patcher class each loader returns, and which path
``load_models_gpu`` takes for each model. On a ComfyUI without Dynamic VRAM it checks that.
"""
import os
import sys

comfy_dir, repo = sys.argv[1], sys.argv[2]
from comfy_boot import boot, check  # noqa: E402  (this script's folder is on sys.path)

boot(comfy_dir)

import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher as mp  # noqa: E402
import comfy.sd  # noqa: E402
import torch  # noqa: E402


if not hasattr(mp, "ModelPatcherDynamic"):
    import comfy.model_management

    check("this ComfyUI has no Dynamic VRAM",
          not getattr(getattr(comfy, "memory_management", None), "aimdo_enabled", False))
    print("ALL OK")
    sys.exit(0)

import comfy.memory_management  # noqa: E402
import comfy_aimdo.host_buffer  # noqa: E402
import comfy_aimdo.model_vbar  # noqa: E402

from vbar_loaders.loaders.comfyui.gguf import load_text_encoders  # noqa: E402
from vbar_loaders.loaders.comfyui.loading import (  # noqa: E402
    load_checkpoint, load_diffusion_model, open_state_dict)
from vbar_loaders.loaders.comfyui.patcher import patcher_class, stores_of  # noqa: E402


class StopBeforeAimdo(Exception):
    pass


class HostBufferStandIn:
    def __init__(self, *args):
        assert args == (0, 0, 0), f"a real host buffer was asked for: {args}"


def model_vbar_stand_in(*args, **kwargs):
    raise StopBeforeAimdo("ModelVBAR")


AIMDO_HELD = 256 << 20
comfy_aimdo.host_buffer.HostBuffer = HostBufferStandIn
comfy_aimdo.model_vbar.ModelVBAR = model_vbar_stand_in
comfy_aimdo.model_vbar.vbars_analyze = lambda device=None: AIMDO_HELD

# What main.py does with Dynamic VRAM on
comfy.memory_management.aimdo_enabled = True
mp.CoreModelPatcher = mp.ModelPatcherDynamic

GPU = torch.device("meta")           # not a CPU: ComfyUI's dynamic paths apply to it
free = {"bytes": 8 << 30, "short": False}
real_free = mm.get_free_memory


def fake_free(dev=None, torch_free_too=False):
    if dev is not None and getattr(dev, "type", None) == "cpu":
        return real_free(dev, torch_free_too)
    return (free["bytes"], free["bytes"]) if torch_free_too else free["bytes"]


mm.get_torch_device = lambda: GPU
mm.get_free_memory = fake_free

models = os.environ["COMFY_HARNESS_MODELS"]
ckpt = os.path.join(models, "checkpoints", "tiny_sd15.safetensors")
flux = os.path.join(models, "diffusion_models", "tiny_flux.safetensors")
clip_l = os.path.join(models, "text_encoders", "tiny_clip_l.safetensors")
Vbar = patcher_class()

# ComfyUI's file reader is aimdo's mmap when Dynamic VRAM is on: read the file with ours, then
# ComfyUI's stock loader from the state dict
stock = comfy.sd.load_state_dict_guess_config(open_state_dict(ckpt)[0], output_vae=True)
check("stock checkpoint loader: ModelPatcherDynamic", type(stock[0]) is mp.ModelPatcherDynamic,
      type(stock[0]))
check("stock VAE: ModelPatcherDynamic", type(stock[2].patcher) is mp.ModelPatcherDynamic,
      type(stock[2].patcher))

model, clip, vae = load_checkpoint(ckpt)
for what, p in (("checkpoint MODEL", model), ("checkpoint CLIP", clip.patcher),
                ("checkpoint VAE", vae.patcher)):
    check(f"VBAR {what}: our plain patcher, never dynamic", type(p) is Vbar and not p.is_dynamic(),
          type(p))
check("VBAR VAE on the device, no aimdo records left on it",
      vae.patcher.load_device == GPU and not hasattr(vae.first_stage_model, "dynamic_pins"))
unet = load_diffusion_model(flux)
check("VBAR diffusion model: our plain patcher", type(unet) is Vbar and unet.load_device == GPU)
te = load_text_encoders([clip_l], "stable_diffusion")
check("VBAR text encoder: our plain patcher", type(te.patcher) is Vbar)
check("clones stay ours", type(model.clone()) is Vbar and type(model.clone(disable_dynamic=True)) is Vbar)

# --- which path load_models_gpu takes -------------------------------------------------------------
calls = []


def spy(cls, name):
    real = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        calls.append((cls.__name__, name, self, args, kwargs))
        return real(self, *args, **kwargs)

    setattr(cls, name, wrapper)


spy(Vbar, "load")
spy(Vbar, "partially_unload")
spy(mp.ModelPatcherDynamic, "load")
real_free_memory = mm.free_memory


SHORT = 8 << 20


def free_memory_spy(*args, **kwargs):
    calls.append(("mm", "free_memory", None, args, kwargs))
    if free["short"]:      # the device lacks SHORT bytes of what ComfyUI asks for
        free["bytes"] = int(args[0]) - SHORT
    return real_free_memory(*args, **kwargs)


mm.free_memory = free_memory_spy

mm.load_models_gpu([model])
frees = [c for c in calls if c[1] == "free_memory"]
check("a VBAR model loads through ComfyUI's non-dynamic path",
      frees and frees[0][4].get("for_dynamic") is False, frees)
check("and its load is ours", [c[:2] for c in calls if c[0] != "mm"] == [("VbarModelPatcher", "load")],
      calls)

# VBAR pages resident, as after a run
store = stores_of(model)[0]
for h in store.handles:
    if h.slot is not None:
        with store.use(h, torch.device("cpu"), h.store_dtype):
            pass
resident = store.resident_bytes()
check("the VBAR model holds pages", resident > 32 << 20, resident)

calls.clear()
free["short"] = True                # the card is full: loading the stock model needs room
try:
    mm.load_models_gpu([stock[0]])
    stopped = False
except StopBeforeAimdo:
    stopped = True
frees = [c for c in calls if c[1] == "free_memory"]
check("a stock model alone: ComfyUI frees for a dynamic model", frees and frees[0][4].get("for_dynamic"),
      frees)
unloads = [c for c in calls if c[1] == "partially_unload" and c[2] is model]
check("that shrinks the VBAR model through partially_unload",
      unloads and unloads[0][3][1] >= SHORT and store.resident_bytes() <= resident - SHORT
      and any(x.model is model for x in mm.current_loaded_models),
      (unloads, store.resident_bytes(), resident))
check("the stock model then takes the dynamic path, up to aimdo",
      stopped and any(c[:2] == ("ModelPatcherDynamic", "load") for c in calls), calls)
check("our loads never went through ModelPatcherDynamic",
      not any(c[0] == "ModelPatcherDynamic" and isinstance(c[2], Vbar) for c in calls))
print("ALL OK")
