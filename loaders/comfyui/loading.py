"""Load checkpoints and diffusion models into VBAR-backed ComfyUI objects.

The state dict comes from our own zero-copy safetensors reader; ComfyUI detects the model and
builds it with our operations (nothing allocated, tensors adopted); then every layer's weight
is given a VBAR slot in execution order and the ModelPatchers become VBAR-aware.
"""
import logging
import os

from ..errors import ModelFileError
from ..files.safetensors_file import SafetensorsFile

log = logging.getLogger("vbar")

WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")


def open_state_dict(path):
    """(state dict of zero-copy views, metadata) for a .safetensors file; refuses pickles."""
    sd, metadata, _ = open_checked(path)
    return sd, metadata


def open_checked(path):
    """Like open_state_dict, plus ``check(key)``: raises FileChangedError if the file changed."""
    ext = os.path.splitext(str(path))[1].lower()
    if ext in (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pt2"):
        raise ModelFileError(path, f"'{ext}' files are Python pickles, which VBAR loaders never "
                                   f"load (a pickle can run arbitrary code)",
                             "Convert it to .safetensors, or use ComfyUI's stock loader")
    f = SafetensorsFile(path)
    sd = {k: f.get_tensor(k) for k in f.keys()}
    return sd, f.metadata, f.check_unchanged


_warned_dynamic = False


def comfy_build(fn, *args, steps=None, **kwargs):
    """Call one of comfy.sd's loaders so that it builds plain ModelPatchers.

    Dynamic VRAM (ComfyUI 0.11+, comfy-aimdo) would otherwise give a ModelPatcherDynamic, whose
    weights aimdo manages; a VBAR model's weights are the VBAR's. ComfyUI takes
    ``disable_dynamic`` wherever it can build a dynamic patcher; older versions have neither.

    ``steps``: a runtime.progress.LoadProgress that counts every module ComfyUI loads from the
    state dict (the VAE's weights are copied there: most of a checkpoint load) and may stop
    the build (an interrupt) between modules, before anything of ours is reserved."""
    import inspect

    from ..runtime.progress import module_loads

    if "disable_dynamic" in inspect.signature(fn).parameters:
        kwargs["disable_dynamic"] = True
    with module_loads(steps.add if steps is not None else None):
        return fn(*args, **kwargs)


def plain_patcher(patcher):
    """A non-dynamic ModelPatcher for the same model (ComfyUI's VAE takes no disable_dynamic
    and builds a dynamic one when Dynamic VRAM is on). Before any load: nothing to carry over
    but the devices; aimdo's per-model records (empty until a load) are dropped with it."""
    if not getattr(patcher, "is_dynamic", lambda: False)():
        return patcher
    import comfy.model_patcher

    model = patcher.model
    for attr in ("dynamic_vbars", "dynamic_pins", "dynamic_patchers"):
        if attr in model.__dict__:
            delattr(model, attr)
    return comfy.model_patcher.ModelPatcher(model, load_device=patcher.load_device,
                                            offload_device=patcher.offload_device)


def _pool_for(device):
    from ...vram import get_pool
    from .patcher import dynamic_vram_active

    global _warned_dynamic
    if not _warned_dynamic and dynamic_vram_active():
        _warned_dynamic = True
        # Two managers on one card: ours never assumes memory it did not see free. On CUDA the
        # budget subtracts what the driver reports as used by others, Dynamic VRAM's pages too.
        log.warning("VBAR: ComfyUI's Dynamic VRAM is active. VBAR models manage their own "
                    "weights and count Dynamic VRAM's memory as used by others, so the two never "
                    "overcommit; set a VBAR budget (VBAR Set Budget / VBAR_BUDGET) to split the "
                    "card explicitly, or start ComfyUI with --disable-dynamic-vram.")
    return get_pool(str(device))


def prefetch_depth():
    """Weights prepared ahead of use (VBAR_PREFETCH, default 1; 0 turns prefetch off)."""
    raw = os.environ.get("VBAR_PREFETCH", "1")
    try:
        depth = int(raw)
    except ValueError:
        raise ValueError(f"VBAR_PREFETCH={raw!r}: use a whole number of layers (0 = off)")
    return max(0, depth)


def unet_prefix(sd):
    """The diffusion model's key prefix in ``sd`` as ComfyUI strips it ("" when keys lack it)."""
    import comfy.model_detection

    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    # ComfyUI strips it only if keys carry it (diffusion-model files usually have none).
    return prefix if any(k.startswith(prefix) for k in sd) else ""


def check_supported(sd, path, metadata=None):
    """For loaders that take no quantized safetensors layers (text encoders, NF4 files)."""
    from ..quant.comfy_quant import METADATA_KEY, QUANT_SUFFIX

    if any(k.endswith("scaled_fp8") or k.endswith(QUANT_SUFFIX) for k in sd) \
            or METADATA_KEY in (metadata or {}):
        raise ModelFileError(path, "quantized layers (scaled fp8 / comfy_quant) are supported by "
                             "the VBAR Checkpoint and Diffusion Model loaders only, for "
                             "diffusion-model layers",
                             "Use ComfyUI's stock loader for this file, or a bf16/fp16 or GGUF version")


def _quantized(sd, path, metadata):
    """(state dict for ComfyUI, quant.Prepared) for a file's quantized diffusion-model layers."""
    from . import quant

    prefix = unet_prefix(sd) if sd else ""
    prep = quant.prepare(sd, path, metadata, model_prefix=prefix)
    prep.prefix = prefix          # ComfyUI pops the model's keys from the dict as it loads
    if prep:
        log.info("%s: quantized layers: %s", os.path.basename(str(path)), quant.describe(prep))
    return prep.logical, prep


def _attach_quantized(patcher, prep):
    from . import quant

    if not prep:
        return
    prefix = prep.prefix
    if prep.kind == "mixed":
        quant.mixed_dtypes(patcher.model)
        quant.attach_mixed(patcher.model.diffusion_model, prep, prefix, patcher.load_device)
    else:
        quant.attach_scaled_fp8(patcher.model.diffusion_model, prep, prefix)


def is_adopting(m):
    from .ops import AdoptingOp

    return isinstance(m, AdoptingOp)


def _convert_kept(module):
    """Layers left out of the VBAR hold the file's tensors as adopted; give them the dtype
    ComfyUI would have converted them to at load (a copy only where the dtypes differ)."""
    import torch

    for m in module.modules():
        if not is_adopting(m) or getattr(m, "_vbar_handles", None):
            continue
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_floating_point() and p.dtype != m.vbar_store_dtype:
                m._parameters[name] = torch.nn.Parameter(p.to(m.vbar_store_dtype),
                                                         requires_grad=False)


def wrap_model(patcher, name, source_check=None):
    """Move a diffusion model's layers behind a VBAR; returns the (same) patcher, adopted."""
    from .patcher import adopt
    from ..runtime.vbar_modules import vbarize
    from ..runtime.weight_store import WeightStore

    diffusion = patcher.model.diffusion_model
    if not any(is_adopting(m) for m in diffusion.modules()):
        raise RuntimeError(f"{name}: ComfyUI built this model without VBAR operations "
                           f"(unrecognised checkpoint?)")
    store = WeightStore(name, _pool_for(patcher.load_device), source_check=source_check)
    vbarize(diffusion, store, include=lambda n, m: is_adopting(m))
    _convert_kept(diffusion)
    store.enable_prefetch(prefetch_depth())
    return adopt(patcher, store)


def wrap_clip(clip, name, source_check=None):
    """Text encoders: every layer but the token embedding tables goes behind the VBAR.

    ComfyUI runs a text encoder on the device its token embedding lives on, so those tables
    stay ordinary tensors that follow the model to its device.
    """
    from .patcher import adopt
    from ..runtime.vbar_modules import vbarize
    from ..runtime.weight_store import WeightStore

    model = clip.cond_stage_model
    keep = set()
    for m in model.modules():
        get = getattr(m, "get_input_embeddings", None)
        if callable(get):
            try:
                keep.add(id(get()))
            except Exception:  # noqa: BLE001 - encoders without the hook just skip it
                pass
    store = WeightStore(name, _pool_for(clip.patcher.load_device), source_check=source_check)
    vbarize(model, store, include=lambda n, m: is_adopting(m) and id(m) not in keep)
    _convert_kept(model)
    adopt(clip.patcher, store)
    return clip


def wrap_vae(vae, name, source_check=None):
    """ComfyUI builds VAEs with fixed ops; their layers are converted after construction."""
    from .patcher import adopt
    from ..runtime.vbar_modules import vbarize
    from ..runtime.weight_store import WeightStore

    if getattr(vae.patcher, "is_dynamic", lambda: False)():
        vae.patcher = plain_patcher(vae.patcher)
        # the dynamic path assigned the file's tensors as they are; a plain load converts
        vae.first_stage_model.to(vae.vae_dtype)
    store = WeightStore(name, _pool_for(vae.patcher.load_device), source_check=source_check)
    vbarize(vae.first_stage_model, store)
    adopt(vae.patcher, store)
    return vae


def build_checkpoint(sd, path, metadata, embedding_directory, hint, steps=None):
    """(model, clip, vae) from ComfyUI's checkpoint loader with VBAR operations for the diffusion
    model and the text encoders; ``hint``: what to do when ComfyUI does not recognise the file;
    ``steps``: a load_progress counter fed as ComfyUI loads each module (see progress.py)."""
    import comfy.model_management as mm
    import comfy.sd

    from .ops import vbar_operations

    ops = vbar_operations()
    te_options = {"custom_operations": ops,
                  "initial_device": mm.text_encoder_offload_device()}
    out = comfy_build(
        comfy.sd.load_state_dict_guess_config, sd, output_vae=True, output_clip=True,
        embedding_directory=embedding_directory, model_options={"custom_operations": ops},
        te_model_options=te_options, metadata=metadata, steps=steps)
    if out is None:
        raise ModelFileError(path, "ComfyUI does not recognise this file as a checkpoint", hint)
    return out[:3]


def wrap_clip_vae(clip, vae, base, check):
    """A checkpoint's text encoders and VAE behind their VBARs (either may be absent)."""
    if clip is not None:
        wrap_clip(clip, base + ":clip", source_check=check)
    if vae is not None and getattr(vae, "first_stage_model", None) is not None:
        wrap_vae(vae, base + ":vae")


def load_checkpoint(path, embedding_directory=None, progress=None):
    """MODEL, CLIP, VAE from a checkpoint, all three VBAR-backed.

    ``progress(done, total)``: in tensor elements, as ComfyUI loads them (default: ComfyUI's
    progress bar, stopping on an interrupt; see progress.py). An interrupt stops the load
    before any VBAR is made."""
    from .progress import load_progress
    from ..runtime.progress import parameters

    sd, metadata, check = open_checked(path)
    sd, prep = _quantized(sd, path, metadata)
    steps = load_progress(progress, parameters(sd.values()))
    model, clip, vae = build_checkpoint(
        sd, path, metadata, embedding_directory,
        "Use the VBAR Diffusion Model Loader for diffusion-model-only files", steps=steps)
    steps.finish()      # the last point an interrupt stops the load: nothing reserved yet
    base = os.path.basename(str(path))
    if model is not None:
        _attach_quantized(model, prep)
        wrap_model(model, base, source_check=check)
    wrap_clip_vae(clip, vae, base, check)
    return model, clip, vae


def load_diffusion_model(path, weight_dtype="default", first_blocks=0, owner=None):
    """MODEL from a diffusion-model file; ``first_blocks``: pin the first N blocks resident
    (runtime/blocks.py), ``owner``: a token whose previous load's pins are released."""
    import comfy.sd
    import torch

    from .ops import vbar_operations

    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype {weight_dtype!r}: use one of {', '.join(WEIGHT_DTYPES)}")
    sd, metadata, check = open_checked(path)
    sd, prep = _quantized(sd, path, metadata)
    options = {"custom_operations": vbar_operations()}
    if weight_dtype.startswith("fp8_e4m3fn"):
        options["dtype"] = torch.float8_e4m3fn   # "_fast" (fp8 matmul) computes as plain fp8 here
    elif weight_dtype == "fp8_e5m2":
        options["dtype"] = torch.float8_e5m2
    name = os.path.basename(str(path))
    if first_blocks:
        from ..runtime.blocks import check_pins
        from .pins import retire_pins

        check_pins(sd.keys(), first=first_blocks, what=name)
        retire_pins(owner)
    model = comfy_build(comfy.sd.load_diffusion_model_state_dict, sd, model_options=options)
    if model is None:
        raise ModelFileError(path, "ComfyUI does not recognise this diffusion model",
                             "Check that the file is a diffusion model (UNet/DiT) ComfyUI supports")
    _attach_quantized(model, prep)
    if not first_blocks:
        return wrap_model(model, name, source_check=check)
    from ..runtime.blocks import pin_blocks
    from .pins import follow_pins

    pin_blocks(model.model.diffusion_model, 0, 0, what=name, first=first_blocks)
    wrap_model(model, name, source_check=check)
    follow_pins(model, name, 0, 0, owner, first=first_blocks)
    return model
