"""GGUF tensors as model weights: packed bytes that look like the weight they encode.

A quantized weight is a ``GGUFWeight``: a uint8 tensor holding the packed blocks (zero-copy, in
the file mapping) whose ``.shape`` is the *logical* shape. ComfyUI's model detection, LoRA key
maps and ``load_state_dict`` shape checks read ``.shape``, so they see the model they expect,
while memory accounting (``numel() * element_size()``) sees the true packed size.

``attach_sources`` gives each layer holding one a ``vbar_sources`` hook, so ``vbarize`` puts the
packed bytes (``vbar_packed``) in the VBAR slot and the layer gets ``vbar_decode(bytes on device,
dtype)`` at every use. Anything else that reads the values (a stock ``param.copy_(w)``,
``w.to(float dtype)``, ``w.float()``) gets them dequantized; every other torch call sees the raw
bytes, so never compute with one directly.
"""
import logging

import torch

from . import dequant
from ..errors import GGUFError

log = logging.getLogger("vbar")

DEQUANT_CHOICES = ("default", "target", "float32", "float16", "bfloat16")


def choice_dtype(choice, what="dtype"):
    """A node's dtype choice: None for "default", "target" for "target", else a torch dtype."""
    if choice in (None, "default"):
        return None
    if choice not in DEQUANT_CHOICES:
        raise ValueError(f"{what} {choice!r}: use one of {', '.join(DEQUANT_CHOICES)}")
    return "target" if choice == "target" else getattr(torch, choice)


class Decoder:
    """``decode(packed bytes on any device, dtype) -> logical weight`` for one tensor.

    Which dtype the values are dequantized in before the cast to the requested one:
    * ``dequant_dtype=None`` ("default"): ``weight_dtype``, the dtype ComfyUI would have stored
      this layer's weights in (set by ``attach_sources``), so results match a stock model
      loaded from the dequantized weights bit for bit; the requested dtype if unknown;
    * ``"target"``: the requested (compute) dtype directly: one rounding, most precise;
    * a torch dtype: that one.
    Our kernels compute in float32 and round once at the end, whichever is chosen.
    """

    __slots__ = ("qtype", "stored_shape", "shape", "dequant_dtype", "weight_dtype", "fast")

    def __init__(self, qtype, stored_shape, shape, dequant_dtype=None):
        self.qtype = qtype
        self.stored_shape = tuple(stored_shape)
        self.shape = torch.Size(shape)
        self.dequant_dtype = dequant_dtype
        self.weight_dtype = None
        self.fast = qtype in dequant.QTYPE_BLOCK

    def __call__(self, raw, dtype):
        dq = self.dequant_dtype
        if dq is None:
            dq = self.weight_dtype or dtype
        elif dq == "target":
            dq = dtype
        kernel_dtype = dq if dq in dequant.OUT_DTYPES else torch.float32
        if self.fast:
            # Dequantize in the stored shape: a tensor flattened into rows of whole blocks
            # (orig_shape) has a logical last dimension that is no multiple of the block.
            w = dequant.dequantize(raw, self.qtype, self.stored_shape, kernel_dtype)
        else:
            w = _reference_dequantize(raw, self.qtype, self.stored_shape, kernel_dtype)
        if dq != kernel_dtype:
            w = w.to(dq)   # e.g. an fp8 weight dtype: round through it, as ComfyUI would
        return w.view(self.shape).to(dtype)


def _reference_dequantize(raw, qtype, stored_shape, dtype):
    """gguf-py's numpy dequantizer, for types without a torch kernel: slow (host round trip
    at every use) but exact."""
    import gguf
    import numpy as np

    arr = raw.detach().to("cpu").contiguous().view(torch.uint8).numpy()
    out = gguf.quants.dequantize(arr.reshape(-1), qtype)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).view(
        stored_shape).to(device=raw.device, dtype=dtype)


def _reference_supported(qtype):
    import gguf
    import numpy as np

    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros(ts, dtype=np.uint8), qtype)
        return True
    except (NotImplementedError, ValueError, KeyError, TypeError, AttributeError):
        return False


class GGUFWeight(torch.Tensor):
    """Packed GGUF blocks presenting the logical shape; see the module docstring."""

    @staticmethod
    def __new__(cls, packed, decoder):
        t = torch.Tensor._make_subclass(cls, packed, False)
        t.vbar_packed = packed
        t.vbar_decode = decoder
        return t

    def __init__(self, packed, decoder):   # noqa: D401 - attributes set in __new__
        super().__init__()

    @property
    def shape(self):
        return self.vbar_decode.shape

    def size(self, dim=None):
        return self.vbar_decode.shape if dim is None else self.vbar_decode.shape[dim]

    def dim(self):
        return len(self.vbar_decode.shape)

    @property
    def ndim(self):
        return len(self.vbar_decode.shape)

    @property
    def qtype(self):
        return self.vbar_decode.qtype

    def dequantize(self, dtype=torch.float32, device=None):
        raw = self.vbar_packed if device is None else self.vbar_packed.to(device)
        return self.vbar_decode(raw, dtype)

    def __repr__(self, *args, **kwargs):
        return (f"GGUFWeight({self.vbar_decode.qtype.name}, shape={tuple(self.shape)}, "
                f"{self.vbar_packed.numel()} bytes)")

    def __reduce_ex__(self, proto):
        raise TypeError("GGUFWeight is a view of a model file and cannot be pickled")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        special = _SPECIAL.get(func)
        if special is not None:
            out = special(*args, **kwargs)
            if out is not NotImplemented:
                return out
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _rewrap(self, packed=None):
    return GGUFWeight(self.vbar_packed if packed is None else packed, self.vbar_decode)


def take_rows(t, index):
    """``t`` with its first-dimension rows reordered by ``index``: a GGUFWeight's packed rows
    are moved whole (a row is whole blocks), so it stays quantized. A copy in RAM."""
    if isinstance(t, GGUFWeight):
        return _rewrap(t, t.vbar_packed.index_select(0, index))
    return t.index_select(0, index)


def _detach(self):
    # nn.Parameter(w) and state_dict() detach: keep it a GGUFWeight with its logical shape.
    return _rewrap(self)


def _copy_into(dst, src, non_blocking=False):
    if isinstance(dst, GGUFWeight):
        raise TypeError("cannot write into a GGUFWeight (it is a view of the model file)")
    if isinstance(src, GGUFWeight):
        # A stock module loading a quantized tensor into an ordinary parameter.
        return dst.copy_(src.dequantize(dst.dtype if dst.is_floating_point() else torch.float32,
                                        dst.device))
    return NotImplemented


def _parse_to(self, *args, **kwargs):
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, (str, torch.device)):
            device = a
        elif isinstance(a, torch.Tensor):
            device, dtype = a.device, a.dtype
    return device, dtype


def _to(self, *args, **kwargs):
    device, dtype = _parse_to(self, *args, **kwargs)
    if dtype is not None and dtype != torch.uint8:
        return self.dequantize(dtype, device)
    if device is not None and torch.device(device) != self.device:
        return _rewrap(self, self.vbar_packed.to(device))
    return self


def _empty_like(self, *args, dtype=None, device=None, **kwargs):
    if not isinstance(self, GGUFWeight):
        return NotImplemented
    return torch.empty(self.shape, dtype=dtype or torch.float32, device=device or self.device)


_SPECIAL = {
    torch.Tensor.detach: _detach,
    torch.Tensor.copy_: _copy_into,
    torch.Tensor.to: _to,
    torch.Tensor.float: lambda self: self.dequantize(torch.float32),
    torch.Tensor.half: lambda self: self.dequantize(torch.float16),
    torch.Tensor.bfloat16: lambda self: self.dequantize(torch.bfloat16),
    torch.empty_like: _empty_like,
}


def is_gguf_weight(t):
    return isinstance(t, GGUFWeight)


def model_tensor(gf, name, dequant_dtype=None, shape_dequant_dtype=torch.float32):
    """The value to put in a state dict for tensor ``name`` of GGUFFile ``gf``:

    * float/int types: the typed zero-copy view;
    * quantized 2-D+ tensors: a GGUFWeight;
    * quantized 0/1-D tensors (norms, biases, which real converters keep in F32 anyway):
      dequantized once to ``shape_dequant_dtype``, since ComfyUI reads some of them directly
      (e.g. T5's final norm dtype picks the encoder dtype).
    Types without any dequantizer raise GGUFError naming the type and tensor.
    """
    info = gf.info(name)
    if not info.quantized:
        return gf.tensor(name)
    qt = info.qtype
    if qt not in dequant.QTYPE_BLOCK and not _reference_supported(qt):
        raise GGUFError(gf.path, f"quantization type {qt.name} cannot be dequantized",
                        "Supported: " + ", ".join(q.name for q in dequant.QTYPE_BLOCK)
                        + " (others only if the gguf package can dequantize them). Re-quantize "
                        "the model", tensor=name)
    dec = Decoder(qt, info.stored_shape, info.shape, dequant_dtype)
    w = GGUFWeight(gf.raw(name), dec)
    if len(info.shape) <= 1:
        return w.dequantize(shape_dequant_dtype)
    return w


def gguf_state_dict(gf, names=None, dequant_dtype=None):
    """{name: value} for the tensors of ``gf`` (``names``: {gguf name: output name} to rename
    or select). Logs the quantization types found and warns about slow fallbacks."""
    gf.check_unchanged()
    names = names if names is not None else {n: n for n in gf.keys()}
    counts = gf.qtype_counts()
    log.info("%s: GGUF v%d, arch %s, tensors: %s", gf.path, gf.version, gf.architecture,
             ", ".join(f"{k} ({v})" for k, v in counts.items()))
    slow = sorted({gf.info(n).qtype.name for n in names if gf.info(n).quantized
                   and gf.info(n).qtype not in dequant.QTYPE_BLOCK})
    if slow:
        log.warning("%s: %s tensors have no torch dequantizer; using gguf's numpy reference "
                    "(slow: every use round-trips through the CPU)", gf.path, "/".join(slow))
    return {out: model_tensor(gf, name, dequant_dtype) for name, out in names.items()}


def dequantize_unmanaged(module, default_dtype=torch.float32):
    """Replace GGUFWeight parameters that are not read through a VBAR slot with ordinary
    tensors (dequantized once, in the layer's ``vbar_store_dtype``). Returns the count."""
    n = 0
    for m in module.modules():
        handles = getattr(m, "_vbar_handles", None) or {}
        for pname, p in list(m._parameters.items()):
            if isinstance(p, GGUFWeight) and pname not in handles:
                dtype = getattr(m, "vbar_store_dtype", None)
                if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                    dtype = default_dtype
                m._parameters[pname] = torch.nn.Parameter(p.dequantize(dtype), requires_grad=False)
                n += 1
    return n


def attach_sources(module):
    """Tell ``vbarize`` how to add each GGUFWeight parameter: its packed bytes plus its decoder
    (the ``vbar_sources`` loader hook), and tell each decoder the dtype ComfyUI chose for the
    layer's weights (``vbar_store_dtype``). Returns the number of quantized weights."""
    n = 0
    for m in module.modules():
        for pname, p in m._parameters.items():
            if isinstance(p, GGUFWeight):
                store_dtype = getattr(m, "vbar_store_dtype", None)
                if isinstance(store_dtype, torch.dtype) and store_dtype.is_floating_point:
                    p.vbar_decode.weight_dtype = store_dtype
                sources = m.__dict__.setdefault("vbar_sources", {})
                sources[pname] = _source_adder(p)
                n += 1
    return n


def _source_adder(p):
    packed, decoder = p.vbar_packed, p.vbar_decode

    def add(store, key, hold):
        return store.add(key, packed, decode=decoder, shape=tuple(decoder.shape), hold=hold)

    return add


def set_patch_dtype(module, dtype):
    """LoRA and other patches on quantized weights are held in ``dtype`` (None: the dtype
    ComfyUI would store the weight in; "target": the dtype the layer computes in)."""
    for m in module.modules():
        handles = getattr(m, "_vbar_handles", None) or {}
        if any(h.decode is not None for h in handles.values()):
            m.vbar_patch_dtype = dtype
