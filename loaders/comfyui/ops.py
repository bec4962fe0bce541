"""ComfyUI ``operations`` whose layers are built without memory and adopt the file's tensors.

ComfyUI constructs a model from an ``operations`` object (``model_options["custom_operations"]``).
Ours builds every layer on the meta device, so construction allocates nothing, and takes the
state dict's tensors (zero-copy views into the model file) as they are instead of copying them.
``vbarize`` later moves those tensors behind the VBAR. Imports ComfyUI only when called.
"""
import torch

# Every layer class in ComfyUI's comfy.ops, classified (a test lists the installed ComfyUI's
# classes and fails on one missing from both). VBAR-backed: built empty, given the file's
# tensors, moved behind the VBAR.
OP_NAMES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm", "RMSNorm",
            "ConvTranspose1d", "ConvTranspose2d", "Embedding")
# Left to ComfyUI's own op (built and loaded as ComfyUI does, weights in ordinary memory).
LEFT_OUT = {
    # 0.33+: only BiRefNet (background removal, not loaded by our nodes) uses it; its weights are
    # a few KiB per layer and its running statistics are buffers the VBAR does not hold.
    "BatchNorm2d": "tiny per-channel weights plus running-statistics buffers; used by "
                   "background-removal models only",
}


def comfy_op_names(ops_class=None):
    """The layer classes ComfyUI's operations class defines (manual_cast by default)."""
    if ops_class is None:
        import comfy.ops

        ops_class = comfy.ops.manual_cast
    names = set()
    for klass in type.mro(ops_class):
        for name, value in vars(klass).items():
            if isinstance(value, type) and issubclass(value, torch.nn.Module):
                names.add(name)
    return names


def unclassified_ops(ops_class=None):
    return sorted(comfy_op_names(ops_class) - set(OP_NAMES) - set(LEFT_OUT))


class AdoptingOp:
    """Marker + behaviour mixed in front of a ComfyUI op class."""

    vbar_store_dtype = None

    def __init__(self, *args, **kwargs):
        # The dtype ComfyUI asks for is what it would convert the weights to at load: the device
        # copy will hold that dtype, so results match ComfyUI's own ops bit for bit.
        dtype = kwargs.get("dtype")
        kwargs["device"] = "meta"
        super().__init__(*args, **kwargs)
        self.vbar_store_dtype = dtype or torch.get_default_dtype()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in ("weight", "bias"):
            current = self._parameters.get(name)
            if current is None:
                continue
            t = state_dict.get(prefix + name)
            if t is None:
                # ComfyUI leaves missing weights uninitialised; a meta tensor would crash at use.
                missing_keys.append(prefix + name)
                t = torch.zeros(current.shape, dtype=self.vbar_store_dtype)
            elif getattr(t, "vbar_stored_elsewhere", False):
                # A quantized weight (comfy_quant) stands here as a meta tensor of its stored
                # shape; the loader attaches the stored bytes itself and checks them against
                # the layer, which keeps its own logical shape and dtype.
                continue
            elif tuple(t.shape) != tuple(current.shape):
                error_msgs.append(f"size mismatch for {prefix + name}: copying a param with shape "
                                  f"{tuple(t.shape)} from checkpoint, the shape in current model is "
                                  f"{tuple(current.shape)}.")
                continue
            self._parameters[name] = torch.nn.Parameter(t, requires_grad=False)
        for key in state_dict:
            if key.startswith(prefix) and key[len(prefix):] not in ("weight", "bias", "comfy_quant") \
                    and "." not in key[len(prefix):] and strict:
                unexpected_keys.append(key)

    def _apply(self, fn, recurse=True):
        # Before loading the parameters are meta (nothing to move); after, they are the file's.
        held = {n: p for n, p in self._parameters.items()
                if p is not None and (p.is_meta or n in getattr(self, "_vbar_handles", ()))}
        for n in held:
            del self._parameters[n]
        try:
            return super()._apply(fn, recurse)
        finally:
            self._parameters.update(held)


_ops = None


def vbar_operations():
    """The operations class to pass as ``custom_operations`` (built once, lazily)."""
    global _ops
    if _ops is None:
        import comfy.ops

        base = comfy.ops.manual_cast
        attrs = {}
        for name in OP_NAMES:
            cls = getattr(base, name, None)
            if cls is not None:
                attrs[name] = type(name, (AdoptingOp, cls), {"__module__": __name__})
        _ops = type("vbar_ops", (base,), attrs)
        unknown = unclassified_ops(base)
        if unknown:
            # A newer ComfyUI: those layers load the stock way (correct, just not behind the VBAR).
            import logging

            logging.getLogger("vbar").warning(
                "VBAR: this ComfyUI has layer classes VBAR loaders do not know (%s); they load "
                "the stock way, outside the VBAR budget", ", ".join(unknown))
    return _ops
