"""bitsandbytes NF4/FP4 weights without bitsandbytes: parse, dequantize, quantize.

Layers keep ``NF4Weight.packed`` (+ scales) resident and call ``dequantize_nf4`` on the
compute device each forward. On CPU the result is bit-identical to
``bitsandbytes.functional.dequantize_4bit``; on CUDA bitsandbytes' kernel is used if it
is installed (same arithmetic: fp32 product, one rounding into the output dtype).
"""
import functools

import torch

from . import kernels as K
from .format import DTYPES, NF4Weight, parse_quant_state, quant_state_blob, state_dict_entries

__all__ = [
    "NF4Weight", "parse_quant_state", "dequantize_nf4", "absmax_f32", "quantize_nf4",
    "nf4_state_dict_entries", "quant_state_blob", "DTYPES",
]


def absmax_f32(w, device=None):
    """Per-block fp32 scales; for nested (v1) files, decodes the 8-bit absmax first."""
    device = torch.device(device) if device is not None else w.absmax.device
    if not w.nested:
        return w.absmax.to(device=device, dtype=torch.float32)
    vals = K.dequantize_blockwise_8bit(
        w.absmax.to(device), w.nested_absmax.to(device, torch.float32),
        w.nested_quant_map.to(device, torch.float32), w.nested_blocksize)
    return vals.add_(_offset(w.nested_offset, device))


@functools.lru_cache(maxsize=64)
def _offset(value, device):
    # fp32 tensor, not a Python float: the add must round in fp32, as bnb's does. Cached: it is
    # needed at every forward of a v1 weight, and on CUDA making it is a host-to-device copy.
    with torch.inference_mode(False):   # usable both inside and outside inference mode
        return torch.tensor(value, dtype=torch.float32, device=device)


_bnb = []


def _bnb_functional():
    # Imported on first use only: bnb is optional and slow to import.
    if not _bnb:
        try:
            import bitsandbytes.functional as F
            _bnb.append(F)
        except Exception:  # missing, or built without this GPU's kernels
            _bnb.append(None)
    return _bnb[0]


def dequantize_nf4(w, dtype=None, device=None, out=None, chunk=None, use_bnb=True):
    """Expand ``w`` to a dense ``w.shape`` tensor of ``dtype`` (default: ``w.dtype``) on ``device``."""
    dtype = dtype or w.dtype
    device = torch.device(device) if device is not None else w.packed.device
    packed = w.packed.to(device, non_blocking=True)
    absmax = absmax_f32(w, device)
    if out is not None and (out.shape != w.shape or out.dtype != dtype or out.device != device
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {tuple(w.shape)} on {device}")
    if use_bnb and device.type in ("cuda", "cpu") and packed.numel() > 1 \
            and _bnb_functional() is not None:
        F = _bnb_functional()
        # bnb's CPU kernel picks the wrong scale when the last dimension is not a multiple of
        # the blocksize; a flat shape avoids that (it then indexes blocks by position, like
        # ours) but runs slower, so it is used only where needed.
        shape = w.shape if w.shape and w.shape[-1] % w.blocksize == 0 else torch.Size([w.numel])
        qs = F.QuantState(absmax=absmax, shape=shape, dtype=dtype,
                          blocksize=w.blocksize, quant_type=w.quant_type)
        flat_out = out.view(shape) if out is not None else None
        res = F.dequantize_4bit(packed.view(-1, 1), qs, out=flat_out)
        return out if out is not None else res.view(w.shape)
    if out is None:
        out = torch.empty(w.shape, dtype=dtype, device=device)
    K.dequantize_4bit(packed, absmax, w.quant_type, w.numel, w.blocksize, dtype, out=out, chunk=chunk)
    return out


def quantize_nf4(weight, blocksize=64, compress_statistics=True, quant_type="nf4", prefix=""):
    """Quantize as ``bnb.functional.quantize_4bit`` on CPU does; v1 (nested) when compress_statistics."""
    if quant_type not in K.QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {K.QUANT_TYPES}, got {quant_type!r}")
    if blocksize not in K.BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {K.BLOCKSIZES}, got {blocksize}")
    if weight.dtype not in DTYPES.values():
        raise ValueError(f"weight must be float32/float16/bfloat16, got {weight.dtype}")
    packed, absmax = K.quantize_4bit(weight, blocksize, quant_type)
    code = K.code_table(quant_type, weight.device).clone()
    nested = dict(nested_absmax=None, nested_quant_map=None, nested_offset=None, nested_blocksize=None)
    if compress_statistics:
        offset = absmax.mean()
        codes, n_abs = K.quantize_blockwise_8bit(absmax - offset, K.NESTED_BLOCKSIZE)
        nested = dict(nested_absmax=n_abs, nested_quant_map=K.dynamic_map().to(weight.device).clone(),
                      nested_offset=offset.item(), nested_blocksize=K.NESTED_BLOCKSIZE)
        absmax = codes
    return NF4Weight(packed=packed, absmax=absmax, quant_map=code, blocksize=blocksize,
                     shape=weight.shape, dtype=weight.dtype, quant_type=quant_type, prefix=prefix, **nested)


def nf4_state_dict_entries(prefix, weight, **quantize_kwargs):
    """State-dict entries for one Linear: from an NF4Weight, or a float tensor to quantize."""
    if not isinstance(weight, NF4Weight):
        weight = quantize_nf4(weight, prefix=prefix, **quantize_kwargs)
    return state_dict_entries(prefix, weight)
