"""Tensor names in text-encoder GGUF files -> the names ComfyUI's encoders load.

llama.cpp's converter renames T5 to its own scheme (``enc.blk.N.attn_q.weight``,
``token_embd.weight`` ...); ComfyUI's T5 uses the Hugging Face names. CLIP text encoders are
written with their original names (there is no llama.cpp scheme for them) and pass unchanged.
"""
import re

# llama.cpp T5 encoder block parts -> Hugging Face T5 sub-module paths
_T5_BLOCK = {
    "attn_q": "layer.0.SelfAttention.q",
    "attn_k": "layer.0.SelfAttention.k",
    "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "attn_norm": "layer.0.layer_norm",
    "ffn_gate": "layer.1.DenseReluDense.wi_0",   # gated-GELU: gate is wi_0, up is wi_1
    "ffn_up": "layer.1.DenseReluDense.wi_1",
    "ffn_down": "layer.1.DenseReluDense.wo",
    "ffn_norm": "layer.1.layer_norm",
}
_T5_TOP = {"token_embd": "shared", "enc.output_norm": "encoder.final_layer_norm"}
_T5_BLK = re.compile(r"^enc\.blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
T5_ARCHS = ("t5", "t5encoder")


def t5_name(name):
    """ComfyUI name for a llama.cpp T5 tensor name; None for decoder/LM-head tensors (ComfyUI
    only runs the encoder); unknown names are returned unchanged."""
    if name.startswith("dec.") or name.startswith("output."):
        return None
    m = _T5_BLK.match(name)
    if m and m.group(2) in _T5_BLOCK:
        return f"encoder.block.{m.group(1)}.{_T5_BLOCK[m.group(2)]}.{m.group(3)}"
    stem, dot, suffix = name.rpartition(".")
    if stem in _T5_TOP:
        return f"{_T5_TOP[stem]}{dot}{suffix}"
    return name


def uses_llama_cpp_t5_names(names):
    return any(n.startswith("enc.blk.") for n in names)


def text_encoder_names(arch, names):
    """{gguf name: ComfyUI name} for the tensors to load (dropped ones are left out)."""
    if arch in T5_ARCHS or uses_llama_cpp_t5_names(names):
        out = {n: t5_name(n) for n in names}
        return {k: v for k, v in out.items() if v is not None}
    return {n: n for n in names}
