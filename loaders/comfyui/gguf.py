"""GGUF diffusion models and text encoders as VBAR-backed ComfyUI objects.

The VBAR slots hold the *quantized* bytes (2-6x fewer than bf16, from Q8_0 to Q2_K, so far more
of a model stays resident); each use dequantizes on the compute device into a temporary. ComfyUI detects and
builds the model from GGUFWeight tensors, which report logical shapes, and our operations adopt
them without copying. Imports ComfyUI only inside functions.
"""
import logging
import os

import torch

from .pins import follow_pins, retire_pins
from ..errors import GGUFError
from ..runtime.blocks import check_pins, pin_blocks
from ..gguf.file import IMAGE_ARCHS, TEXT_ARCHS, GGUFFile
from ..gguf.names import (GEMMA_ARCHS, LLM_ARCHS, T5_ARCHS, llama_unpermute_index,
                         text_encoder_names)
from ..gguf.tokenizer import has_sentencepiece, sentencepiece_model
from ..gguf.weights import (attach_sources, choice_dtype, dequantize_unmanaged, gguf_state_dict,
                           set_patch_dtype, take_rows)

log = logging.getLogger("vbar")

GGUF_EXT = ".gguf"
SUPPORTED_TEXT_ARCHS = (*T5_ARCHS, "clip", *LLM_ARCHS)


def _check_all(checks):
    """One ``source_check(key)`` running every file's check (None if there are none)."""
    if not checks:
        return None

    def check(key):
        for c in checks:
            c(key)

    return check


def _plain_embeddings(model, steps=None):
    """Embedding tables become ordinary tensors in the dtype ComfyUI chose for the layer.

    ComfyUI reads them directly (a text encoder runs on its token table's device; CLIP adds its
    position table itself), and the token tables stay out of the VBAR. A stock load stores them
    in the layer's dtype, so an F32 table from a file is converted too, to compute the same.

    ``steps``: a LoadProgress; the tables to convert are added to its total, and each one
    counts when done (dequantizing a large token table takes seconds on a CPU)."""
    from ..gguf.weights import GGUFWeight

    todo = []
    for m in model.modules():
        p = m._parameters.get("weight") if isinstance(m, torch.nn.Embedding) else None
        if p is not None and not p.is_meta:
            todo.append((m, p))
    if steps is not None:
        steps.extend(sum(p.numel() for _, p in todo))
    for m, p in todo:
        dtype = getattr(m, "vbar_store_dtype", None)
        new = None
        if isinstance(p, GGUFWeight):
            new = p.dequantize(dtype if dtype is not None and dtype.is_floating_point
                               else torch.float32)
        elif dtype is not None and p.dtype.is_floating_point and p.dtype != dtype:
            new = p.detach().to(dtype)
        if new is not None:
            m._parameters["weight"] = torch.nn.Parameter(new, requires_grad=False)
        if steps is not None:
            steps.add(p.numel())


def load_gguf_diffusion_model(path, dequant_dtype="default", patch_dtype="default",
                              double_blocks=0, single_blocks=0, owner=None, first_blocks=0):
    """MODEL from a diffusion-model .gguf (Flux, SD1.x, SDXL, SD3 ... as city96's converter
    writes them).

    ``dequant_dtype``: "default" = the dtype ComfyUI would store the weights in (a stock load of
    the dequantized weights computes the same), "target" = the compute dtype directly, or
    float32/float16/bfloat16. ``patch_dtype``: the dtype a LoRA-patched weight is held in
    ("default": the dtype ComfyUI would store it in, so the result is a stock load's; "target":
    the compute dtype; the patch itself is computed as ComfyUI computes it, see comfyui/lora.py).
    ``double_blocks``/``single_blocks``: the first N double / M single Flux blocks are pinned
    resident (their quantized bytes), or ``first_blocks``: the first N blocks of any family in
    forward order (runtime/blocks.py's table); ``owner``: a token for the caller, whose previous load's
    pins are released."""
    import comfy.sd

    from .loading import comfy_build, wrap_model
    from .ops import vbar_operations

    dq = choice_dtype(dequant_dtype, "dequant_dtype")
    pd = choice_dtype(patch_dtype, "patch_dtype")
    gf = GGUFFile(path)
    arch = gf.architecture
    if arch in TEXT_ARCHS:
        raise GGUFError(path, f"this is a text encoder (architecture '{arch}'), not a diffusion "
                        f"model", "Load it with the VBAR GGUF CLIP Loader")
    if arch is not None and arch not in IMAGE_ARCHS:
        log.warning("%s: unknown GGUF architecture '%s'; letting ComfyUI detect the model",
                    path, arch)
    name = os.path.basename(str(path))
    check_pins(gf.keys(), double_blocks, single_blocks, first_blocks, what=name)
    sd = gguf_state_dict(gf, dequant_dtype=dq)
    retire_pins(owner)
    model = comfy_build(comfy.sd.load_diffusion_model_state_dict, sd,
                        model_options={"custom_operations": vbar_operations()})
    if model is None:
        raise GGUFError(path, f"ComfyUI does not recognise this diffusion model (GGUF "
                        f"architecture {arch or 'not recorded'})",
                        "Check that the file is a diffusion model ComfyUI supports, converted "
                        "with its original (not diffusers) tensor names")
    diffusion = model.model.diffusion_model
    _plain_embeddings(diffusion)
    attach_sources(diffusion)
    pin_blocks(diffusion, double_blocks, single_blocks, what=name, first=first_blocks)
    wrap_model(model, name, source_check=gf.check_unchanged)
    follow_pins(model, name, double_blocks, single_blocks, owner, first=first_blocks)
    dequantize_unmanaged(diffusion)   # anything vbarize did not take (none in known models)
    set_patch_dtype(diffusion, pd)
    return model


def text_encoder_state_dict(gf):
    """State dict of a text-encoder .gguf under ComfyUI's names: llama.cpp's T5 and LLM names
    mapped, its value edits undone, and the tokenizer included where ComfyUI reads it from the
    weights file."""
    arch = gf.architecture
    if arch is not None and arch in IMAGE_ARCHS:
        raise GGUFError(gf.path, f"this is a diffusion model (architecture '{arch}'), not a text "
                        f"encoder", "Load it with the VBAR GGUF Diffusion Model Loader")
    if arch is not None and arch not in SUPPORTED_TEXT_ARCHS:
        raise GGUFError(gf.path, f"text-encoder architecture '{arch}' is not supported by the "
                        f"VBAR GGUF loaders (these are: {', '.join(SUPPORTED_TEXT_ARCHS)})",
                        "Use a safetensors version of this encoder, or ComfyUI-GGUF")
    names = text_encoder_names(arch, gf.keys())
    sd = gguf_state_dict(gf, names)
    if arch in LLM_ARCHS:
        _undo_llama_cpp_edits(gf, arch, sd)
    if _tokenizer_comes_from_file(arch, sd):
        if not has_sentencepiece(gf):
            raise GGUFError(gf.path, "ComfyUI takes this encoder's tokenizer from the file, and "
                            "this GGUF has no sentencepiece vocabulary in its metadata",
                            "Use a GGUF converted with llama.cpp's convert_hf_to_gguf.py (it keeps "
                            "the vocabulary), or the safetensors version")
        sd["spiece_model"] = torch.frombuffer(bytearray(sentencepiece_model(gf)), dtype=torch.uint8)
    if any(".resblocks." in k for k in sd) or "text_projection" in sd:
        # OpenCLIP layout: ComfyUI slices in_proj and transposes text_projection while
        # converting, which needs real values.
        for k in list(sd):
            if "in_proj" in k or k == "text_projection":
                v = sd[k]
                sd[k] = v.dequantize() if hasattr(v, "vbar_decode") else v
    return sd


UMT5_VOCAB = 256384
VISION_LLM_ARCHS = ("qwen2vl", "qwen3vl")


def _tokenizer_comes_from_file(arch, sd):
    """Gemma (Lumina 2) and UMT5 (Wan, ACE) encoders: ComfyUI reads their sentencepiece model
    from the weights file (``spiece_model``), as Comfy-Org's safetensors ship it. Plain T5
    (vocabulary 32128) uses a tokenizer of ComfyUI's own, and must not get one: on a T5-base
    its presence would select ACE's encoder over Stable Audio's."""
    if arch in GEMMA_ARCHS:
        return True
    emb = sd.get("shared.weight")
    return emb is not None and emb.shape[0] == UMT5_VOCAB


def _undo_llama_cpp_edits(gf, arch, sd):
    """Reverse what llama.cpp's converter changes in values, not just names.

    * Llama: Q and K rows are permuted per head (for its interleaved RoPE); the head counts
      come from the file's metadata.
    * Gemma 2/3: norm weights are stored plus one; ComfyUI's Gemma norms add the one at run
      time, like Hugging Face's."""
    if arch == "llama":
        heads = gf.field("llama.attention.head_count")
        if not isinstance(heads, int) or heads <= 0:
            raise GGUFError(gf.path, f"metadata llama.attention.head_count is {heads!r}",
                            "The Q/K weights cannot be put back in order without it; convert "
                            "the model again with llama.cpp's convert_hf_to_gguf.py")
        kv = gf.field("llama.attention.head_count_kv", heads)
        if not isinstance(kv, int) or kv <= 0:
            raise GGUFError(gf.path, f"metadata llama.attention.head_count_kv is {kv!r}",
                            "The K weights cannot be put back in order without it; convert "
                            "the model again with llama.cpp's convert_hf_to_gguf.py")
        for key in list(sd):
            part = key.rsplit(".", 2)[-2:]
            n = {"q_proj": heads, "k_proj": kv}.get(part[0]) if len(part) == 2 else None
            if n is None:
                continue
            try:
                index = llama_unpermute_index(sd[key].shape[0], n)
            except ValueError as e:
                raise GGUFError(gf.path, f"{e} (head counts from metadata: {heads} query, {kv} "
                                f"key/value)", "The metadata does not match the weights",
                                tensor=key) from None
            sd[key] = take_rows(sd[key], index)
    elif arch in GEMMA_ARCHS:
        for key in list(sd):
            if key.endswith("norm.weight"):
                sd[key] = sd[key].float() - 1.0


def load_text_encoders(paths, clip_type="stable_diffusion", embedding_directory=None,
                       model_options=None, progress=None):
    """CLIP from one or more text-encoder files, .gguf and .safetensors mixed.

    ``clip_type``: a CLIPLoader/DualCLIPLoader ``type`` string or a comfy.sd.CLIPType.
    ``model_options``: extra ComfyUI model options (e.g. ``t5xxl_model_config`` in tests).
    ``progress(done, total)``: in tensor elements (a packed GGUF weight counts its bytes) as
    ComfyUI loads them and the token tables are dequantized (default: ComfyUI's progress bar,
    stopping on an interrupt; see progress.py). An interrupt stops the load before any VBAR
    is made."""
    import comfy.model_management as mm
    import comfy.sd

    from .loading import check_supported, comfy_build, open_checked, wrap_clip
    from .ops import vbar_operations
    from .progress import load_progress
    from ..runtime.progress import parameters

    if isinstance(clip_type, str):
        clip_type = getattr(comfy.sd.CLIPType, clip_type.upper(), comfy.sd.CLIPType.STABLE_DIFFUSION)
    sds, checks, no_vision = [], [], []
    for p in paths:
        if str(p).lower().endswith(GGUF_EXT):
            gf = GGUFFile(p)
            checks.append(gf.check_unchanged)
            sds.append(text_encoder_state_dict(gf))
            if gf.architecture in VISION_LLM_ARCHS and not any(k.startswith("visual.") for k in sds[-1]):
                no_vision.append(str(p))
        else:
            sd, _, check = open_checked(p)
            check_supported(sd, p)
            checks.append(check)
            sds.append(sd)
    steps = load_progress(progress, sum(parameters(sd.values()) for sd in sds))
    options = {"custom_operations": vbar_operations(),
               "initial_device": mm.text_encoder_offload_device()}
    options.update(model_options or {})
    clip = comfy_build(
        comfy.sd.load_text_encoder_state_dicts,
        state_dicts=sds, embedding_directory=embedding_directory, clip_type=clip_type,
        model_options=options, steps=steps)
    model = clip.cond_stage_model
    _plain_embeddings(model, steps)
    steps.finish()      # the last point an interrupt stops the load: nothing reserved yet
    attach_sources(model)
    name = "+".join(os.path.basename(str(p)) for p in paths)
    wrap_clip(clip, name, source_check=_check_all(checks))
    dequantize_unmanaged(model)
    if no_vision:
        _refuse_images(model, no_vision[0])
    return clip


def _refuse_images(model, path):
    """A vision-language encoder from GGUF has no vision tower (llama.cpp puts it in a
    separate mmproj file), so ComfyUI's would run on uninitialised weights when a node passes
    images (e.g. Qwen-Image-Edit). Fail loudly instead of encoding garbage."""
    def forward(*args, **kwargs):
        raise GGUFError(path, "image inputs need the vision tower, which this GGUF text encoder "
                        "does not contain (llama.cpp stores it in a separate mmproj file)",
                        "For image editing, load the safetensors version of this text encoder; "
                        "text-only prompts work with this file")

    for name, m in model.named_modules():
        if name.rpartition(".")[2] == "visual":
            m.forward = forward
