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
    if _cls is not None:
        return _cls
    import comfy.model_patcher as mp

    from .lora import StoredWeightPatch
    from ..runtime.vbar_modules import VbarLayer

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
                            lst.append(StoredWeightPatch(key, self.patches))
                            count += 1
                        lst.extend(self.weight_wrapper_patches.get(key, []))
                    m.weight_function, m.bias_function = lists["weight"], lists["bias"]
                    m.vbar_patch_key = self.patches_uuid if lists["weight"] or lists["bias"] else None
                if device_to is not None:
                    self.model.to(device_to)   # small tensors only: VBAR weights refuse to move
                for s in stores_of(self):
                    s.prioritize()
                self.model.device = device_to
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

        def partially_unload(self, device_to, memory_to_free=0):
            for s in stores_of(self):
                s.drop_prefetched()
            freed = 0
            for s in reversed(stores_of(self)):
                if freed >= memory_to_free:
                    break
                freed += s.free_memory(memory_to_free - freed)
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

        def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
            if key in self._vbar_managed():
                return   # applied at fault time; writing it into the module would copy the model
            return super().patch_weight_to_device(key, device_to, inplace_update)

    _cls = VbarModelPatcher
    return _cls


def _low_vram_patch(mp, model, key, patches):
    """ComfyUI's LowVramPatch for ``key``. Until October 2025 (v0.3.64) it took (key, patches); the
    convert/set functions it takes since are for scaled-fp8 weights, which we do not load."""
    if _takes_two_args(mp.LowVramPatch):
        return mp.LowVramPatch(key, patches)
    _, set_func, convert_func = mp.get_key_weight(model, key)
    return mp.LowVramPatch(key, patches, convert_func, set_func)


@functools.lru_cache(maxsize=None)
def _takes_two_args(cls):   # asked once per loaded patched weight: inspect once per class
    import inspect

    return len(inspect.signature(cls).parameters) < 4


def adopt(patcher, store):
    """Turn a stock ModelPatcher into ours and tie ``store``'s lifetime to its model."""
    cls = patcher_class()
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
