"""Which layers of a safetensors state dict ComfyUI stores quantized, and what it stored.

ComfyUI has two ways of marking them (read from its ``comfy/utils.py``, ``comfy/ops.py``):

* ``comfy_quant`` (ComfyUI 0.33+): per layer a ``<layer>.comfy_quant`` uint8 tensor holding a
  JSON object (``{"format": "float8_e4m3fn", ...}``), next to ``<layer>.weight`` (the stored
  data) and its scales (``weight_scale``, ``weight_scale_2``, ``input_scale`` ...). The same
  JSON per layer may instead come from the file's ``_quantization_metadata`` header entry.
* ``scaled_fp8`` (older files, still common): a ``<prefix>scaled_fp8`` marker tensor, and per
  fp8 layer ``scale_weight`` (and ``scale_input``). ComfyUI 0.33 converts it to ``comfy_quant``
  format ``float8_e4m3fn`` (``convert_old_quants``); 0.3.x loads it with ``scaled_fp8_ops``.

Nothing here imports ComfyUI: this finds the layers and checks what can be checked without it
(well-formed JSON, a format name, a weight and its scales present). Whether the running ComfyUI
knows a format, and the shapes it expects, is ``comfyui/quant.py``'s business.
"""
import dataclasses
import json

import torch

from ..errors import QuantError

QUANT_SUFFIX = ".comfy_quant"
METADATA_KEY = "_quantization_metadata"
MARKER = "scaled_fp8"
# Tensors ComfyUI 0.33 reads next to a quantized weight (``_load_quantized_module``).
COMPANIONS = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale",
              "weight_s_rel", "weight_s_channel", "weight_codebook")
MAX_CONF_BYTES = 1 << 16


@dataclasses.dataclass
class QuantLayer:
    """One quantized layer as the file stores it."""
    prefix: str        # state-dict key of the layer, without ".weight"
    conf: dict         # its comfy_quant JSON ({"format": ..., optional flags})
    weight: torch.Tensor
    tensors: dict      # companion name (COMPANIONS) -> tensor, as stored
    origin: str        # "comfy_quant", "metadata" or "scaled_fp8"

    @property
    def format(self):
        return self.conf.get("format")

    def stored_bytes(self):
        return sum(t.numel() * t.element_size() for t in (self.weight, *self.tensors.values()))


def encode_conf(conf):
    """A comfy_quant tensor for ``conf``, byte for byte as ComfyUI writes it."""
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def _decode_conf(t, path, key):
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        what = (f"{t.dtype} tensor of shape {list(t.shape)}" if isinstance(t, torch.Tensor)
                else type(t).__name__)
        raise QuantError(path, f"comfy_quant entry is a {what}; ComfyUI writes a 1-D uint8 tensor "
                         f"of JSON text", "The file is damaged or was written by an unknown tool",
                         tensor=key)
    if t.numel() > MAX_CONF_BYTES:
        raise QuantError(path, f"comfy_quant entry is {t.numel()} bytes (a layer's JSON is a few "
                         f"dozen)", "The file is damaged", tensor=key)
    try:
        conf = json.loads(bytes(t.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise QuantError(path, f"comfy_quant entry is not valid JSON ({e})",
                         "The file is damaged or was written by an unknown tool", tensor=key) from None
    return _check_conf(conf, path, key)


def _check_conf(conf, path, key):
    if not isinstance(conf, dict):
        raise QuantError(path, f"comfy_quant JSON is a {type(conf).__name__}, not an object",
                         "The file is damaged or was written by an unknown tool", tensor=key)
    fmt = conf.get("format")
    if not isinstance(fmt, str) or not fmt:
        raise QuantError(path, f"comfy_quant JSON has no \"format\" (got {fmt!r})",
                         "The file is damaged or was written by an unknown tool", tensor=key)
    return conf


def _metadata_layers(metadata, path):
    raw = (metadata or {}).get(METADATA_KEY)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except (TypeError, ValueError) as e:
        raise QuantError(path, f"header entry {METADATA_KEY} is not valid JSON ({e})",
                         "The file is damaged or was written by an unknown tool") from None
    layers = doc.get("layers") if isinstance(doc, dict) else None
    if not isinstance(layers, dict):
        raise QuantError(path, f"header entry {METADATA_KEY} has no \"layers\" object",
                         "The file is damaged or was written by an unknown tool")
    return {k: _check_conf(v, path, f"{METADATA_KEY}:{k}") for k, v in layers.items()}


def _scaled_fp8_layers(sd, path, marker):
    """ComfyUI 0.33's ``convert_old_quants`` reading of one ``scaled_fp8`` marker."""
    prefix = marker[: -len(MARKER)]
    m = sd[marker]
    if not isinstance(m, torch.Tensor) or m.numel() > 2:
        raise QuantError(path, f"scaled_fp8 marker has {getattr(m, 'numel', lambda: '?')()} values "
                         f"(ComfyUI writes an empty or 2-value tensor)", "The file is damaged",
                         tensor=marker)
    conf = {"format": "float8_e4m3fn"}
    if m.numel() == 2:
        conf["full_precision_matrix_mult"] = True
    out = {}
    for k in sd:
        if k.startswith(prefix) and k.endswith(".scale_weight"):
            layer = k[: -len(".scale_weight")]
            out[layer] = dict(conf)
    return out, prefix


def find_layers(sd, path, metadata=None):
    """{layer prefix: QuantLayer} for every quantized layer of ``sd``, and the scaled_fp8
    marker keys found (for ``logical_state_dict``). Raises QuantError, naming the file and
    the tensor, for a malformed entry: bad JSON, no format, a quantized layer without weight."""
    confs, origin, markers = {}, {}, [k for k in sd if k == MARKER or k.endswith("." + MARKER)]
    rename = {}   # layer -> {companion: source key} (scaled_fp8 names its scales differently)
    meta = _metadata_layers(metadata, path)
    if meta is not None:
        for layer, conf in meta.items():
            confs[layer], origin[layer] = conf, "metadata"
    else:
        for marker in markers:
            found, _ = _scaled_fp8_layers(sd, path, marker)
            for layer, conf in found.items():
                confs[layer], origin[layer] = conf, "scaled_fp8"
                rename[layer] = {"weight_scale": layer + ".scale_weight",
                                 "input_scale": layer + ".scale_input"}
    for k, t in sd.items():
        if k.endswith(QUANT_SUFFIX):
            layer = k[: -len(QUANT_SUFFIX)]
            confs[layer], origin[layer] = _decode_conf(t, path, k), "comfy_quant"
    layers = {}
    for layer, conf in confs.items():
        w = sd.get(layer + ".weight")
        if w is None:
            raise QuantError(path, f"layer '{layer}' is marked quantized ({conf['format']}) but "
                             f"the file has no '{layer}.weight'", "The file is damaged",
                             tensor=layer + ".weight")
        names = rename.get(layer) or {c: f"{layer}.{c}" for c in COMPANIONS}
        tensors = {c: sd[key] for c, key in names.items() if key in sd}
        if origin[layer] == "scaled_fp8" and "input_scale" in tensors:
            # convert_old_quants drops a scale_input of exactly 1 (it changes nothing).
            if tensors["input_scale"].numel() == 1 and float(tensors["input_scale"].float().item()) == 1.0:
                del tensors["input_scale"]
        layers[layer] = QuantLayer(layer, conf, w, tensors, origin[layer])
    return layers, markers


def logical_state_dict(sd, layers, markers, keep_markers):
    """The state dict ComfyUI's model detection and loading see.

    Each quantized weight becomes a meta tensor of its *stored* shape and dtype (what a stock
    load's detection reads, so the same model and dtypes are chosen; nothing is allocated) and
    its scales are left out: the loader hands the stored bytes to the VBAR itself. A
    ``comfy_quant`` entry stays for every quantized layer, so ComfyUI 0.33 detects a quantized
    model as it would from the file; ``keep_markers`` keeps the scaled_fp8 marker instead
    (ComfyUI 0.3.x reads it to pick its scaled-fp8 dtypes) and then writes no entries.
    """
    consumed = set()
    for layer in layers.values():
        consumed.update(f"{layer.prefix}.{c}" for c in COMPANIONS)
        consumed.update((f"{layer.prefix}.scale_weight", f"{layer.prefix}.scale_input",
                         layer.prefix + QUANT_SUFFIX))
    if not keep_markers:
        consumed.update(markers)
    out = {k: t for k, t in sd.items() if k not in consumed}
    for layer in layers.values():
        meta = torch.empty(layer.weight.shape, dtype=layer.weight.dtype, device="meta")
        meta.vbar_stored_elsewhere = True     # see comfyui/ops.py AdoptingOp
        out[layer.prefix + ".weight"] = meta
        if not keep_markers:
            out[layer.prefix + QUANT_SUFFIX] = encode_conf(layer.conf)
    return out
