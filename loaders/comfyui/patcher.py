"""A ModelPatcher for VBAR-backed models: ComfyUI's memory manager sees true numbers, never
moves the weights itself, and frees memory by evicting pages.

Weight patches (LoRA and friends) reach our layers in the layer's ``weight_function`` list, as
in ComfyUI's own low-VRAM mode, but computed as a stock *full* load computes them (see lora.py:
``StoredWeightPatch``). Our layers apply them to a private copy after the fault and keep the
result in the resident slot (for a quantized weight: in the store's patch VBAR) until the patch
set (``patches_uuid``) changes.
"""
import functools
import logging
import weakref

log = logging.getLogger("vbar")
_cls = None


def stores_of(patcher):
    return getattr(patcher.model, "_vbar_stores", [])


def patcher_class():
    global _cls
    if _cls is None:
        import comfy.model_patcher as mp

        _cls = make_patcher_class(mp)
    return _cls


def make_patcher_class(mp):
    """Our ModelPatcher subclass over ``mp`` (comfy.model_patcher, or a stand-in in tests)."""
    from .lora import stored_patch
    from ..runtime.vbar_modules import VbarLayer

    # 0.33 reads weights for saving through patch_weight_to_device(return_weight=True); older
    # versions read the module's state_dict().
    reads_state_dict = "return_weight" not in _parameters(mp.ModelPatcher.patch_weight_to_device)

    class VbarModelPatcher(mp.ModelPatcher):
        def _vbar_managed(self):
            # Computed once per model: ComfyUI asks for sizes many times per prompt, and walking
            # every module (thousands for Flux) each time would cost milliseconds.
            model = self.model
            if getattr(model, "_vbar_keys", None) is None:
                model._vbar_keys = frozenset(
                    f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, VbarLayer)
                    for p in m._vbar_handles)
                model._vbar_other_bytes = sum(
                    t.numel() * t.element_size() for k, t in model.state_dict().items()
                    if k not in model._vbar_keys)
            return model._vbar_keys

        def _other_bytes(self):
            self._vbar_managed()
            return self.model._vbar_other_bytes

        def model_size(self):
            # The bytes it takes to have the whole model resident, in the dtypes the device holds.
            if getattr(self, "_vbar_size", None) is None:
                self._vbar_size = self._other_bytes() + sum(
                    h.nbytes for s in stores_of(self) for h in s.handles)
            return self._vbar_size

        def loaded_size(self):
            resident = sum(s.resident_bytes() for s in stores_of(self))
            if getattr(self.model, "device", None) == self.load_device:
                resident += self._other_bytes()
            # Pages are coarser than weights: never claim more than the model's size.
            return min(resident, self.model_size())

        def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False,
                 full_load=False):
            # lowvram_model_memory / full_load: the VBAR budget, not ComfyUI's estimate, decides
            # what stays resident. force_patch_weights: see _present_weights.
            with self.use_ejected():
                self.unpatch_hooks()
                count = 0
                for name, m in self.model.named_modules():
                    if not isinstance(m, VbarLayer):
                        continue
                    lists = {"weight": [], "bias": []}
                    for pname, lst in lists.items():
                        key = f"{name}.{pname}"
                        if key in self.patches:
                            lst.append(stored_patch(m, pname, key, self.patches))
                            count += 1
                        lst.extend(self.weight_wrapper_patches.get(key, []))
                    m.weight_function, m.bias_function = lists["weight"], lists["bias"]
                    m.vbar_patch_key = self.patches_uuid if lists["weight"] or lists["bias"] else None
                if device_to is not None:
                    self.model.to(device_to)   # small tensors only: VBAR weights refuse to move
                for s in stores_of(self):
                    s.prioritize()
                self.model.device = device_to
                managed = self._vbar_managed()
                for key in self.patches:
                    # Layers outside the VBAR (token embeddings) are ordinary tensors on the
                    # device: patched ComfyUI's way, into the module, as a full load does.
                    if key not in managed and key not in self.backup:
                        _call_base(super().patch_weight_to_device, key, device_to)
                        _mark_patched(self.model, key)
                if force_patch_weights:
                    self._present_weights(device_to)
                elif getattr(self, "is_clip", False) and reads_state_dict:
                    # Before 0.33 a Checkpoint Save reads a text encoder's state_dict() after a
                    # plain load (no force_patch_weights): its patched layers must be there.
                    self._present_weights(device_to, only_patched=True)
                self.model.model_lowvram = True
                self.model.lowvram_patch_counter = count
                self.model.model_loaded_weight_memory = self.loaded_size()
                self.model.current_weight_patches_uuid = self.patches_uuid
                for callback in self.get_all_callbacks(mp.CallbacksMP.ON_LOAD):
                    callback(self, device_to, lowvram_model_memory, force_patch_weights, full_load)
                self.apply_hooks(self.forced_hooks, force_apply=True)

        def cleanup(self):
            # Sampling ended: what the prefetcher prepared for a next step that will not come
            # must not stay pinned (it would keep those pages from other models).
            for s in stores_of(self):
                s.drop_prefetched()
            return super().cleanup()

        def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
            # Eviction frees pages; patches stay applied when a page faults back in, so a
            # VBAR model never needs ComfyUI's low-VRAM patches installed here.
            for s in stores_of(self):
                s.drop_prefetched()
            freed = 0
            for s in reversed(stores_of(self)):
                if freed >= memory_to_free:
                    break
                freed += s.free_memory(memory_to_free - freed)
            if force_patch_weights:
                self._present_weights(device_to)
            self.model.model_loaded_weight_memory = self.loaded_size()
            return freed

        def detach(self, unpatch_all=True):
            if unpatch_all:
                # ComfyUI is unloading this model: give its pages back. (unpatch_all=False is
                # another clone of the same weights taking over: the pages stay valid.)
                for s in stores_of(self):
                    s.drop_prefetched()
                    s.free_memory()
            return super().detach(unpatch_all)

        def patch_weight_to_device(self, key, device_to=None, inplace_update=False,
                                   return_weight=False, force_cast=False):
            if key not in self._vbar_managed():
                return _call_base(super().patch_weight_to_device, key, device_to, inplace_update,
                                  return_weight=return_weight, force_cast=force_cast)
            # A VBAR layer's parameter is the file's tensor (for quantized weights only its
            # shape), not what ComfyUI would hold. Put that weight in its place, then let
            # ComfyUI's own method patch it: the result is the stock loader's, bit for bit.
            logical = _logical_weight(self.model, key, self.offload_device)
            if return_weight:
                # Saving a checkpoint or extracting a LoRA (0.33): the weight, patched, and
                # the module left as it was.
                with _param_swapped(self.model, key, logical):
                    return _call_base(super().patch_weight_to_device, key, device_to,
                                      inplace_update, return_weight=True, force_cast=force_cast)
            # The weight patched into the module, as ComfyUI's "patched weights" are: readers
            # of state_dict() see it, and unpatch_model restores the original from the backup.
            # Our layers still compute from the VBAR (patches applied at fault time).
            import comfy.utils

            if key not in self.backup:
                self.backup[key] = _Backup(comfy.utils.get_attr(self.model, key), False)
            comfy.utils.set_attr_param(self.model, key, logical)
            if key in self.patches or force_cast:
                _call_base(super().patch_weight_to_device, key, device_to, False,
                           force_cast=force_cast)
                # keep the copy in host memory: VRAM belongs to the VBAR budget
                comfy.utils.set_attr_param(self.model, key, comfy.utils.get_attr(
                    self.model, key).to(self.offload_device))

        def model_state_dict_for_saving(self, model=None, prefix=""):
            # 0.33 saves through lazy parameters that take their shape and dtype from the
            # module's tensor and their data from patch_weight_to_device(return_weight=True).
            # A VBAR layer's tensor is the file's (another dtype where ComfyUI converts at
            # load; packed bytes if quantized), so describe the weight as ComfyUI holds it. The
            # placeholder is never written or read: its pages are never touched.
            import torch

            sd = super().model_state_dict_for_saving(model, prefix)
            managed = self._vbar_managed()
            for k, v in list(sd.items()):
                key = prefix + k
                if key not in managed or type(v).__name__ != "LazyCastingParam":
                    continue
                m, pname = _layer_of(self.model, key)
                h = m._vbar_handles[pname]
                dtype = _weight_dtype(h)
                if v.dtype != dtype or tuple(v.shape) != h.shape:
                    sd[k] = type(v)(self, key, torch.empty(h.shape, dtype=dtype))
            return sd

        def _present_weights(self, device_to, only_patched=False):
            """force_patch_weights: ComfyUI wants the module's weights patched, because the
            next thing it does is read state_dict() (checkpoint save, LoRA extraction and CLIP
            merge before 0.33). Present every VBAR weight as ComfyUI would hold it: in the
            model's dtype, patched (``only_patched``: just the patched ones). Weights already
            identical to the file stay file views. unpatch_model puts the file's tensors back
            (ComfyUI's backup), so the copies live only while the model is loaded."""
            for key in sorted(self._vbar_managed()):
                if key in self.backup:
                    continue
                if key in self.patches or not only_patched and _needs_presenting(self.model, key):
                    self.patch_weight_to_device(key, device_to)

    return VbarModelPatcher


def signature_problems(cls=None):
    """What a caller of ComfyUI's ModelPatcher could pass that ``cls``'s overrides would reject:
    one line per problem, empty when every override takes every parameter of the method it
    replaces, in the same positions, with the same defaults (so an omitted argument means what
    ComfyUI means). Checks the installed ComfyUI when ``cls`` is None."""
    import inspect

    cls = cls or patcher_class()
    base = cls.__mro__[1]
    problems = []
    for name, ours in vars(cls).items():
        theirs = getattr(base, name, None)
        if name.startswith("__") or not callable(ours) or theirs is None:
            continue
        ps, pb = inspect.signature(ours).parameters, inspect.signature(theirs).parameters
        var_kw = any(p.kind is p.VAR_KEYWORD for p in ps.values())
        ours_pos = [n for n, p in ps.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        for i, (pname, p) in enumerate(pb.items()):
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                if not any(q.kind is p.kind for q in ps.values()):
                    problems.append(f"{name}: ComfyUI's takes {p}, ours does not")
                continue
            q = ps.get(pname)
            if q is None:
                if not var_kw:
                    problems.append(f"{name}: ComfyUI's takes '{pname}', ours does not")
                continue
            if p.kind is not p.KEYWORD_ONLY and (i >= len(ours_pos) or ours_pos[i] != pname):
                problems.append(f"{name}: '{pname}' is argument {i} (self = 0) in ComfyUI's, not in ours")
            if p.default is not q.default and p.default != q.default:
                problems.append(f"{name}: '{pname}' defaults to {p.default!r} in ComfyUI's, "
                                f"{q.default!r} in ours")
        for pname, q in ps.items():
            if pname not in pb and q.default is q.empty and q.kind not in (q.VAR_POSITIONAL,
                                                                          q.VAR_KEYWORD):
                problems.append(f"{name}: ours requires '{pname}', which ComfyUI's callers never pass")
    return problems


def _call_base(method, *args, **kwargs):
    """Call ComfyUI's ``method`` with the keyword arguments it takes. An older ComfyUI lacks some
    of our parameters (e.g. ``return_weight`` before 0.33); they are dropped only while they
    hold their default, i.e. when nobody asked for what that ComfyUI cannot do."""
    params = _parameters(getattr(method, "__func__", method))
    for name in list(kwargs):
        if name not in params:
            if kwargs[name]:
                raise TypeError(f"this ComfyUI's {method.__qualname__} has no '{name}' parameter")
            del kwargs[name]
    return method(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _parameters(func):
    import inspect

    return frozenset(inspect.signature(func).parameters)


class _Backup(tuple):
    """ComfyUI's backup record (a namedtuple ``(weight, inplace_update)`` in every version)."""
    __slots__ = ()

    def __new__(cls, weight, inplace_update):
        return super().__new__(cls, (weight, inplace_update))

    weight = property(lambda self: self[0])
    inplace_update = property(lambda self: self[1])


def _layer_of(model, key):
    import comfy.utils

    name, _, pname = key.rpartition(".")
    return comfy.utils.get_attr(model, name) if name else model, pname


def _weight_dtype(h):
    """The dtype ComfyUI would hold this weight in: the store dtype, or for a quantized weight
    what it decodes to (the loader's dequant dtype, else float32)."""
    import torch

    if h.decode is None:
        return h.store_dtype
    dq = getattr(h.decode, "weight_dtype", None) or getattr(h.decode, "dequant_dtype", None)
    return dq if isinstance(dq, torch.dtype) else torch.float32


def _mark_patched(model, key):
    """Say what a stock full load says of a module it patched: its weights already are the
    patched ones. ComfyUI's readers (0.33's LoRA extraction and checkpoint save) then take the
    module's tensor instead of patching it a second time through patch_weight_to_device(
    return_weight=True). unpatch_model restores the backup and removes the mark."""
    from ..runtime.vbar_modules import VbarLayer

    m, _ = _layer_of(model, key)
    if not isinstance(m, VbarLayer):
        m.comfy_patched_weights = True


def _needs_presenting(model, key):
    m, pname = _layer_of(model, key)
    h = m._vbar_handles[pname]
    return h.decode is not None or h.source.dtype != h.store_dtype


def _logical_weight(model, key, device):
    """A fresh tensor holding ``key``'s weight as ComfyUI would hold it (unpatched)."""
    import torch

    m, pname = _layer_of(model, key)
    h = m._vbar_handles[pname]
    store = m._vbar_store
    if store.source_check is not None:
        store.source_check(key)
    with torch.inference_mode(False):
        w = store._materialize(h, device, _weight_dtype(h), copy=True)
        if w.data_ptr() == h.source.data_ptr():
            w = w.clone()
        return torch.nn.Parameter(w, requires_grad=False)


class _param_swapped:
    def __init__(self, model, key, value):
        self.model, self.key, self.value = model, key, value

    def __enter__(self):
        import comfy.utils

        self.old = comfy.utils.get_attr(self.model, self.key)
        comfy.utils.set_attr_param(self.model, self.key, self.value)

    def __exit__(self, *exc):
        import comfy.utils

        comfy.utils.set_attr(self.model, self.key, self.old)   # the very object it held


def adopt(patcher, store):
    """Turn a stock ModelPatcher into ours and tie ``store``'s lifetime to its model."""
    cls = patcher_class()
    if getattr(patcher, "is_dynamic", lambda: False)():
        # The loaders build with disable_dynamic=True; a dynamic patcher here means a ComfyUI
        # path that ignores it. Re-classing would leave aimdo's per-model state behind.
        raise RuntimeError(f"VBAR: ComfyUI gave a Dynamic VRAM patcher ({type(patcher).__name__}) "
                           f"for a VBAR model; start ComfyUI with --disable-dynamic-vram and "
                           f"report this ComfyUI version")
    patcher.__class__ = cls
    patcher._vbar_size = None
    module = patcher.model
    module._vbar_keys = None      # layers changed: sizes are worked out again on first use
    stores = getattr(module, "_vbar_stores", None)
    if stores is None:
        stores = module._vbar_stores = []
    stores.append(store)
    weakref.finalize(module, store.close)
    return patcher


def dynamic_vram_active():
    """True when a newer ComfyUI runs its own Dynamic VRAM (comfy-aimdo) manager."""
    try:
        import comfy.memory_management as mm
    except ImportError:
        return False
    return getattr(mm, "aimdo_enabled", False) is True
