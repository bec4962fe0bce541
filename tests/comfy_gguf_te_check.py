"""Run inside ComfyUI's interpreter (tests/test_comfyui_gguf.py starts it): GGUF text encoders
through the VBAR loader vs ComfyUI's stock loading of the same weights dequantized by gguf-py.

Usage: python comfy_gguf_te_check.py COMFYUI_DIR WORK_DIR CLIP_L_SAFETENSORS
Prints one JSON line: {case: max |difference| of cond and pooled output, ...}.

No tiny T5 exists for stock loaders (Flux's builds a full T5-XXL), so the T5 here is written
with llama.cpp's names and a small config, passed to both sides as ``t5xxl_model_config``.
"""
import json
import os
import sys

COMFY, WORK, CLIP_L = sys.argv[1:4]
from comfy_boot import boot  # noqa: E402  (this script's folder is on sys.path)

boot(COMFY)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402

import comfy.model_management as mm  # noqa: E402
import comfy.sd  # noqa: E402
from gguf_helpers import convert_safetensors, reference_state_dict, write_gguf  # noqa: E402
from vbar_loaders.loaders.comfyui.gguf import load_text_encoders  # noqa: E402
from vbar_loaders.loaders.gguf.names import t5_name  # noqa: E402

T5_CONFIG = {"num_layers": 2, "d_model": 256, "d_ff": 512, "num_heads": 4, "d_kv": 64,
             "vocab_size": 32128, "relative_attention_num_buckets": 32}
OPTIONS = {"t5xxl_model_config": T5_CONFIG}
PROMPT = "a photo of a red cube on a wooden table, studio light"


def tiny_t5(path, qtype):
    rng = np.random.default_rng(0)
    d, ff, inner, L = T5_CONFIG["d_model"], T5_CONFIG["d_ff"], 256, T5_CONFIG["num_layers"]

    def r(*shape, s=0.05):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    t = {"token_embd.weight": (r(T5_CONFIG["vocab_size"], d, s=1.0), qtype),
         "enc.output_norm.weight": (1 + r(d), QT.F32),
         "enc.blk.0.attn_rel_b.weight": (r(32, 4, s=1.0), QT.F16)}
    for i in range(L):
        p = f"enc.blk.{i}."
        t.update({p + "attn_q.weight": (r(inner, d), qtype), p + "attn_k.weight": (r(inner, d), qtype),
                  p + "attn_v.weight": (r(inner, d), qtype), p + "attn_o.weight": (r(d, inner), qtype),
                  p + "attn_norm.weight": (1 + r(d), QT.F32), p + "ffn_norm.weight": (1 + r(d), QT.F32),
                  p + "ffn_gate.weight": (r(ff, d), qtype), p + "ffn_up.weight": (r(ff, d), qtype),
                  p + "ffn_down.weight": (r(d, ff), qtype)})
    t["dec.blk.0.attn_q.weight"] = (r(inner, d), qtype)    # decoder: must be ignored
    write_gguf(path, t, arch="t5encoder")


def encode(clip):
    tokens = clip.tokenize(PROMPT)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return cond, pooled


def diff(a, b):
    return max((a[0] - b[0]).abs().max().item(),
               0.0 if a[1] is None else (a[1] - b[1]).abs().max().item())


def main():
    out = {}
    clip_gguf = os.path.join(WORK, "te_clip_l_q8.gguf")
    t5_gguf = os.path.join(WORK, "te_t5_q8.gguf")
    convert_safetensors(CLIP_L, clip_gguf, QT.Q8_0, arch="clip")
    tiny_t5(t5_gguf, QT.Q8_0)
    ref_clip = reference_state_dict(clip_gguf)
    ref_t5 = {t5_name(k): v for k, v in reference_state_dict(t5_gguf).items() if t5_name(k)}
    ref_clip_file = os.path.join(WORK, "te_clip_l_ref.safetensors")
    from safetensors.torch import save_file

    save_file(ref_clip, ref_clip_file)

    # CLIPLoader, stable_diffusion: CLIP-L alone
    stock = comfy.sd.load_text_encoder_state_dicts([dict(ref_clip)],
                                                   clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    want = encode(stock)
    mm.unload_all_models()
    got = encode(load_text_encoders([clip_gguf], "stable_diffusion"))
    out["clip_l_gguf"] = diff(want, got)
    mm.unload_all_models()

    # DualCLIPLoader, flux: CLIP-L + T5, both GGUF, then mixed with safetensors CLIP-L
    stock = comfy.sd.load_text_encoder_state_dicts([dict(ref_clip), dict(ref_t5)],
                                                   clip_type=comfy.sd.CLIPType.FLUX,
                                                   model_options=dict(OPTIONS))
    want = encode(stock)
    mm.unload_all_models()
    got = encode(load_text_encoders([clip_gguf, t5_gguf], "flux", model_options=dict(OPTIONS)))
    out["flux_dual_gguf"] = diff(want, got)
    mm.unload_all_models()
    got = encode(load_text_encoders([ref_clip_file, t5_gguf], "flux", model_options=dict(OPTIONS)))
    out["flux_mixed_safetensors_gguf"] = diff(want, got)
    out["t5_cond_scale"] = want[0].abs().max().item()
    print(json.dumps(out))


if __name__ == "__main__":
    with torch.no_grad():
        main()
