"""Quantized safetensors written the way ComfyUI writes them (run inside ComfyUI's interpreter).

``comfy_quant`` layers are quantized by ComfyUI's own layout classes (``comfy.quant_ops``) and
serialised as its ``_quantized_weight_state_dict`` does: ``weight`` + the layout's
``state_dict`` companions + a ``comfy_quant`` JSON tensor. ``scaled_fp8`` files follow the
older layout ComfyUI 0.3.x saves: a ``scaled_fp8`` marker, fp8 ``weight`` and fp32
``scale_weight`` (and optionally ``scale_input``) per layer.
"""
import json

import torch

# Flux (tiny: one double, one single block) layers, one format each; every other layer bf16.
FLUX_PLAN = {
    "double_blocks.0.img_attn.qkv": {"format": "float8_e4m3fn", "input_scale": 0.02},
    "double_blocks.0.img_attn.proj": {"format": "float8_e5m2"},
    "double_blocks.0.img_mlp.0": {"format": "nvfp4"},
    "double_blocks.0.img_mlp.2": {"format": "mxfp8"},
    "double_blocks.0.txt_attn.qkv": {"format": "int8_tensorwise"},
    "double_blocks.0.txt_attn.proj": {"format": "convrot_w4a4"},
    "single_blocks.0.linear1": {"format": "float8_e4m3fn", "full_precision_matrix_mult": True},
    "single_blocks.0.linear2": {"format": "nvfp4"},
    "final_layer.linear": {"format": "asym_w4a8_int8"},   # small: its quantizer is slow on CPU
}
# SD1.5 UNet Linear layers (checkpoint keys), one format each.
SD15_PREFIX = "model.diffusion_model."
SD15_PLAN = {
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q": {"format": "float8_e4m3fn"},
    "input_blocks.1.1.transformer_blocks.0.ff.net.2": {"format": "nvfp4"},
    "middle_block.1.transformer_blocks.0.attn1.to_out.0": {"format": "mxfp8"},
    "output_blocks.1.1.transformer_blocks.0.attn1.to_v": {"format": "int8_tensorwise"},
    "output_blocks.0.1.transformer_blocks.0.ff.net.2": {"format": "float8_e5m2"},
    "middle_block.1.transformer_blocks.0.ff.net.2": {"format": "asym_w4a8_int8"},
}
SCALED_FLUX = ("double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.2",
               "single_blocks.0.linear1", "final_layer.linear")
SCALED_SD15 = ("input_blocks.1.1.transformer_blocks.0.attn1.to_q",
               "middle_block.1.transformer_blocks.0.ff.net.0.proj")


def encode_conf(conf):
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def quantize_comfy(w, fmt, conf=None):
    """{suffix: tensor} for one weight in ``fmt``, by ComfyUI's own quantizer and serialiser."""
    from comfy.quant_ops import QUANT_ALGOS, QuantizedTensor, get_layout_class

    name = QUANT_ALGOS[fmt]["comfy_tensor_layout"]
    layout = get_layout_class(name)
    kw = {"scale": "recalculate"} if fmt.startswith("float8") else {}
    qdata, params = layout.quantize(w, **kw)
    out = QuantizedTensor(qdata, name, params).state_dict("weight")
    out = {k: v.contiguous() for k, v in out.items()}
    out["comfy_quant"] = encode_conf(conf or {"format": fmt})
    return out


def quantize_state_dict(sd, plan, prefix=""):
    """``sd`` with every layer of ``plan`` ({layer: {"format": ..., flags}}) quantized."""
    out = dict(sd)
    for layer, spec in plan.items():
        key = prefix + layer
        w = out.pop(key + ".weight")
        conf = {k: v for k, v in spec.items() if k != "input_scale"}
        for suffix, t in quantize_comfy(w.to(torch.bfloat16), spec["format"], conf).items():
            out[f"{key}.{suffix}"] = t
        if "input_scale" in spec:
            out[key + ".input_scale"] = torch.tensor(spec["input_scale"], dtype=torch.float32)
    return out


def scaled_fp8_state_dict(sd, layers, prefix="", scale_input=True, fp8=torch.float8_e4m3fn):
    """The older layout: marker + fp8 weights with fp32 scale_weight (and scale_input 1.0)."""
    out = dict(sd)
    for layer in layers:
        key = prefix + layer
        w = out[key + ".weight"].float()
        scale = w.abs().amax() / torch.finfo(fp8).max
        out[key + ".weight"] = (w / scale).to(fp8)
        out[key + ".scale_weight"] = scale.reshape(()).float()
        if scale_input:
            out[key + ".scale_input"] = torch.ones((), dtype=torch.float32)
    out[prefix + "scaled_fp8"] = torch.empty(0, dtype=fp8)
    return out


def lora_for(layers, prefix, shapes, rank=4, seed=0):
    """A LoRA (ComfyUI's ``<prefix><layer>.lora_up/down.weight`` names) for ``layers``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        o, i = shapes[layer]
        out[f"{prefix}{layer}.lora_up.weight"] = torch.randn(o, rank, generator=g) * 0.05
        out[f"{prefix}{layer}.lora_down.weight"] = torch.randn(rank, i, generator=g) * 0.05
    return out
