"""The bitsandbytes 4-bit state-dict layout, as Flux NF4 checkpoints (lllyasviel v1/v2) store it.

Per quantized Linear ``<prefix>``::

    <prefix>.weight                                     uint8, two codes per byte, 2k high nibble
    <prefix>.weight.absmax                              v2: fp32 per block; v1: uint8 codes
    <prefix>.weight.quant_map                           16 fp32 values
    <prefix>.weight.nested_absmax                       v1 only: fp32 per 256 absmax codes
    <prefix>.weight.nested_quant_map                    v1 only: 256 fp32 values
    <prefix>.weight.quant_state.bitsandbytes__<type>    uint8 bytes of a JSON object

Key names and JSON fields follow bitsandbytes' QuantState.as_dict(packed=True).
"""
import dataclasses
import json
import math
from typing import Optional

import torch

from ..errors import NF4Error
from .kernels import BLOCKSIZES, QUANT_TYPES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HINT = "The file is not a valid bitsandbytes 4-bit checkpoint; re-download or re-export it"


@dataclasses.dataclass
class NF4Weight:
    """One quantized Linear weight, as resident bytes plus the numbers needed to expand it."""

    packed: torch.Tensor  # flat uint8, (numel + 1) // 2 bytes
    absmax: torch.Tensor  # fp32 per block, or uint8 codes when nested
    quant_map: torch.Tensor  # 16 fp32
    nested_absmax: Optional[torch.Tensor]
    nested_quant_map: Optional[torch.Tensor]
    nested_offset: Optional[float]
    blocksize: int
    nested_blocksize: Optional[int]
    shape: torch.Size
    dtype: torch.dtype  # what the weight was before quantization
    quant_type: str
    prefix: str = ""

    @property
    def nested(self):
        return self.nested_absmax is not None

    @property
    def numel(self):
        return math.prod(self.shape)


def _get(tensors, name):
    # A dict, or a lazy reader with keys()/get_tensor() (SafetensorsFile, safetensors' safe_open).
    try:
        present = name in tensors
    except TypeError:  # safe_open supports neither `in` nor []
        present = name in tensors.keys()
    if not present:
        return None
    getter = getattr(tensors, "get_tensor", None)
    return getter(name) if getter is not None else tensors[name]


def _qs_key(tensors, prefix, path):
    base = f"{prefix}.weight.quant_state."
    for qt in QUANT_TYPES:
        if _get(tensors, base + "bitsandbytes__" + qt) is not None:
            return base + "bitsandbytes__" + qt, qt
    others = [k for k in getattr(tensors, "keys", lambda: [])() if k.startswith(base)]
    if others:
        raise NF4Error(path, f"unknown 4-bit quant type in '{others[0]}'",
                       f"Only {', '.join(QUANT_TYPES)} are supported", tensor=others[0])
    raise NF4Error(path, "4-bit weight has no quant_state",
                   f"Expected '{base}bitsandbytes__nf4' (or __fp4). {_HINT}",
                   tensor=f"{prefix}.weight")


def _require(tensors, name, path, why):
    t = _get(tensors, name)
    if t is None:
        raise NF4Error(path, f"missing ({why})", _HINT, tensor=name)
    return t


def _finite(x):
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond float range, e.g. 10**400 from the JSON
        return False


def parse_quant_state(tensors, prefix, path):
    """Read and validate one quantized Linear; ``tensors`` maps names to tensors."""
    if prefix.endswith(".weight"):
        prefix = prefix[: -len(".weight")]
    w = f"{prefix}.weight"
    qs_name, key_type = _qs_key(tensors, prefix, path)

    def fail(problem, tensor=qs_name, hint=_HINT):
        raise NF4Error(path, problem, hint, tensor=tensor)

    try:
        qs = json.loads(bytes(_get(tensors, qs_name).reshape(-1).to(torch.uint8).cpu().numpy().tobytes()))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # deep nesting: RecursionError
        fail(f"quant_state is not valid JSON ({e})")
    if not isinstance(qs, dict):
        fail("quant_state JSON is not an object")
    quant_type = qs.get("quant_type")
    if quant_type not in QUANT_TYPES:
        fail(f"unknown quant_type {quant_type!r}", hint=f"Only {', '.join(QUANT_TYPES)} are supported")
    if quant_type != key_type:
        fail(f"quant_type {quant_type!r} disagrees with the tensor name's '__{key_type}'")
    blocksize = qs.get("blocksize")
    if type(blocksize) is not int or blocksize not in BLOCKSIZES:
        fail(f"blocksize {blocksize!r} is not one bitsandbytes supports {BLOCKSIZES}")
    if not isinstance(qs.get("dtype"), str) or qs["dtype"] not in DTYPES:  # a list is unhashable
        fail(f"dtype {qs.get('dtype')!r} is not one of {sorted(DTYPES)}")
    shape = qs.get("shape")
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d > 0 for d in shape):
        fail(f"shape {shape!r} is not a list of positive integers")
    numel = math.prod(shape)
    if numel >= 2**63:  # torch sizes are int64; a 10^4-digit count would not even print
        fail(f"shape {str(shape)[:200]} has too many elements")

    packed = _require(tensors, w, path, "the packed 4-bit codes")
    if packed.dtype != torch.uint8:  # bnb's quant_storage option: same bytes, other dtype
        packed = packed.reshape(-1).view(torch.uint8)
    packed = packed.reshape(-1)
    if packed.numel() != (numel + 1) // 2:
        fail(f"holds {packed.numel()} bytes but shape {shape} needs {(numel + 1) // 2}", tensor=w)

    nblocks = -(-numel // blocksize)
    absmax = _require(tensors, w + ".absmax", path, "the per-block scales").reshape(-1)
    if absmax.numel() != nblocks:
        fail(f"has {absmax.numel()} entries, expected {nblocks} ({numel} values / blocksize {blocksize})",
             tensor=w + ".absmax")
    quant_map = _require(tensors, w + ".quant_map", path, "the 16-value code table").reshape(-1)
    if quant_map.numel() != 16:
        fail(f"has {quant_map.numel()} values, a 4-bit code table has 16", tensor=w + ".quant_map")
    # The values themselves are not checked: bnb's kernels ignore them and decode with their
    # builtin table, and so do we, so a file decodes here exactly as it does under bnb.

    nested = dict(nested_absmax=None, nested_quant_map=None, nested_offset=None, nested_blocksize=None)
    if _get(tensors, w + ".nested_absmax") is not None or "nested_offset" in qs:
        nbs = qs.get("nested_blocksize")
        if type(nbs) is not int or not 0 < nbs < 2**63:  # torch's view() takes int64 sizes
            fail(f"nested_blocksize {nbs!r} is not a positive integer")
        offset = qs.get("nested_offset")
        if not isinstance(offset, (int, float)) or isinstance(offset, bool) or not _finite(offset):
            fail(f"nested_offset {offset!r} is not a finite number")
        if qs.get("nested_dtype", "float32") != "float32":
            fail(f"nested_dtype {qs.get('nested_dtype')!r} is not 'float32'")
        n_abs = _require(tensors, w + ".nested_absmax", path, "scales of the 8-bit absmax").reshape(-1)
        want = -(-nblocks // nbs)
        if n_abs.numel() != want:
            fail(f"has {n_abs.numel()} entries, expected {want} ({nblocks} absmax / {nbs})",
                 tensor=w + ".nested_absmax")
        n_map = _require(tensors, w + ".nested_quant_map", path, "the 8-bit absmax code table").reshape(-1)
        if n_map.numel() != 256:
            fail(f"has {n_map.numel()} values, an 8-bit code table has 256", tensor=w + ".nested_quant_map")
        if absmax.dtype != torch.uint8:
            fail(f"is {absmax.dtype} but a nested (v1) file stores uint8 codes here", tensor=w + ".absmax")
        nested = dict(nested_absmax=n_abs, nested_quant_map=n_map, nested_offset=float(offset),
                      nested_blocksize=nbs)
    elif not absmax.is_floating_point():
        fail(f"is {absmax.dtype} codes but the file has no nested_absmax/nested_offset to decode them",
             tensor=w + ".absmax")

    return NF4Weight(packed=packed, absmax=absmax, quant_map=quant_map, blocksize=blocksize,
                     shape=torch.Size(shape), dtype=DTYPES[qs["dtype"]], quant_type=quant_type,
                     prefix=prefix, **nested)


def quant_state_blob(w):
    """The JSON bytes bnb writes, field order included (QuantState.as_dict(packed=True))."""
    d = {"quant_type": w.quant_type, "blocksize": w.blocksize,
         "dtype": str(w.dtype).replace("torch.", ""), "shape": list(w.shape)}
    if w.nested:
        d.update(nested_blocksize=w.nested_blocksize, nested_dtype="float32", nested_offset=w.nested_offset)
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def state_dict_entries(prefix, w):
    """What ``bnb.nn.Linear4bit`` saves for its weight: name -> tensor, ready for safetensors."""
    p = f"{prefix}.weight"
    out = {p: w.packed.reshape(-1, 1), p + ".absmax": w.absmax, p + ".quant_map": w.quant_map}
    if w.nested:
        out[p + ".nested_absmax"] = w.nested_absmax
        out[p + ".nested_quant_map"] = w.nested_quant_map
    out[f"{p}.quant_state.bitsandbytes__{w.quant_type}"] = quant_state_blob(w)
    return out
