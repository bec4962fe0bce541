"""Weight patches (LoRA and friends) computed as ComfyUI's stock full load computes them.

A fully loaded stock model is patched once, by ``ModelPatcher.patch_weight_to_device``: the
weight *as ComfyUI stores it* (e.g. a text encoder's float16) is copied to ComfyUI's LoRA
compute dtype (float32; ``model_management.lora_compute_dtype(device)`` since it exists),
patched with ``comfy.lora.calculate_weight``, and rounded back to the stored dtype with
``comfy.float.stochastic_rounding`` (seeded by the key). Layers then cast that to the compute
dtype. ComfyUI's low-VRAM ``LowVramPatch`` instead patches the already-cast weight and never
rounds back, which differs whenever the stored dtype is narrower than the compute dtype (a
float16 CLIP computing in float32 on the CPU).

Our layers fault weights in at forward time, but ``StoredWeightPatch`` is marked
``vbar_on_stored``: the layer asks the store for the weight in its stored dtype, applies this
patch to it (the result is what a stock load holds, and is what stays cached in the slot),
then casts. A layer whose ComfyUI op converts its weight for patching (0.3.x scaled fp8:
``convert_weight`` multiplies by ``scale_weight``, ``set_weight`` divides and rounds back to fp8)
gets those functions too, called in ``patch_weight_to_device``'s order. Imports ComfyUI only
when called.
"""
import torch


class StoredWeightPatch:
    vbar_on_stored = True   # see vbar_modules._param: give me the weight in its stored dtype

    __slots__ = ("key", "patches", "convert_func", "set_func")

    def __init__(self, key, patches, convert_func=None, set_func=None):
        self.key = key
        self.patches = patches   # the ModelPatcher's dict: key -> patch list, as LowVramPatch
        # The layer's convert_<param>/set_<param> (ComfyUI's get_key_weight finds them the
        # same way), acting on the weight as stored; set_func must return the stored weight.
        self.convert_func = convert_func
        self.set_func = set_func

    def __call__(self, weight):
        """``weight``: a private copy, in the dtype the result must have (the stored dtype)."""
        import comfy.float
        import comfy.lora

        # Like patch_weight_to_device: a float32 (or lora_compute_dtype) working copy,
        # converted (scaled fp8: times scale_weight), patched, then set_func (divided by the
        # scale and rounded, seeded by the key) or rounded to the weight's dtype. The caller
        # owns ``weight``: no copy when it already is in the working dtype.
        temp = weight.to(_compute_dtype(weight.device))
        if self.convert_func is not None:
            temp = self.convert_func(temp, inplace=True)
        out = comfy.lora.calculate_weight(self.patches[self.key], temp, self.key)
        if self.set_func is not None:
            return self.set_func(out, seed=_seed(self.key), return_weight=True)
        return comfy.float.stochastic_rounding(out, weight.dtype, seed=_seed(self.key))


def stored_patch(module, pname, key, patches):
    """The patch for parameter ``pname`` of VBAR layer ``module``. Conversion functions are
    taken only where the layer's loader bound them to the layer itself (scaled fp8 on 0.3.x,
    comfyui/quant.py): those act on the weight as the VBAR stores it. An op class's own
    convert/set (0.33's mixed-precision Linear) act on ComfyUI's parameter, which a VBAR layer
    does not hold; its quantized weights are patched by their decoder instead."""
    own = vars(module)
    return StoredWeightPatch(key, patches, own.get(f"convert_{pname}"), own.get(f"set_{pname}"))


def _compute_dtype(device):
    import comfy.model_management as mm

    f = getattr(mm, "lora_compute_dtype", None)   # in 0.33, not in 0.3.64: float32 there
    return f(device) if f is not None else torch.float32


def _seed(key):
    import comfy.model_patcher
    import comfy.utils

    f = getattr(comfy.utils, "string_to_seed", None) or comfy.model_patcher.string_to_seed
    return f(key)
