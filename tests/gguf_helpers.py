"""Write GGUF test files the way real converters do, and dequantize them with gguf-py.

gguf-py quantizes Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 (and F16/BF16) itself but has no K-quant encoder,
so ``quantize_q4_k`` here writes valid Q4_K blocks (simple min/max fit, not llama.cpp's
search; only the layout matters for the tests, which compare against gguf-py's decoder).
"""
import re

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

QK_K = 256


def _f16(x):
    return np.asarray(x, dtype=np.float16)


def quantize_q4_k(x):
    """float32 (rows, cols), cols % 256 == 0 -> uint8 (rows, cols // 256 * 144) Q4_K blocks."""
    x = np.asarray(x, dtype=np.float32)
    rows, cols = x.shape
    assert cols % QK_K == 0, cols
    b = x.reshape(-1, 8, 32)                               # blocks x sub-blocks x values
    lo = np.minimum(b.min(-1), 0.0)
    scale = (b.max(-1) - lo) / 15.0
    mins = -lo
    d = _f16(scale.max(-1) / 63.0)
    dmin = _f16(mins.max(-1) / 63.0)
    df, dminf = d.astype(np.float32), dmin.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df[:, None] > 0, np.rint(scale / df[:, None]), 0)
        mn = np.where(dminf[:, None] > 0, np.rint(mins / dminf[:, None]), 0)
    sc = np.clip(sc, 0, 63).astype(np.uint8)
    mn = np.clip(mn, 0, 63).astype(np.uint8)
    d_eff = df[:, None] * sc
    m_eff = dminf[:, None] * mn
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d_eff[..., None] > 0, np.rint((b + m_eff[..., None]) / d_eff[..., None]), 0)
    q = np.clip(q, 0, 15).astype(np.uint8)                 # blocks x 8 x 32
    scales = np.zeros((b.shape[0], 12), dtype=np.uint8)
    scales[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = (mn[:, 0:4] & 63) | ((mn[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mn[:, 4:8] & 0xF) << 4)
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(-1, 128)   # pairs of sub-blocks
    blocks = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8),
                             scales, qs], axis=1)
    return blocks.reshape(rows, -1)


def quantize(x, qtype):
    """float32 array (any rank >= 1) -> what GGUFWriter.add_tensor takes for ``qtype``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == QT.Q4_K:
        return quantize_q4_k(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
    return gguf.quants.quantize(x, qtype)


def fits(shape, qtype):
    return shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0


def write_gguf(path, tensors, arch="flux", kv=None, orig_shapes=None):
    """``tensors``: {name: (float32 array with the logical shape, qtype)}.

    ``orig_shapes``: {name: stored 2-D shape}; the tensor is written flattened to that shape
    with a ``comfy.gguf.orig_shape.<name>`` record, as city96's converter does for conv weights.
    """
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in (kv or {}).items():
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, (list, tuple)):
            w.add_array(k, list(v))
        else:
            w.add_uint32(k, v)
    for name, (x, qt) in tensors.items():
        x = np.asarray(x, dtype=np.float32)
        if orig_shapes and name in orig_shapes:
            w.add_array(f"comfy.gguf.orig_shape.{name}", [int(d) for d in x.shape])
            x = x.reshape(orig_shapes[name])
        data = quantize(x, qt)
        w.add_tensor(name, data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def reference_state_dict(path):
    """{name: float32 torch tensor (logical shape)} decoded by gguf-py alone."""
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        f = r.get_field(f"comfy.gguf.orig_shape.{t.name}")
        if f is not None:
            shape = tuple(int(f.parts[i][0]) for i in f.data)
        arr = np.asarray(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32)
        out[t.name] = torch.from_numpy(arr.copy()).reshape(shape)
    return out


def convert_safetensors(src, dst, qtype, arch="flux", prefix="", flatten_conv=False):
    """A safetensors model -> GGUF with city96's rules: 1-D and tiny tensors F32, the rest
    ``qtype`` where the row length fits its block, else Q8_0, else F16. ``prefix``: only keys
    under it, with it stripped (a checkpoint's diffusion model). ``flatten_conv``: conv weights
    stored as 256-wide rows plus an orig_shape record, so they can be quantized."""
    from safetensors import safe_open

    tensors, orig = {}, {}
    with safe_open(str(src), framework="pt") as f:
        for key in f.keys():
            if not key.startswith(prefix):
                continue
            k = key[len(prefix):]
            x = f.get_tensor(key).float().numpy()
            if flatten_conv and x.ndim > 2 and x.size % 256 == 0:
                orig[k] = (x.size // 256, 256)
                tensors[k] = (x, qtype if qtype in (QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K)
                              else QT.Q8_0)
                continue
            if x.ndim <= 1 or x.size <= 1024:
                qt = QT.F32
            elif fits(x.shape, qtype):
                qt = qtype
            elif fits(x.shape, QT.Q8_0):
                qt = QT.Q8_0
            else:
                qt = QT.F16
            tensors[k] = (x, qt)
    write_gguf(dst, tensors, arch=arch, orig_shapes=orig)


def write_reference_safetensors(gguf_path, dst):
    """The GGUF's tensors decoded by gguf-py, as float32 safetensors (what a stock loader
    should compute with to match the GGUF exactly)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in reference_state_dict(gguf_path).items()}, str(dst))


# ---- decoder LLMs (Llama, Qwen, Gemma) written as llama.cpp's convert_hf_to_gguf.py does ----
# Written from llama.cpp's documented conventions, independently of loaders/gguf/names.py.
_LLAMA_CPP_PARTS = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_LLAMA_CPP_NORMS = {  # the two archs name the post-attention norm differently
    "llama": {"post_attention_layernorm": "ffn_norm"},
    "gemma": {"post_attention_layernorm": "post_attention_norm",
              "pre_feedforward_layernorm": "ffn_norm",
              "post_feedforward_layernorm": "post_ffw_norm"},
}


def llm_config_sd(cfg, rng, qkv_bias=False, gemma=False, q_norm=False):
    """Random Hugging Face-named float32 weights for a decoder LLM of ``cfg`` (hidden, inter,
    layers, heads, kv_heads, head_dim, vocab)."""
    h, i, hd = cfg["hidden"], cfg["inter"], cfg["head_dim"]
    q, kv = cfg["heads"] * hd, cfg["kv_heads"] * hd

    def r(*shape, s=0.05):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    sd = {"model.embed_tokens.weight": r(cfg["vocab"], h, s=1.0), "model.norm.weight": 1 + r(h)}
    for n in range(cfg["layers"]):
        p = f"model.layers.{n}."
        sd.update({p + "self_attn.q_proj.weight": r(q, h), p + "self_attn.k_proj.weight": r(kv, h),
                   p + "self_attn.v_proj.weight": r(kv, h), p + "self_attn.o_proj.weight": r(h, q),
                   p + "mlp.gate_proj.weight": r(i, h), p + "mlp.up_proj.weight": r(i, h),
                   p + "mlp.down_proj.weight": r(h, i),
                   p + "input_layernorm.weight": 1 + r(h), p + "post_attention_layernorm.weight": 1 + r(h)})
        if qkv_bias:
            sd.update({p + "self_attn.q_proj.bias": r(q), p + "self_attn.k_proj.bias": r(kv),
                       p + "self_attn.v_proj.bias": r(kv)})
        if gemma:
            sd.update({p + "pre_feedforward_layernorm.weight": r(h),
                       p + "post_feedforward_layernorm.weight": r(h)})
        if q_norm:
            sd.update({p + "self_attn.q_norm.weight": r(hd), p + "self_attn.k_norm.weight": r(hd)})
    return sd


def llama_cpp_permute(x, heads):
    """convert_hf_to_gguf.py's LlamaModel.permute: rotate-half pairs -> interleaved pairs."""
    return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


# A minimal sentencepiece (BPE) vocabulary as llama.cpp stores one: Gemma GGUFs need theirs.
SPM_KV = {"tokenizer.ggml.model": "llama",
          "tokenizer.ggml.tokens": ["<pad>", "</s>", "<s>", "<unk>", "\u2581a", "a", "b"],
          "tokenizer.ggml.scores": [0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0],
          "tokenizer.ggml.token_type": [3, 3, 3, 2, 1, 1, 1]}


def write_llm_gguf(path, hf_sd, arch, qtype, heads, kv_heads, extra=None, kv_extra=None):
    """Hugging Face-named weights -> a GGUF as llama.cpp writes it; returns the reference:
    {HF name: float32 torch tensor} that a loader must produce (gguf-py's decode of what was
    written, with llama.cpp's value edits undone the way the model would see them)."""
    gemma = arch.startswith("gemma")
    norms = _LLAMA_CPP_NORMS["gemma" if gemma else "llama"]
    tensors, ref = {}, {}
    for k, x in hf_sd.items():
        if k == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif k == "model.norm.weight":
            name = "output_norm.weight"
        else:
            n, part, kind = re.match(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$", k).groups()
            name = f"blk.{n}.{_LLAMA_CPP_PARTS.get(part) or norms[part]}.{kind}"
        stored = x
        if arch == "llama" and ".self_attn.q_proj." in k:
            stored = llama_cpp_permute(x, heads)
        elif arch == "llama" and ".self_attn.k_proj." in k:
            stored = llama_cpp_permute(x, kv_heads)
        if gemma and k.endswith("norm.weight"):
            stored = x + np.float32(1)
        qt = qtype if x.ndim == 2 and fits(x.shape, qtype) else QT.F32
        tensors[name] = (stored, qt)
        back = gguf.quants.dequantize(quantize(x, qt), qt).reshape(x.shape).astype(np.float32)
        if gemma and k.endswith("norm.weight"):
            back = (x + np.float32(1)) - np.float32(1)   # F32 +1 then -1: as the loader sees it
        ref[k] = torch.from_numpy(np.ascontiguousarray(back))
    for name, x in (extra or {}).items():
        tensors[name] = (x, QT.F32)
    kv = {f"{arch}.attention.head_count": heads, f"{arch}.attention.head_count_kv": kv_heads,
          **(kv_extra or {})}
    write_gguf(path, tensors, arch=arch, kv=kv)
    return ref


# ---- diffusion models written as ComfyUI-GGUF's tools/convert.py (+ fix_5d_tensors) does ----
# Per arch: the keys that identify it (all of one tuple present), the substrings whose tensors
# stay F32, and whether conv-like weights are flattened to 256-wide rows with an orig_shape record
# (only the UNets). Written from the converter's documented behaviour, not from its code.
CONVERTER_ARCHS = {
    "flux": ([("double_blocks.0.img_attn.proj.weight",)], (), False),
    "sd3": ([("joint_blocks.0.x_block.attn.qkv.weight",)], (), False),
    "hidream": ([("caption_projection.0.linear.weight",
                  "double_stream_blocks.0.block.ff_i.shared_experts.w3.weight")],
                (".ff_i.gate.weight", "img_emb.emb_pos"), False),
    "ltxv": ([("adaln_single.emb.timestep_embedder.linear_2.weight",
               "caption_projection.linear_2.weight")], ("scale_shift_table",), False),
    "hyvid": ([("double_blocks.0.img_attn_proj.weight",
                "txt_in.individual_token_refiner.blocks.1.self_attn_qkv.weight")], (), False),
    "wan": ([("blocks.0.self_attn.norm_q.weight", "text_embedding.2.weight", "head.modulation")],
            (".modulation",), False),
    "sdxl": ([("input_blocks.3.0.op.weight", "input_blocks.6.0.op.weight",
               "output_blocks.2.2.conv.weight", "output_blocks.5.2.conv.weight"),
              ("label_emb.0.0.weight",)], (), True),
    "sd1": ([("input_blocks.3.0.op.weight", "input_blocks.6.0.op.weight",
              "input_blocks.9.0.op.weight", "output_blocks.2.1.conv.weight",
              "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight")], (), True),
    # Not in the converter version read (its loader accepts the arch): ComfyUI's detection keys.
    "qwen_image": ([("txt_norm.weight", "img_in.weight")], (), False),
}
_DETECT_ORDER = ("flux", "sd3", "hidream", "ltxv", "hyvid", "wan", "sdxl", "sd1", "qwen_image")


def converter_arch(keys):
    """The ``general.architecture`` ComfyUI-GGUF's converter gives a state dict with ``keys``
    (Chroma is written as "flux": its double_blocks match first)."""
    keys = set(keys)
    for arch in _DETECT_ORDER:
        if any(all(k in keys for k in group) for group in CONVERTER_ARCHS[arch][0]):
            return arch
    raise ValueError("no ComfyUI-GGUF architecture matches these keys")


def write_comfyui_gguf(path, state_dict, qtype=QT.F16, arch=None):
    """A diffusion model's state dict -> a GGUF laid out as ComfyUI-GGUF's converter writes it,
    then quantized to ``qtype`` the way its llama.cpp step does (where a row fits the block).

    F32 (F16 from an fp16 source) for 1-D tensors, tensors of at most 1024 elements and the
    arch's high-precision keys;
    5-D tensors (3-D conv weights) kept 5-D in F32, as fix_5d_tensors adds them back; for the
    UNets (sd1/sdxl) multi-dimensional weights whose last dimension is not a multiple of 256 are
    stored as (n/256, 256) rows with a ``comfy.gguf.orig_shape.<name>`` record. Returns the arch.
    """
    arch = arch or converter_arch(state_dict)
    _, hiprec, shape_fix = CONVERTER_ARCHS.get(arch, ((), (), False))
    tensors, orig = {}, {}
    for name, t in state_dict.items():
        x = t.float().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float32)
        n = x.size
        if x.ndim > 4:                      # fix_5d_tensors adds them back as F32
            tensors[name] = (x, QT.F32)
            continue
        if x.ndim <= 1 or n <= 1024 or any(h in name for h in hiprec):
            # The converter keeps these F32 only from a float32/bf16 source; an fp16 file's
            # stay F16 (and llama.cpp's quantize step leaves 1-D tensors as they are).
            fp16 = isinstance(t, torch.Tensor) and t.dtype == torch.float16
            tensors[name] = (x, QT.F16 if fp16 else QT.F32)
            continue
        if shape_fix and n >= 512 and n % 256 == 0 and x.shape[-1] % 256:
            orig[name] = (n // 256, 256)
            row = 256
        else:
            row = x.shape[-1]
        qt = next(q for q in (qtype, QT.Q8_0, QT.F16)
                  if q in (QT.F16, QT.BF16, QT.F32) or row % gguf.GGML_QUANT_SIZES[q][0] == 0)
        tensors[name] = (x, qt)
    write_gguf(path, tensors, arch=arch, orig_shapes=orig)
    return arch
