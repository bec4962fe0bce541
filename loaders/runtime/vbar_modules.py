"""Layers whose weights fault in through a WeightStore at forward time.

``vbarize(model, store)`` turns every supported layer of an existing torch model into its VBAR
variant in place (class swap, so ComfyUI's op classes keep their own attributes). Weights stay
registered parameters holding the *source* (host) tensors, so ``state_dict()``, LoRA key maps
and size accounting keep working; ``.to()`` leaves them where they are.

Casting follows ComfyUI's ops: weight and bias take the input's dtype and device; Embedding keeps
fp16/bf16 weights as they are and casts the output.
"""
import contextlib

import torch
import torch.nn.functional as F

def _param(m, name, device, dtype):
    h = m._vbar_handles.get(name)
    if h is None:
        p = getattr(m, name, None)
        if p is None:
            return contextlib.nullcontext(None)
        return contextlib.nullcontext(p.to(device=device, dtype=dtype))
    # Runs for every weight of every layer call: plain lookups, no Module.__getattr__ misses
    # (ComfyUI's patcher sets <name>_function on the instance, its ops classes default it).
    fname = _PATCH_LISTS[name]
    patches = m.__dict__.get(fname) or getattr(type(m), fname, None) or None
    if patches and getattr(patches[0], "vbar_on_stored", False):
        return _patched_as_stored(m, h, device, dtype, patches)
    patch_dtype = m.vbar_patch_dtype
    if patches and isinstance(patch_dtype, torch.dtype) and patch_dtype != dtype:
        # Loader option: patches (LoRA) computed in a chosen dtype, e.g. float32 on bf16.
        return _cast(m._vbar_store.use(h, device, patch_dtype, patches, m.vbar_patch_key), dtype)
    return m._vbar_store.use(h, device, dtype, patches, m.vbar_patch_key)


_PATCH_LISTS = {"weight": "weight_function", "bias": "bias_function"}


def _patched_as_stored(m, h, device, dtype, patches):
    """The patcher's patch (first in the list, see loaders/comfyui/lora.py) is applied to the
    weight in the dtype ComfyUI stores it in, as a stock full load patches it, and the store
    keeps that result; the cast to the compute dtype comes after. Later entries (ComfyUI's
    weight wrappers) see the cast weight, as in ComfyUI's ops. ``vbar_patch_dtype`` (loader
    option) overrides the held dtype: a torch dtype, or "target" for the compute dtype."""
    held = m.vbar_patch_dtype
    if held is None:
        held = h.store_dtype if h.decode is None else getattr(m, "vbar_store_dtype", None)
        if not isinstance(held, torch.dtype) or not held.is_floating_point:
            held = dtype
    elif held == "target":
        held = dtype
    return _cast(m._vbar_store.use(h, device, held, patches[:1], m.vbar_patch_key), dtype,
                 patches[1:])


def use_param(m, name, device, dtype):
    """Context manager: parameter ``name`` of VBAR layer ``m`` on ``device`` in ``dtype``, with
    the layer's patches applied (None if it has none). For loader hooks (``vbar_linear``)."""
    return _param(m, name, device, dtype)


@contextlib.contextmanager
def _cast(ctx, dtype, after=()):
    with ctx as w:
        out = w.to(dtype)
        if after:
            if out.data_ptr() == w.data_ptr():
                out = out.clone()       # never let a wrapper write into a cached slot
            for f in after:
                out = f(out)
        yield out


def _linear(m, x):
    # Loader hook: a quantized layer computes the way its ComfyUI op does (e.g. a quantized
    # matmul), given this default to fall back to.
    hook = m.__dict__.get("vbar_linear")
    if hook is not None:
        return hook(m, x, _plain_linear)
    return _plain_linear(m, x)


def _plain_linear(m, x):
    with _param(m, "weight", x.device, x.dtype) as w, _param(m, "bias", x.device, x.dtype) as b:
        return F.linear(x, w, b)


def _conv(m, x):
    with _param(m, "weight", x.device, x.dtype) as w, _param(m, "bias", x.device, x.dtype) as b:
        return m._conv_forward(x, w, b)


_TRANSPOSE = ((torch.nn.ConvTranspose1d, 1, F.conv_transpose1d),
              (torch.nn.ConvTranspose2d, 2, F.conv_transpose2d),
              (torch.nn.ConvTranspose3d, 3, F.conv_transpose3d))


def _conv_transpose(m, x, output_size=None):
    n, fn = next((d, f) for cls, d, f in _TRANSPOSE if isinstance(m, cls))
    output_padding = m._output_padding(x, output_size, m.stride, m.padding, m.kernel_size, n, m.dilation)
    with _param(m, "weight", x.device, x.dtype) as w, _param(m, "bias", x.device, x.dtype) as b:
        return fn(x, w, b, m.stride, m.padding, output_padding, m.groups, m.dilation)


def _embedding(m, x, out_dtype=None):
    stored = _table_dtype(m)
    dtype = stored if stored in (torch.float16, torch.bfloat16) or out_dtype is None else out_dtype
    with _param(m, "weight", x.device, dtype) as w:
        out = F.embedding(x, w, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)
    return out.to(dtype=out_dtype) if out_dtype is not None else out


def _table_dtype(m):
    """The dtype an Embedding's table holds: a quantized (decoded) table reports its packed
    bytes' uint8, so use what it decodes to: the dtype ComfyUI would have stored, else float32."""
    h = m._vbar_handles.get("weight")
    if h is None or h.decode is None:
        return m.weight.dtype
    dq = getattr(h.decode, "weight_dtype", None) or getattr(h.decode, "dequant_dtype", None)
    return dq if isinstance(dq, torch.dtype) else torch.float32


def _layer_norm(m, x):
    with _param(m, "weight", x.device, x.dtype) as w, _param(m, "bias", x.device, x.dtype) as b:
        return F.layer_norm(x, m.normalized_shape, w, b, m.eps)


def _group_norm(m, x):
    with _param(m, "weight", x.device, x.dtype) as w, _param(m, "bias", x.device, x.dtype) as b:
        return F.group_norm(x, m.num_groups, w, b, m.eps)


def _rms_norm(m, x):
    with _param(m, "weight", x.device, x.dtype) as w:
        return F.rms_norm(x, m.normalized_shape, w, m.eps)


# Order matters: ConvTranspose before Conv is not needed (separate bases), but subclasses of
# several torch classes are matched by the first entry.
_KINDS = [
    (torch.nn.Linear, _linear),
    (torch.nn.ConvTranspose1d, _conv_transpose),
    (torch.nn.ConvTranspose2d, _conv_transpose),
    (torch.nn.ConvTranspose3d, _conv_transpose),
    (torch.nn.Conv1d, _conv),
    (torch.nn.Conv2d, _conv),
    (torch.nn.Conv3d, _conv),
    (torch.nn.Embedding, _embedding),
    (torch.nn.LayerNorm, _layer_norm),
    (torch.nn.GroupNorm, _group_norm),
    (torch.nn.RMSNorm, _rms_norm),
]


class VbarLayer:
    """Mixin placed in front of a layer's own class."""

    _vbar_forward = None
    vbar_patch_dtype = None   # loader hooks, set per instance where used (see _param)
    vbar_patch_key = None

    def forward(self, *args, **kwargs):
        try:
            return type(self)._vbar_forward(self, *args, **kwargs)
        except torch.OutOfMemoryError:
            pool = self._vbar_store.pool
            if pool is None:
                raise
            # Our resident pages are the one thing we can give back: free what is unpinned,
            # let the caching allocator return it, and try once more.
            freed = pool.make_room(pool.budget())
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            try:
                return type(self)._vbar_forward(self, *args, **kwargs)
            except torch.OutOfMemoryError as e:
                raise torch.OutOfMemoryError(
                    f"out of memory in layer {type(self).__name__} even after freeing "
                    f"{freed / 2**20:.0f} MiB of resident weights. Lower the VBAR budget (VBAR Set "
                    f"Budget node or VBAR_BUDGET), raise its headroom, or use a smaller batch or "
                    f"resolution. ({e})") from e

    def _apply(self, fn, recurse=True):
        # Weights live in the VBAR or the file mapping; .to()/.half() must not copy them.
        held = {n: self._parameters.pop(n) for n in list(self._vbar_handles) if n in self._parameters}
        try:
            return super()._apply(fn, recurse)
        finally:
            self._parameters.update(held)


_classes = {}


def vbar_class(cls):
    """The VBAR variant of layer class ``cls`` (cached), or None if unsupported."""
    if issubclass(cls, VbarLayer):
        return cls
    if cls not in _classes:
        fwd = next((f for base, f in _KINDS if issubclass(cls, base)), None)
        _classes[cls] = None if fwd is None else type(
            f"Vbar{cls.__name__}", (VbarLayer, cls),
            {"_vbar_forward": staticmethod(fwd), "__module__": __name__})
    return _classes[cls]


def supported(module):
    return vbar_class(type(module)) is not None


def vbarize(model, store, order=None, include=None):
    """Give every supported layer of ``model`` its weights through ``store``; build the store.

    ``order``: module names in execution order (first = highest priority); default is the
    model's registration order, which for diffusion models follows the forward pass.
    ``include(name, module)``: which layers to convert (default all supported). A layer's
    ``vbar_store_dtype`` attribute, if set, is the dtype its device copy holds; ``vbar_hold``
    and ``vbar_sources`` are loader hooks (see below).
    """
    named = dict(model.named_modules())
    names = list(order) if order is not None else list(named)
    names += [n for n in named if n not in set(names)]
    for name in names:
        m = named[name]
        cls = vbar_class(type(m))
        if cls is None or isinstance(m, VbarLayer) and m._vbar_handles:
            continue
        if include is not None and not include(name, m):
            continue
        handles = {}
        store_dtype = getattr(m, "vbar_store_dtype", None)
        # Loader hooks: `vbar_hold` pins the layer resident (Flux block pinning);
        # `vbar_sources[pname](store, key, hold) -> handle` adds a quantized weight's stored
        # bytes (and decode) in place of the parameter, which then only describes its shape.
        hold = bool(getattr(m, "vbar_hold", False))
        sources = getattr(m, "vbar_sources", None) or {}
        for pname in ("weight", "bias"):
            p = m._parameters.get(pname)
            if p is not None:
                key = f"{name}.{pname}" if name else pname
                add = sources.get(pname)
                handles[pname] = (add(store, key, hold) if add is not None else
                                  store.add(key, p.detach(), store_dtype=store_dtype, hold=hold))
        m.__class__ = cls
        m._vbar_store = store
        m._vbar_handles = handles
    store.build()
    return model


def execution_order(model, *inputs, **kwargs):
    """Run ``model`` once (no grad) and return supported layer names in first-use order."""
    seen, hooks = [], []
    for name, m in model.named_modules():
        if supported(m):
            hooks.append(m.register_forward_pre_hook(lambda mod, a, n=name: seen.append(n)))
    try:
        with torch.no_grad():
            model(*inputs, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(seen))
