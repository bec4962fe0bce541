"""Run inside ComfyUI's interpreter (tests/test_comfyui_gguf.py starts it): decoder-LLM text
encoders in GGUF, written as llama.cpp writes them, against ComfyUI's stock handling of the
original weights (as gguf-py decodes them).

Usage: python comfy_gguf_llm_check.py COMFYUI_DIR WORK_DIR [TOKENIZER_DIR]
Prints one JSON line: {case: max |difference|, ...; "<case>_scale": max |output|}.

* qwen_image: Qwen2.5-VL text weights (arch qwen2vl) through the VBAR GGUF CLIP loader,
  type qwen_image, with ComfyUI's own Qwen tokenizer and template: the conditioning equals a
  stock CLIPLoader-style load. ComfyUI's encoder sizes are fixed, so a small config is passed
  to both sides as ``qwen25_7b_model_config`` (as ComfyUI's T5 options allow for T5).
* llama, gemma2: ComfyUI's own Llama2 / Gemma2_2B modules (small configs) loaded once from
  the reference weights and once from our state dict of the GGUF; outputs on the same tokens.
  Their tokenizers are not in the ComfyUI export used for tests, so these skip the loader.
* tokenizer_<name>: TOKENIZER_DIR holds <name>.model (a trained sentencepiece model) and
  <name>.gguf (its vocabulary as llama.cpp writes it); ComfyUI's Wan (UMT5) and Lumina 2
  (Gemma) tokenizers built from the model we rebuild tokenize as with the original: the
  count of prompts that differ.
"""
import json
import os
import sys

COMFY, WORK = sys.argv[1:3]
TOKENIZERS = sys.argv[3] if len(sys.argv) > 3 else None
from comfy_boot import boot  # noqa: E402  (this script's folder is on sys.path)

boot(COMFY)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402

import comfy.model_management as mm  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.text_encoders.llama as llama  # noqa: E402
from gguf_helpers import SPM_KV, llm_config_sd, write_llm_gguf  # noqa: E402
from vbar_loaders.loaders.comfyui.gguf import load_text_encoders, text_encoder_state_dict  # noqa: E402
from vbar_loaders.loaders.gguf.file import GGUFFile  # noqa: E402
from vbar_loaders.loaders.gguf.tokenizer import sentencepiece_model  # noqa: E402

PROMPT = "a photo of a red cube on a wooden table, studio light"
# ComfyUI's configs fix head_dim (128 for Llama/Qwen, 256 for Gemma 2); the rest is shrunk.
QWEN = {"hidden": 256, "inter": 512, "layers": 2, "heads": 4, "kv_heads": 4, "head_dim": 128,
        "vocab": 152064}
QWEN_OPTIONS = {"qwen25_7b_model_config": {
    "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4}}
SMALL = {  # arch -> (our config, ComfyUI class, its config_dict)
    "llama": ({"hidden": 256, "inter": 512, "layers": 2, "heads": 4, "kv_heads": 2,
               "head_dim": 128, "vocab": 512}, llama.Llama2, {}),
    "gemma2": ({"hidden": 256, "inter": 512, "layers": 2, "heads": 2, "kv_heads": 1,
                "head_dim": 256, "vocab": 512}, llama.Gemma2_2B, {}),
}


def diff(a, b):
    return (a - b).abs().max().item()


def qwen_image(out):
    if not hasattr(comfy.sd.CLIPType, "QWEN_IMAGE"):   # ComfyUI before Qwen-Image (Aug 2025)
        out["qwen_image"] = None
        return
    path = os.path.join(WORK, "qwen25vl_q8.gguf")
    hf = llm_config_sd(QWEN, np.random.default_rng(0), qkv_bias=True)
    ref = write_llm_gguf(path, hf, "qwen2vl", QT.Q8_0, QWEN["heads"], QWEN["kv_heads"])
    stock = comfy.sd.load_text_encoder_state_dicts(
        [dict(ref)], clip_type=comfy.sd.CLIPType.QWEN_IMAGE, model_options=dict(QWEN_OPTIONS))
    want = stock.encode_from_tokens(stock.tokenize(PROMPT))
    mm.unload_all_models()
    clip = load_text_encoders([path], "qwen_image", model_options=dict(QWEN_OPTIONS))
    got = clip.encode_from_tokens(clip.tokenize(PROMPT))
    out["qwen_image"] = diff(want, got)
    out["qwen_image_scale"] = want.abs().max().item()
    out["qwen_image_tokens"] = int(want.shape[1])
    # An edit prompt with an image: the file has no vision tower, so this must fail clearly
    image = torch.rand(1, 64, 64, 3)
    try:
        clip.encode_from_tokens(clip.tokenize(PROMPT, images=[image]))
        out["qwen_image_with_image"] = "encoded"
    except Exception as e:   # noqa: BLE001 - reported, the test checks it
        out["qwen_image_with_image"] = f"{type(e).__name__}: {e}"
    mm.unload_all_models()


def small_model(out, arch):
    cfg, cls, extra = SMALL[arch]
    config = {"vocab_size": cfg["vocab"], "hidden_size": cfg["hidden"],
              "intermediate_size": cfg["inter"], "num_hidden_layers": cfg["layers"],
              "num_attention_heads": cfg["heads"], "num_key_value_heads": cfg["kv_heads"], **extra}
    path = os.path.join(WORK, f"{arch}_q4k.gguf")
    hf = llm_config_sd(cfg, np.random.default_rng(1), gemma=arch == "gemma2")
    ref = write_llm_gguf(path, hf, arch, QT.Q4_K, cfg["heads"], cfg["kv_heads"], kv_extra=SPM_KV)
    ours = text_encoder_state_dict(GGUFFile(path))
    ours.pop("spiece_model", None)   # the tokenizer's, not the module's (checked separately)
    tokens = torch.randint(0, cfg["vocab"], (1, 12), generator=torch.Generator().manual_seed(2))
    outputs = []
    for sd in (ref, ours):
        model = cls(config, torch.float32, "cpu", comfy.ops.disable_weight_init)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        assert not unexpected and not [k for k in missing if k.startswith("model.")], (missing, unexpected)
        outputs.append(model(tokens)[0])
    out[arch] = diff(*outputs)
    out[f"{arch}_scale"] = outputs[0].abs().max().item()


def tokenizers(out):
    import comfy.text_encoders.lumina2 as lumina2
    import comfy.text_encoders.wan as wan

    prompts = [PROMPT, "  two  spaces, ＦＵＬＬＷＩＤＴＨ and café 東京 🙂", "(weighted:1.2) prompt"]
    for name, cls in (("umt5", wan.WanT5Tokenizer), ("gemma", lumina2.LuminaTokenizer)):
        with open(os.path.join(TOKENIZERS, name + ".model"), "rb") as f:
            original = f.read()
        rebuilt = sentencepiece_model(GGUFFile(os.path.join(TOKENIZERS, name + ".gguf")))
        want, got = (cls(tokenizer_data={"spiece_model": torch.frombuffer(bytearray(b), dtype=torch.uint8)})
                     for b in (original, rebuilt))
        out[f"tokenizer_{name}"] = sum(want.tokenize_with_weights(p) != got.tokenize_with_weights(p)
                                       for p in prompts)
        out[f"tokenizer_{name}_tokens"] = len(next(iter(want.tokenize_with_weights(PROMPT).values()))[0])


def main():
    out = {}
    qwen_image(out)
    for arch in SMALL:
        small_model(out, arch)
    if TOKENIZERS:
        tokenizers(out)
    print(json.dumps(out))


if __name__ == "__main__":
    with torch.no_grad():
        main()
