"""NF4/FP4 Linear weights behind a VBAR: state dicts in, decoding layers out. No ComfyUI here.

A bitsandbytes 4-bit checkpoint stores, per Linear, uint8 packed codes whose shape is not the
layer's. ``split_nf4_state_dict`` parses them and gives back a *logical* state dict in which
each such weight is a meta tensor of the real shape and dtype: model detection, parameter
counts and shape checks see the model as it was before quantization, and nothing is allocated.
``attach_nf4`` then tells each Linear to store its packed bytes (not the meta tensor) in the
VBAR via ``vbarize``'s ``vbar_sources`` hook.

Per quantized weight the store holds two slots, the packed codes and the per-block absmax,
next to each other in priority order; both are zero-copy views of the file until faulted. The
decode runs on the device at every use: absmax is faulted too (v1's nested 8-bit absmax is
expanded with its tiny scale tables, kept on the device), then ``dequantize_nf4`` writes the
weight in the dtype it had before quantization (bnb's CUDA kernel when available, torch
otherwise) and it is cast to the compute dtype. LoRA patches apply after, on that copy.
"""
import dataclasses
import logging

import torch

from ..errors import NF4Error
from .codec import dequantize_nf4, parse_quant_state, quantize_nf4

log = logging.getLogger("vbar")

_AUX = (".weight.absmax", ".weight.quant_map", ".weight.nested_absmax", ".weight.nested_quant_map")
_QS = ".weight.quant_state."
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def nf4_prefixes(keys):
    """Layer prefixes that carry 4-bit companions (quant_state, absmax...) in ``keys``."""
    found = set()
    for k in keys:
        i = k.find(_QS)
        if i >= 0:
            found.add(k[:i])
            continue
        for aux in _AUX:
            if k.endswith(aux):
                found.add(k[: -len(aux)])
    return sorted(found)


def split_nf4_state_dict(sd, path):
    """(logical state dict, {layer prefix: NF4Weight}) for a state dict of ``path``.

    Raises NF4Error (naming file and tensor) for a malformed 4-bit layer: missing quant_state,
    unknown quant type, bad blocksize, byte counts that do not match the stated shape...
    """
    weights = {p: parse_quant_state(sd, p, path) for p in nf4_prefixes(sd.keys())}
    if not weights:
        return sd, {}
    consumed = set()
    for p in weights:
        consumed.add(p + ".weight")
        consumed.update(p + aux for aux in _AUX)
    logical = {}
    for k, t in sd.items():
        if k in consumed or _QS in k:
            continue
        logical[k] = t
    for p, w in weights.items():
        # The shape and dtype the layer had: what ComfyUI's detection and counts should see.
        logical[p + ".weight"] = torch.empty(w.shape, dtype=w.dtype, device="meta")
    return logical, weights


def quantize_linears(model, include=None, blocksize=64, compress_statistics=False,
                     quant_type="nf4", device=None, progress=None):
    """Quantize every float Linear weight of ``model`` ({name: NF4Weight}, host tensors).

    The layout is bitsandbytes' (v2 when ``compress_statistics`` is False: fp32 absmax),
    identical to what ``nf4_state_dict_entries`` would write into a file. ``device``: where to
    run the quantizer (CUDA is ~100x faster than the CPU); results come back to the host.
    ``progress(done, total)``: called before the first weight and after each one, in
    parameters; it may raise to stop (e.g. the user interrupted), and then nothing is returned:
    the model is left as it was (its weights are only read).
    """
    out = {}
    skipped = set()
    todo = []
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or (include is not None and not include(name, m)):
            continue
        w = m.weight
        if w is None or w.is_meta:
            continue
        if w.dtype not in FLOAT_DTYPES:
            skipped.add(str(w.dtype))
            continue
        todo.append((name, w))
    total, done = sum(w.numel() for _, w in todo), 0
    if progress is not None:
        progress(0, total)
    for name, w in todo:
        src = w.detach().to(device) if device is not None else w.detach()
        q = quantize_nf4(src, blocksize=blocksize, compress_statistics=compress_statistics,
                         quant_type=quant_type, prefix=name)
        if q.packed.device.type != "cpu":
            q = dataclasses.replace(q, packed=q.packed.cpu(), absmax=q.absmax.cpu(),
                                    quant_map=q.quant_map.cpu(),
                                    nested_absmax=None if not q.nested else q.nested_absmax.cpu(),
                                    nested_quant_map=None if not q.nested else q.nested_quant_map.cpu())
        out[name] = q
        done += w.numel()
        if progress is not None:
            progress(done, total)
    if skipped:
        log.warning("quantize on load: Linear weights stored as %s were left as they are "
                    "(only float32/float16/bfloat16 are quantized)", ", ".join(sorted(skipped)))
    return out


def attach_nf4(model, weights, path, prefix=""):
    """Point the Linear layers of ``model`` at their 4-bit weights (keys ``prefix + name``).

    Checks that every 4-bit weight belongs to a Linear of the model with the same shape.
    Returns the number of layers attached. Call before ``vbarize``.
    """
    modules = dict(model.named_modules())
    n = 0
    for key, w in weights.items():
        tensor = key + ".weight"
        if not key.startswith(prefix):
            raise NF4Error(path, "4-bit weight outside the diffusion model (text encoder or VAE): "
                                 "VBAR NF4 loaders quantize diffusion models only",
                           "Use a checkpoint whose text encoders are fp16/bf16/fp8", tensor=tensor)
        m = modules.get(key[len(prefix):])
        if not isinstance(m, torch.nn.Linear):
            what = "no such layer" if m is None else f"a {type(m).__name__}, not a Linear"
            raise NF4Error(path, f"4-bit weight for a layer the model does not have as a Linear "
                                 f"({what})",
                           "The file does not match the model ComfyUI detected; re-download it",
                           tensor=tensor)
        want = (m.out_features, m.in_features)
        if tuple(w.shape) != want:
            raise NF4Error(path, f"quant_state shape {list(w.shape)} does not match the model's "
                                 f"Linear [{want[0]}, {want[1]}] (out, in)",
                           "The file is damaged or made for another model", tensor=tensor)
        m.vbar_sources = {**(getattr(m, "vbar_sources", None) or {}), "weight": nf4_source(w)}
        n += 1
    return n


def nf4_source(w):
    """A ``vbar_sources`` entry: ``add(store, key, hold) -> handle`` for one NF4Weight."""

    def add(store, key, hold):
        scales = []
        h = store.add(key, w.packed.reshape(-1), decode=_decoder(store, w, scales), shape=w.shape,
                      hold=hold)
        # Right after the codes: same priority, faulted together.
        scales.append(store.add(key + ".absmax", w.absmax.reshape(-1), store_dtype=w.absmax.dtype,
                                hold=hold))
        return h

    return add


def _decoder(store, w, scales):
    tables = {}   # device -> v1's nested absmax scales and code table (a few KiB)

    def decode(packed, dtype):
        device = packed.device
        with store.use(scales[0], device, w.absmax.dtype) as absmax:
            extra = {}
            if w.nested:
                t = tables.get(device)
                if t is None:
                    t = tables[device] = (w.nested_absmax.to(device, torch.float32),
                                          w.nested_quant_map.to(device, torch.float32))
                extra = dict(nested_absmax=t[0], nested_quant_map=t[1])
            on_device = dataclasses.replace(w, packed=packed, absmax=absmax, **extra)
            # Expand in the dtype the weight had before quantization, as a file of the
            # dequantized weights would hold it, then cast like ComfyUI casts any weight.
            out = dequantize_nf4(on_device, w.dtype, device=device)
        return out if dtype == out.dtype else out.to(dtype)

    return decode


def dequantized_state_dict(sd, path):
    """The state dict with every 4-bit weight expanded to its original dtype (a reference)."""
    logical, weights = split_nf4_state_dict(sd, path)
    out = dict(logical)
    for p, w in weights.items():
        out[p + ".weight"] = dequantize_nf4(w, w.dtype, device="cpu")
    return out
