"""Finding quantized layers in a state dict (no ComfyUI): comfy_quant JSON, the
_quantization_metadata header, scaled_fp8 markers, and malformed input refused by name."""
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from vbar_loaders.loaders.errors import ModelFileError, QuantError
from vbar_loaders.loaders.quant.comfy_quant import (encode_conf, find_layers,
                                                    logical_state_dict)

PATH = "/models/q.safetensors"


def fp8_layer(prefix="blk.lin", fmt="float8_e4m3fn", **extra):
    sd = {f"{prefix}.weight": torch.zeros(8, 16, dtype=torch.float8_e4m3fn),
          f"{prefix}.weight_scale": torch.tensor(0.5),
          f"{prefix}.comfy_quant": encode_conf({"format": fmt, **extra}),
          f"{prefix}.bias": torch.zeros(8)}
    return sd


def test_comfy_quant_layers_found_with_their_scales():
    sd = {**fp8_layer(), "plain.weight": torch.zeros(4, 4)}
    sd["blk.lin.input_scale"] = torch.tensor(0.1)
    layers, markers = find_layers(sd, PATH)
    assert list(layers) == ["blk.lin"] and markers == []
    L = layers["blk.lin"]
    assert L.format == "float8_e4m3fn" and L.origin == "comfy_quant"
    assert set(L.tensors) == {"weight_scale", "input_scale"}
    assert L.stored_bytes() == 8 * 16 + 4 + 4


def test_logical_state_dict_hides_stored_tensors_behind_meta():
    sd = fp8_layer()
    layers, markers = find_layers(sd, PATH)
    out = logical_state_dict(sd, layers, markers, keep_markers=False)
    w = out["blk.lin.weight"]
    assert w.is_meta and w.dtype == torch.float8_e4m3fn and tuple(w.shape) == (8, 16)
    assert w.vbar_stored_elsewhere
    assert "blk.lin.weight_scale" not in out and "blk.lin.bias" in out
    assert json.loads(bytes(out["blk.lin.comfy_quant"].tolist())) == {"format": "float8_e4m3fn"}


def test_scaled_fp8_is_read_as_comfyui_033_converts_it():
    sd = {"a.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn),
          "a.scale_weight": torch.tensor(2.0), "a.scale_input": torch.tensor(1.0),
          "b.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn),
          "b.scale_weight": torch.tensor(2.0), "b.scale_input": torch.tensor(0.5),
          "c.weight": torch.zeros(4, 4), "scaled_fp8": torch.empty(2, dtype=torch.float8_e4m3fn)}
    layers, markers = find_layers(sd, PATH)
    assert markers == ["scaled_fp8"] and set(layers) == {"a", "b"}
    assert layers["a"].conf == {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}
    assert "input_scale" not in layers["a"].tensors          # a scale_input of 1 is dropped
    assert float(layers["b"].tensors["input_scale"]) == 0.5
    out = logical_state_dict(sd, layers, markers, keep_markers=False)
    assert "scaled_fp8" not in out and "a.comfy_quant" in out and "a.scale_weight" not in out


def test_metadata_header_layers():
    sd = {"x.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn), "x.weight_scale": torch.tensor(1.0)}
    meta = {"_quantization_metadata": json.dumps({"layers": {"x": {"format": "float8_e4m3fn"}}})}
    layers, _ = find_layers(sd, PATH, meta)
    assert layers["x"].origin == "metadata"


def refused(sd, meta=None):
    with pytest.raises(QuantError) as e:
        find_layers(sd, PATH, meta)
    assert isinstance(e.value, ModelFileError) and PATH in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("raw,why", [
    (torch.tensor(list(b"{not json"), dtype=torch.uint8), "not valid JSON"),
    (torch.tensor(list(b"\xff\xfe"), dtype=torch.uint8), "not valid JSON"),
    (torch.tensor(list(b"[1, 2]"), dtype=torch.uint8), "not an object"),
    (torch.tensor(list(b'{"fmt": "x"}'), dtype=torch.uint8), "no \"format\""),
    (torch.tensor(list(b'{"format": 3}'), dtype=torch.uint8), "no \"format\""),
    (torch.zeros(3, 3, dtype=torch.uint8), "1-D uint8"),
    (torch.zeros(5, dtype=torch.float32), "1-D uint8"),
    (torch.zeros(1 << 17, dtype=torch.uint8), "bytes"),
])
def test_malformed_comfy_quant_is_refused_naming_the_tensor(raw, why):
    sd = fp8_layer()
    sd["blk.lin.comfy_quant"] = raw
    msg = refused(sd)
    assert why in msg and "blk.lin.comfy_quant" in msg


def test_quantized_layer_without_weight_is_refused():
    sd = fp8_layer()
    del sd["blk.lin.weight"]
    msg = refused(sd)
    assert "blk.lin.weight" in msg and "float8_e4m3fn" in msg


@pytest.mark.parametrize("meta", ["{bad", json.dumps({"nolayers": 1}), json.dumps([1]),
                                  json.dumps({"layers": {"x": {"format": ""}}})])
def test_malformed_metadata_header_is_refused(meta):
    refused({"x.weight": torch.zeros(2, 2)}, {"_quantization_metadata": meta})


def test_bad_scaled_fp8_marker_is_refused():
    msg = refused({"scaled_fp8": torch.zeros(3), "a.weight": torch.zeros(2, 2),
                   "a.scale_weight": torch.tensor(1.0)})
    assert "scaled_fp8" in msg


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_any_comfy_quant_bytes_give_a_layer_or_a_named_error(data):
    sd = fp8_layer()
    sd["blk.lin.comfy_quant"] = torch.tensor(list(data), dtype=torch.uint8)
    try:
        layers, _ = find_layers(sd, PATH)
    except QuantError as e:
        assert PATH in str(e) and "blk.lin.comfy_quant" in str(e)
    else:
        assert isinstance(layers["blk.lin"].format, str) and layers["blk.lin"].format
