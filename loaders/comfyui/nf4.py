"""NF4 checkpoints and diffusion models in ComfyUI, with Flux block pinning.

ComfyUI detects and builds the model from the *logical* state dict (4-bit weights replaced by
meta tensors of their real shape: see loaders/nf4/model.py), with our adopting operations; the Linear
layers are then pointed at their packed bytes, the first N double / M single blocks marked
to be held resident, and ``wrap_model`` puts everything behind the VBAR.

Pins then follow the model's life in ComfyUI: see pins.py.
"""
import logging
import os

from .pins import follow_pins, retire_pins
from ..errors import ModelFileError, NF4Error
from ..runtime.blocks import check_pins, pin_blocks

log = logging.getLogger("vbar")


def _open(path, double, single, first=0):
    from .loading import check_supported, open_checked, unet_prefix
    from ..nf4.model import split_nf4_state_dict

    sd, metadata, check = open_checked(path)
    check_supported(sd, path)
    logical, weights = split_nf4_state_dict(sd, path)
    check_pins(logical, double, single, first, what=os.path.basename(str(path)))
    prefix = unet_prefix(logical)
    outside = [p for p in weights if not p.startswith(prefix)]
    if outside:
        raise NF4Error(path, "4-bit weight outside the diffusion model (text encoder or VAE): VBAR "
                             "NF4 loaders support 4-bit diffusion models only",
                       "Use a checkpoint whose text encoders are fp16/bf16/fp8",
                       tensor=outside[0] + ".weight")
    return logical, weights, prefix, metadata, check


def _size_mismatch(path, e):
    # ComfyUI's load_state_dict reports a 4-bit shape that does not fit the detected model
    # as a bare RuntimeError; name the file.
    if "size mismatch" in str(e):
        return NF4Error(path, f"a weight's shape does not match the model ComfyUI detected ({e})",
                        "The file is damaged or made for another model")
    return e


def _finish_model(patcher, path, weights, prefix, double, single, quantize_on_load, check, owner,
                  first=0, progress=None):
    """Attach the 4-bit weights, pin blocks, put the model behind the VBAR.

    Quantizing on load is the long part (about 27 s per 545 M parameters on a CPU): it reports
    through ``progress`` (default: ComfyUI's progress bar, stopping on an interrupt). It runs
    before anything is reserved or pinned and before ``owner``'s previous load gives up its
    pins, so an interrupt leaves that previous model as it was and nothing half-built."""
    import comfy.model_management as mm

    from .loading import is_adopting, wrap_model
    from .progress import comfy_progress
    from ..nf4.model import attach_nf4, quantize_linears

    diffusion = patcher.model.diffusion_model
    name = os.path.basename(str(path))
    if weights:
        attach_nf4(diffusion, weights, path, prefix)
    elif quantize_on_load:
        device = patcher.load_device if patcher.load_device.type == "cuda" else None
        q = quantize_linears(diffusion, include=lambda n, m: is_adopting(m), device=device,
                             progress=progress or comfy_progress())
        attach_nf4(diffusion, q, path)
        log.info("%s: %d Linear weights quantized to NF4 on load", name, len(q))
        if device is not None:
            mm.soft_empty_cache()
    retire_pins(owner)
    pin_blocks(diffusion, double, single, what=name, first=first)
    wrap_model(patcher, name, source_check=check)
    follow_pins(patcher, name, double, single, owner, first=first)
    return patcher


def load_nf4_diffusion_model(path, double_blocks=0, single_blocks=0, quantize_on_load=False,
                             owner=None, first_blocks=0, progress=None):
    """MODEL from an NF4/FP4 diffusion model file (or a float one, quantized if asked).

    ``owner``: a token for the caller (e.g. the node); its previous load's pins are released.
    ``first_blocks``: pin the first N blocks of any family instead of Flux's double/single.
    ``progress(done, total)``: for quantizing on load (default: ComfyUI's progress bar and
    interrupt, see progress.py).
    """
    import comfy.sd

    from .loading import comfy_build
    from .ops import vbar_operations

    logical, weights, prefix, _, check = _open(path, double_blocks, single_blocks, first_blocks)
    try:
        model = comfy_build(comfy.sd.load_diffusion_model_state_dict, logical,
                            model_options={"custom_operations": vbar_operations()})
    except RuntimeError as e:
        raise _size_mismatch(path, e) from e
    if model is None:
        raise ModelFileError(path, "ComfyUI does not recognise this diffusion model",
                             "Check that the file is a diffusion model (UNet/DiT) ComfyUI supports")
    return _finish_model(model, path, weights, prefix, double_blocks, single_blocks,
                         quantize_on_load, check, owner, first_blocks, progress)


def load_nf4_checkpoint(path, double_blocks=0, single_blocks=0, embedding_directory=None,
                        owner=None, progress=None):
    """MODEL, CLIP, VAE from an NF4 checkpoint (Flux NF4 files: 4-bit diffusion model,
    fp16/fp8 text encoders, bf16 VAE). CLIP is None when the file has no text encoders.

    ``progress(done, total)``: in tensor elements as ComfyUI loads them (default: ComfyUI's
    progress bar, stopping on an interrupt; see progress.py). An interrupt stops the load
    before any VBAR is made and before ``owner``'s previous load gives up its pins."""
    import comfy.model_detection

    from .loading import build_checkpoint, wrap_clip_vae
    from .progress import load_progress
    from ..runtime.progress import parameters

    logical, weights, prefix, metadata, check = _open(path, double_blocks, single_blocks)
    # ComfyUI falls back to a diffusion-model load without our operations when detection fails,
    # which cannot hold 4-bit weights: refuse first.
    hint = "Use the VBAR NF4 Diffusion Model Loader for diffusion-model-only files"
    if comfy.model_detection.model_config_from_unet(logical, prefix, metadata=metadata) is None:
        raise ModelFileError(path, "ComfyUI does not recognise this file as a checkpoint", hint)
    steps = load_progress(progress, parameters(logical.values()))
    try:
        model, clip, vae = build_checkpoint(logical, path, metadata, embedding_directory, hint,
                                            steps=steps)
    except RuntimeError as e:
        raise _size_mismatch(path, e) from e
    steps.finish()      # the last point an interrupt stops the load: nothing reserved yet
    _finish_model(model, path, weights, prefix, double_blocks, single_blocks, False, check, owner)
    wrap_clip_vae(clip, vae, os.path.basename(str(path)), check)
    return model, clip, vae
