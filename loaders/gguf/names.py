"""Tensor names in text-encoder GGUF files -> the names ComfyUI's encoders load.

llama.cpp's converter renames T5 and decoder-only LLMs (Llama, Qwen, Gemma) to its own scheme
(``enc.blk.N.attn_q.weight``, ``blk.N.ffn_gate.weight``, ``token_embd.weight`` ...); ComfyUI's
encoders use the Hugging Face names. CLIP text encoders are written with their original names
(there is no llama.cpp scheme for them) and pass unchanged.
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
    return _renamed(name, _T5_BLK, _T5_BLOCK, "encoder.block", _T5_TOP)


def _renamed(name, block_re, parts, blocks, top):
    """``<blocks>.N.<part path>`` for a block tensor, the mapped name for a top-level one."""
    m = block_re.match(name)
    if m and m.group(2) in parts:
        return f"{blocks}.{m.group(1)}.{parts[m.group(2)]}.{m.group(3)}"
    stem, dot, suffix = name.rpartition(".")
    if stem in top:
        return f"{top[stem]}{dot}{suffix}"
    return name


def uses_llama_cpp_t5_names(names):
    return any(n.startswith("enc.blk.") for n in names)


# llama.cpp decoder block parts -> Hugging Face Llama/Qwen paths (ComfyUI's llama.py)
_LLM_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 2/3 blocks have four norms; llama.cpp's ffn_norm is the pre-feed-forward one there.
_GEMMA_BLOCK = {**_LLM_BLOCK, "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_LLM_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}
_LLM_BLK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# The text part of Qwen2.5-VL is written as qwen2vl; its vision tower goes to a separate
# mmproj file, which ComfyUI's text encoding does not need.
LLM_ARCHS = ("llama", "qwen2", "qwen2vl", "qwen3", "qwen3vl", "gemma2", "gemma3")
GEMMA_ARCHS = ("gemma2", "gemma3")
# Not part of ComfyUI's encoders: the LM head, and Llama 3.1's stored RoPE scaling factors
# (ComfyUI computes its own).
_LLM_DROPPED = ("output.weight", "rope_freqs.weight")


def llm_name(arch, name):
    """ComfyUI name for a llama.cpp decoder-LLM tensor name; None for tensors ComfyUI's
    encoders do not have; unknown names are returned unchanged."""
    if name in _LLM_DROPPED or name.startswith(("v.", "mm.")):
        return None
    parts = _GEMMA_BLOCK if arch in GEMMA_ARCHS else _LLM_BLOCK
    return _renamed(name, _LLM_BLK, parts, "model.layers", _LLM_TOP)


def text_encoder_names(arch, names):
    """{gguf name: ComfyUI name} for the tensors to load (dropped ones are left out)."""
    if arch in T5_ARCHS or uses_llama_cpp_t5_names(names):
        out = {n: t5_name(n) for n in names}
    elif arch in LLM_ARCHS:
        out = {n: llm_name(arch, n) for n in names}
    else:
        return {n: n for n in names}
    return {k: v for k, v in out.items() if v is not None}


def llama_unpermute_index(rows, heads):
    """Row order that undoes llama.cpp's Q/K permutation for Llama-architecture files.

    Its converter regroups each head's rows from rotate-half pairs (i, i + d/2) into
    interleaved pairs (2i, 2i + 1): gguf row ``h*d + 2*i + j`` is Hugging Face row
    ``h*d + j*d/2 + i``. ``hf = gguf[index]`` reverses it."""
    import torch

    if heads <= 0 or rows % (2 * heads):
        raise ValueError(f"{rows} rows do not split into {heads} heads of an even size")
    return torch.arange(rows).view(heads, rows // heads // 2, 2).transpose(1, 2).reshape(-1)
