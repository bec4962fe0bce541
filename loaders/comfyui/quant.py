"""Quantized safetensors (scaled fp8, ComfyUI ``comfy_quant``) as VBAR-backed layers.

The VBAR slot of a quantized Linear holds what the file stores (fp8 / int8 / 4-bit data; block
scales in a second slot right after it, scalar scales kept on the device), so a resident layer
costs its stored size. Every use rebuilds ComfyUI's own ``QuantizedTensor`` over the slot and
computes exactly as the running ComfyUI's layer would:

* ComfyUI 0.33+ (``comfy.quant_ops``, ``mixed_precision_ops``): formats its device cannot run
  natively (``pick_operations``' "emulated" set, or ``full_precision_matrix_mult``) are
  dequantized by the layout's own ``dequantize`` in the input dtype; native ones quantize the
  input and run ComfyUI's quantized matmul (fp8 ``_scaled_mm`` on CUDA), weight-only formats
  (int8) go through the layout's ``linear``. A LoRA patch is applied to the weight dequantized
  in ComfyUI's LoRA dtype, then requantized with ComfyUI's ``requantize_from_float`` (seeded
  stochastic rounding, as its ``set_weight`` does) and dequantized for use.
* ComfyUI 0.3.x (``scaled_fp8_ops``): every Linear holds the marker's fp8 dtype and multiplies
  weight or input by ``scale_weight`` as its forward does; LoRA goes through that class's own
  ``convert_weight``/``set_weight``.

Imports ComfyUI only inside functions.
"""
import functools
import logging
import types

import torch
import torch.nn.functional as F

from ..errors import QuantError
from ..quant.comfy_quant import find_layers, logical_state_dict

log = logging.getLogger("vbar")



def flavor():
    """"mixed": ComfyUI 0.33+ (comfy_quant + scaled_fp8); "scaled_fp8": 0.3.x; None: neither."""
    try:
        import comfy.quant_ops as q
        if hasattr(q, "QUANT_ALGOS"):
            return "mixed"
    except ImportError:
        pass
    import comfy.ops

    return "scaled_fp8" if hasattr(comfy.ops, "scaled_fp8_ops") else None


class Prepared:
    """What ``prepare`` found: the state dict for ComfyUI, the quantized layers, how to attach."""

    def __init__(self, path, logical, layers, kind, marker_dtype=None):
        self.path, self.logical, self.layers, self.kind = path, logical, layers, kind
        self.marker_dtype = marker_dtype

    def __bool__(self):
        return bool(self.layers)


def prepare(sd, path, metadata=None, model_prefix=""):
    """Find the quantized layers of a state dict and check this ComfyUI can load them.

    Returns a ``Prepared`` (falsy when nothing is quantized). Raises QuantError naming the file,
    layer and format for anything the running ComfyUI or the pack does not load."""
    layers, markers = find_layers(sd, path, metadata)
    if not layers:
        return Prepared(path, sd, {}, None)
    outside = [p for p in layers if not p.startswith(model_prefix)]
    if outside:
        L = layers[outside[0]]
        raise QuantError(path, f"layer '{L.prefix}' ({L.format}) is quantized outside the diffusion "
                         f"model (text encoder or VAE): VBAR loaders load quantized diffusion-model "
                         f"layers only", "Use ComfyUI's stock loader for this file, or a version "
                         "with bf16/fp16 text encoders", tensor=L.prefix + ".weight")
    kind = flavor()
    if kind == "mixed":
        from comfy.quant_ops import QUANT_ALGOS

        for L in layers.values():
            if L.format not in QUANT_ALGOS:
                raise QuantError(path, f"layer '{L.prefix}' uses quantization format '{L.format}', "
                                 f"which this ComfyUI does not define (it knows: "
                                 f"{', '.join(QUANT_ALGOS)})", "Update ComfyUI (and comfy_kitchen), "
                                 "or use another version of the model", tensor=L.prefix + ".comfy_quant")
            if L.format not in SUPPORTED:
                raise QuantError(path, f"layer '{L.prefix}' uses quantization format '{L.format}', "
                                 f"which VBAR loaders do not load yet (they load: "
                                 f"{', '.join(SUPPORTED)})", "Use ComfyUI's stock loader for this file",
                                 tensor=L.prefix + ".comfy_quant")
        return Prepared(path, logical_state_dict(sd, layers, markers, keep_markers=False),
                        layers, kind)
    fmts = sorted({L.format for L in layers.values()})
    if kind == "scaled_fp8" and all(L.origin == "scaled_fp8" for L in layers.values()):
        if len(markers) != 1:
            raise QuantError(path, f"{len(markers)} scaled_fp8 markers ({', '.join(markers)})",
                             "ComfyUI 0.3.x loads one scaled-fp8 model per file", tensor=markers[0])
        dtype = sd[markers[0]].dtype
        dtype = torch.float8_e4m3fn if dtype == torch.float32 else dtype
        drop = {f"{p}.{s}" for p in layers for s in ("scale_weight", "scale_input")}
        logical = {k: t for k, t in sd.items() if k not in drop}
        return Prepared(path, logical, layers, kind, marker_dtype=dtype)
    L = next(L for L in layers.values() if L.origin != "scaled_fp8")
    raise QuantError(path, f"this ComfyUI predates per-layer quantization (comfy_quant, format "
                     f"{', '.join(fmts)}), so even its own loader cannot compute this file",
                     "Update ComfyUI to 0.33 or newer", tensor=L.prefix + ".weight")


# --- ComfyUI 0.33+: comfy_quant layers -----------------------------------------------------------
SUPPORTED = ("float8_e4m3fn", "float8_e5m2", "nvfp4", "mxfp8", "int8_tensorwise", "convrot_w4a4",
             "asym_w4a8_int8")
# file companion -> (Params field, dtype ComfyUI views it as, required) per format, as
# comfy.ops._load_quantized_module reads them.
_SCALES = {
    "float8_e4m3fn": {"weight_scale": ("scale", None, False)},
    "float8_e5m2": {"weight_scale": ("scale", None, False)},
    "mxfp8": {"weight_scale": ("scale", torch.float8_e8m0fnu, True)},
    "nvfp4": {"weight_scale_2": ("scale", None, True),
              "weight_scale": ("block_scale", torch.float8_e4m3fn, True)},
    "int8_tensorwise": {"weight_scale": ("scale", None, True)},
    "convrot_w4a4": {"weight_scale": ("scale", None, True)},
    # 4-bit weight packed in int8, fp8 scales per group, fp32 per channel, and an optional
    # 16-entry codebook (ComfyUI passes None for a missing channel scale or codebook).
    "asym_w4a8_int8": {"weight_s_rel": ("scale", torch.float8_e4m3fn, True),
                       "weight_s_channel": ("s_channel", None, False),
                       "weight_codebook": ("codebook", None, False)},
}
_CODEBOOK = ((16,), torch.float32)   # one value per 4-bit code


def _extra_params(fmt, conf):
    """Non-tensor Params fields, read from the layer's JSON as ComfyUI reads them."""
    params = conf.get("params", {})
    params = params if isinstance(params, dict) else {}
    get = lambda k, d: conf.get(k, params.get(k, d))  # noqa: E731
    if fmt == "int8_tensorwise" and get("convrot", False):
        return {"convrot": True, "convrot_groupsize": int(get("convrot_groupsize", 256))}
    if fmt == "convrot_w4a4":
        return {"convrot_groupsize": int(get("convrot_groupsize", 256)), "quant_group_size": 64,
                "linear_dtype": get("linear_dtype", "int4")}
    if fmt == "asym_w4a8_int8":
        return {"group_size": int(get("group_size", 16)),
                "convrot_groupsize": int(get("convrot_groupsize", 256))}
    return {}


@functools.lru_cache(maxsize=None)
def _expected(fmt, shape, extra_items):
    """(storage shape, storage dtype, {Params field: (shape, dtype)}) ComfyUI's own quantizer
    gives a weight of ``shape`` in format ``fmt``, computed on the meta device (free)."""
    from comfy.quant_ops import QUANT_ALGOS, get_layout_class

    layout = get_layout_class(QUANT_ALGOS[fmt]["comfy_tensor_layout"])
    extra = dict(extra_items)
    kw = {"convrot_groupsize": extra["convrot_groupsize"]} if fmt == "convrot_w4a4" else {}
    if fmt == "asym_w4a8_int8":
        # Choosing a codebook reads the values (not possible on meta); its shape is fixed.
        kw = dict(extra, codebook=False)
    q, params = layout.quantize(torch.zeros(shape, dtype=torch.bfloat16, device="meta"), **kw)
    fields = {k: (tuple(v.shape), v.dtype) for k, v in vars(params).items()
              if isinstance(v, torch.Tensor)}
    if fmt == "asym_w4a8_int8":
        fields["codebook"] = _CODEBOOK
    return tuple(q.shape), QUANT_ALGOS[fmt]["storage_t"], fields


def _check_layer(L, shape, path):
    """The stored tensors of ``L`` have the shapes and dtypes ComfyUI's layout gives a weight of
    the model's ``shape``; returns {Params field: (companion, view dtype)} for the scales."""
    fmt = L.format
    extra = _extra_params(fmt, L.conf)
    try:
        qshape, qdtype, fields = _expected(fmt, tuple(shape), tuple(sorted(extra.items())))
    except ValueError as e:      # the layout cannot hold this shape at all
        raise QuantError(path, f"layer '{L.prefix}' ({fmt}): ComfyUI's layout cannot hold a "
                         f"{list(shape)} weight ({e})", "The file is damaged or made for another "
                         "model", tensor=L.prefix + ".weight") from None
    w = L.weight
    if w.dtype != qdtype or tuple(w.shape) != qshape:
        raise QuantError(path, f"layer '{L.prefix}' ({fmt}): stored weight is {w.dtype} "
                         f"{list(w.shape)}, but a {list(shape)} layer in this format stores "
                         f"{qdtype} {list(qshape)}", "The file is damaged or made for another "
                         "model", tensor=L.prefix + ".weight")
    out = {}
    for comp, (field, view, required) in _SCALES[fmt].items():
        t = L.tensors.get(comp)
        if t is None:
            if required:
                raise QuantError(path, f"layer '{L.prefix}' ({fmt}) has no {comp}",
                                 "The file is damaged: each layer in this format needs it",
                                 tensor=f"{L.prefix}.{comp}")
            continue
        want_shape, want_dtype = fields[field]
        if view is not None and t.element_size() != torch.empty((), dtype=view).element_size():
            raise QuantError(path, f"layer '{L.prefix}' ({fmt}): {comp} is {t.dtype}, which "
                             f"ComfyUI cannot read as {view}", "The file is damaged",
                             tensor=f"{L.prefix}.{comp}")
        got_shape = tuple(t.shape)
        ok = got_shape == want_shape if view is not None or want_shape != () else t.numel() == 1
        if not ok or not (t.is_floating_point() or view is not None):
            raise QuantError(path, f"layer '{L.prefix}' ({fmt}): {comp} is {t.dtype} "
                             f"{list(got_shape)}, expected {list(want_shape) or 'a single value'}"
                             f"{'' if view is not None else ' (float)'}", "The file is damaged or "
                             "made for another model", tensor=f"{L.prefix}.{comp}")
        out[field] = (comp, view)
    for comp in ("input_scale", "pre_quant_scale"):
        t = L.tensors.get(comp)
        if t is not None and not t.is_floating_point():
            raise QuantError(path, f"layer '{L.prefix}' ({fmt}): {comp} is {t.dtype}, not a float",
                             "The file is damaged", tensor=f"{L.prefix}.{comp}")
    return out


class ComfyQuantDecoder:
    """``decode(stored data on a device, dtype)``: the weight as ComfyUI's layer computes it.

    ``dtype=None`` gives ComfyUI's ``QuantizedTensor`` itself (for its quantized matmul); any
    other dtype the layout's dequantization in that dtype. ``patched`` adds LoRA the way a stock
    load bakes it in (see the module docstring)."""

    def __init__(self, store, layer, fields, compute_dtype):
        from comfy.quant_ops import QUANT_ALGOS

        self.store, self.layer = store, layer
        self.format = layer.format
        self.layout = QUANT_ALGOS[self.format]["comfy_tensor_layout"]
        self.compute_dtype = compute_dtype
        self.shape = None
        self.fields = fields          # Params field -> (companion, view dtype)
        self.slots = {}               # Params field -> store handle (block scales)
        self.small = {}               # (device, field) -> scalar scale on that device
        self.extra = _extra_params(self.format, layer.conf)

    def _scale(self, field, device, slot_ctx):
        comp, view = self.fields[field]
        h = self.slots.get(field)
        if h is not None:
            t = slot_ctx.enter_context(self.store.use(h, device, h.store_dtype))
        else:
            t = self.small.get((device, field))
            if t is None:
                # A copy, also on the host: never keep a view of the file's mapping.
                t = self.small[(device, field)] = self.layer.tensors[comp].to(device, copy=True)
        return t.view(view) if view is not None else t

    def tensor(self, raw, orig_dtype, keep=False):
        """ComfyUI's QuantizedTensor over ``raw`` (``keep``: block scales copied out of their
        slot, so it stays valid after this call)."""
        import contextlib

        from comfy.quant_ops import QuantizedTensor, get_layout_class

        cls = get_layout_class(self.layout)
        with contextlib.ExitStack() as stack:
            scales = {f: self._scale(f, raw.device, stack) for f in self.fields}
            if keep:
                scales = {f: t.clone() if f in self.slots else t for f, t in scales.items()}
            params = cls.Params(**scales, **self.extra, orig_dtype=orig_dtype,
                                orig_shape=tuple(self.shape))
            qt = QuantizedTensor(raw, self.layout, params)
            return qt if keep else qt.dequantize()

    def __call__(self, raw, dtype):
        if dtype is None:
            return self.tensor(raw, self.compute_dtype, keep=True)
        return self.tensor(raw, dtype)

    def patched(self, raw, dtype, patches):
        import comfy.model_management as mm
        import comfy.utils

        key = next((p.key for p in patches if isinstance(getattr(p, "key", None), str)),
                   self.layer.prefix + ".weight")
        qt = self.tensor(raw, mm.lora_compute_dtype(raw.device), keep=True)
        w = qt.dequantize()
        for f in patches:
            w = f(w)
        q = qt.requantize_from_float(w, scale="recalculate",
                                     stochastic_rounding=comfy.utils.string_to_seed(key),
                                     inplace_ops=True)
        if dtype is None:       # set_weight's result: the layer's QuantizedTensor
            return q.to(self.compute_dtype)
        return q.to(dtype).dequantize()


def _native(fmt, conf, device):
    """pick_operations: is ``fmt`` computed natively on ``device`` (else dequantized)?"""
    import comfy.model_management as mm

    if conf.get("full_precision_matrix_mult", False):
        return False
    need = {"float8_e4m3fn": mm.supports_fp8_compute, "float8_e5m2": mm.supports_fp8_compute,
            "nvfp4": mm.supports_nvfp4_compute, "mxfp8": mm.supports_mxfp8_compute}.get(fmt)
    return True if need is None else bool(need(device))


def _mixed_linear(m, x, plain):
    """mixed_precision_ops.Linear.forward, with the weight from the VBAR."""
    from comfy.quant_ops import QUANT_ALGOS, QuantizedTensor

    from ..runtime.vbar_modules import use_param

    d = m._vbar_handles["weight"].decode
    pre = d.layer.tensors.get("pre_quant_scale")
    if pre is not None:
        x = x * pre.to(device=x.device, dtype=x.dtype)
    if not m.vbar_native:
        return plain(m, x)
    # Patched (LoRA), ComfyUI computes natively on the weight requantized with the patch baked
    # in (a stock load's set_weight, Dynamic VRAM's want_requant): the decoder's ``patched``
    # gives that QuantizedTensor for dtype None. Not cached: requantized at every use.
    patches = m.__dict__.get("weight_function") or None
    store, h = m._vbar_store, m._vbar_handles["weight"]
    if not QUANT_ALGOS[d.format].get("quantize_input", True):
        # Weight-only formats (int8): the layout's own linear on the stored weight.
        with store.use(h, x.device, None, patches) as w, \
                use_param(m, "bias", x.device, x.dtype) as b:
            return F.linear(x, w.to(dtype=x.dtype), b)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]) if x.ndim >= 3 else x
    if x2.ndim != 2:
        return plain(m, x)
    scale = d.layer.tensors.get("input_scale")
    if scale is not None:
        scale = scale.to(x.device)
    qx = QuantizedTensor.from_float(x2, d.layout, scale=scale)
    with store.use(h, x.device, None, patches) as w, use_param(m, "bias", x.device, x.dtype) as b:
        if w.dtype != x.dtype:   # cast_bias_weight: a dtype change dequantizes
            w = w.to(dtype=x.dtype).dequantize()
        out = F.linear(qx, w, b)
    return out.reshape((*shape[:-1], out.shape[-1])) if x.ndim >= 3 else out


def _source(layer, fields, compute_dtype, shape):
    def add(store, key, hold):
        dec = ComfyQuantDecoder(store, layer, fields, compute_dtype)
        dec.shape = tuple(shape)
        h = store.add(key, layer.weight, decode=dec, shape=dec.shape, hold=hold)
        for field, (comp, _) in fields.items():
            t = layer.tensors[comp]
            if t.numel() > 1:   # block scales: their own slot, right after the data
                dec.slots[field] = store.add(f"{key}.{comp}", t.reshape(-1) if t.dim() == 0 else t,
                                             store_dtype=t.dtype, hold=hold)
        return h

    return add


def attach_mixed(model, prep, prefix, load_device):
    """Point every quantized Linear of ``model`` (ComfyUI 0.33+) at its stored data."""
    modules = dict(model.named_modules())
    compute = getattr(model, "vbar_compute_dtype", None)
    for key, L in prep.layers.items():
        m = modules.get(key[len(prefix):])
        if not isinstance(m, torch.nn.Linear):
            what = "no such layer" if m is None else f"a {type(m).__name__}"
            raise QuantError(prep.path, f"layer '{key}' is stored quantized ({L.format}) but the "
                             f"model ComfyUI detected has {what} there; VBAR loaders load "
                             f"quantized Linear layers", "Use ComfyUI's stock loader for this file",
                             tensor=key + ".weight")
        shape = (m.out_features, m.in_features)
        fields = _check_layer(L, shape, prep.path)
        dtype = compute or m.vbar_store_dtype
        m.vbar_sources = {**(getattr(m, "vbar_sources", None) or {}),
                          "weight": _source(L, fields, dtype, shape)}
        m.vbar_native = _native(L.format, L.conf, load_device)
        m.vbar_linear = _mixed_linear
    return len(prep.layers)


def mixed_dtypes(model):
    """mixed_precision_ops builds every Linear in its compute dtype (the model's manual-cast
    dtype; None keeps the file's dtype), not the model dtype other layers get."""
    compute = getattr(model, "manual_cast_dtype", None)
    for m in model.diffusion_model.modules():
        if isinstance(m, torch.nn.Linear) and hasattr(m, "vbar_store_dtype"):
            if compute is not None:
                m.vbar_store_dtype = compute
    model.diffusion_model.vbar_compute_dtype = compute


# --- ComfyUI 0.3.x: scaled_fp8_ops ---------------------------------------------------------------
def attach_scaled_fp8(model, prep, prefix):
    """Every Linear holds the marker's fp8 dtype; quantized ones multiply by scale_weight."""
    import comfy.ops

    cls = comfy.ops.scaled_fp8_ops(override_dtype=prep.marker_dtype).Linear
    modules = dict(model.named_modules())
    for name, m in modules.items():
        if isinstance(m, torch.nn.Linear) and hasattr(m, "vbar_store_dtype"):
            m.vbar_store_dtype = prep.marker_dtype
            m.scale_weight = torch.ones((), dtype=torch.float32)
            _bind_scaled(m, cls, prep.marker_dtype)
    for key, L in prep.layers.items():
        m = modules.get(key[len(prefix):])
        if not isinstance(m, torch.nn.Linear):
            raise QuantError(prep.path, f"layer '{key}' has a scale_weight but the model ComfyUI "
                             f"detected has no Linear there", "The file is damaged or made for "
                             "another model", tensor=key + ".scale_weight")
        s = L.tensors.get("weight_scale")
        if s is None or s.numel() != 1 or not s.is_floating_point():
            raise QuantError(prep.path, f"layer '{key}' (scaled_fp8): scale_weight must be one "
                             f"float value", "The file is damaged", tensor=key + ".scale_weight")
        if L.weight.dtype != prep.marker_dtype:
            log.info("%s: %s is %s, converted to %s as ComfyUI does", prep.path, key,
                     L.weight.dtype, prep.marker_dtype)
        m.scale_weight = s.detach().reshape(()).to(torch.float32)
        m.vbar_linear = _scaled_linear
    return len(prep.layers)


def _bind_scaled(m, cls, dtype):
    """ComfyUI's own LoRA conversion for the layer, bound on the instance: get_key_weight finds
    them there, and so does lora.stored_patch, which patches the weight as the VBAR stores it
    with them (times scale_weight, patch, divided and rounded back to fp8 with the key's seed).
    ``cls.set_weight`` reads the stored dtype from ``self.weight``, which for a VBAR layer is
    the file's tensor (maybe another dtype), so it runs on a stand-in holding ``dtype``."""
    def convert_weight(weight, inplace=False, **kw):
        return cls.convert_weight(m, weight, inplace=inplace, **kw)

    def set_weight(weight, inplace_update=False, seed=None, return_weight=False, **kw):
        shim = types.SimpleNamespace(weight=torch.empty(0, dtype=dtype),
                                     scale_weight=m.scale_weight)
        # Without return_weight every 0.3.x set_weight assigns its result to self.weight
        # (0.3.40's takes no return_weight at all).
        cls.set_weight(shim, weight, seed=seed, **kw)
        out = shim.weight.data
        if return_weight:
            return out
        # ComfyUI's patch_weight_to_device (force_patch_weights, saving on 0.3.x): the patched
        # weight goes into the module, where the patcher's override put the unpatched one.
        if inplace_update:
            m.weight.data.copy_(out)
        else:
            m.weight = torch.nn.Parameter(out, requires_grad=False)

    m.convert_weight, m.set_weight = convert_weight, set_weight


def _scaled_linear(m, x, plain):
    """scaled_fp8_op.Linear.forward_comfy_cast_weights without fp8 matrix multiplication."""
    from ..runtime.vbar_modules import use_param

    with use_param(m, "weight", x.device, x.dtype) as w, \
            use_param(m, "bias", x.device, x.dtype) as b:
        s = m.scale_weight.to(device=w.device, dtype=w.dtype)
        if w.numel() < x.numel():
            return F.linear(x, w * s, b)
        return F.linear(x * s, w, b)


def describe(prep):
    fmts = {}
    for L in prep.layers.values():
        fmts[L.format] = fmts.get(L.format, 0) + 1
    return ", ".join(f"{k} ({v})" for k, v in sorted(fmts.items()))
