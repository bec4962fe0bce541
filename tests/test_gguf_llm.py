"""Decoder-LLM text encoders in GGUF (Llama, Qwen 2/2.5-VL/3, Gemma 2/3), as llama.cpp writes
them: the state dict handed to ComfyUI has its names and exactly the values of the original
weights (after gguf-py's decode), with llama.cpp's Q/K permutation and norm offset undone."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from gguf_helpers import (SPM_KV, llama_cpp_permute, llm_config_sd, reference_state_dict, write_gguf,
                          write_llm_gguf)
from vbar_loaders.loaders.comfyui.gguf import text_encoder_state_dict
from vbar_loaders.loaders.errors import GGUFError
from vbar_loaders.loaders.gguf.file import GGUFFile
from vbar_loaders.loaders.gguf.names import llama_unpermute_index, llm_name
from vbar_loaders.loaders.gguf.weights import is_gguf_weight

CFG = {"hidden": 256, "inter": 512, "layers": 2, "heads": 8, "kv_heads": 2, "head_dim": 32,
       "vocab": 300}
CASES = {  # arch -> llm_config_sd options
    "llama": {},
    "qwen2": {"qwen_bias": True},
    "qwen2vl": {"qwen_bias": True},
    "qwen3": {"q_norm": True},
    "gemma2": {"gemma": True},
    "gemma3": {"gemma": True, "q_norm": True},
}


def values(sd):
    return {k: (v.dequantize(torch.float32) if is_gguf_weight(v) else v.float()) for k, v in sd.items()}


def build(tmp_path, arch, qtype, seed=0, extra=None, vocabulary=True):
    opts = dict(CASES[arch])
    hf = llm_config_sd(CFG, np.random.default_rng(seed), qkv_bias=opts.pop("qwen_bias", False), **opts)
    path = tmp_path / f"{arch}.gguf"
    ref = write_llm_gguf(path, hf, arch, qtype, CFG["heads"], CFG["kv_heads"], extra=extra,
                         kv_extra=SPM_KV if vocabulary else None)
    return path, ref


@pytest.mark.parametrize("arch", CASES)
@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_K], ids=lambda q: q.name)
def test_names_and_values_are_the_original_weights(tmp_path, arch, qtype):
    extra = {"output.weight": np.zeros((CFG["vocab"], CFG["hidden"]), np.float32),
             "rope_freqs.weight": np.ones(16, np.float32)}
    path, ref = build(tmp_path, arch, qtype, extra=extra)
    sd = text_encoder_state_dict(GGUFFile(path))
    # Gemma's tokenizer travels with the weights (ComfyUI reads it from there)
    tokenizer = sd.pop("spiece_model", None)
    assert (tokenizer is not None) == arch.startswith("gemma")
    assert tokenizer is None or (tokenizer.dtype == torch.uint8 and tokenizer.numel() > 0)
    assert set(sd) == set(ref)          # LM head and RoPE factors dropped, nothing else
    got = values(sd)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    # Quantized weights stay quantized, Q/K included (their rows moved as whole blocks).
    assert is_gguf_weight(sd["model.layers.1.self_attn.q_proj.weight"])
    assert is_gguf_weight(sd["model.layers.0.self_attn.k_proj.weight"])


def test_llama_permutation_is_really_undone(tmp_path):
    """Against the check above passing by accident (a permutation that is its own inverse,
    or none): the stored Q rows differ from the original, ours equal it."""
    path, ref = build(tmp_path, "llama", QT.Q8_0, seed=3)
    gf = GGUFFile(path)
    stored = reference_state_dict(path)["blk.0.attn_q.weight"]
    want = ref["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(stored, want)
    assert torch.equal(values(text_encoder_state_dict(gf))["model.layers.0.self_attn.q_proj.weight"], want)


def test_gemma_names_its_four_norms(tmp_path):
    assert llm_name("gemma2", "blk.4.ffn_norm.weight") == "model.layers.4.pre_feedforward_layernorm.weight"
    assert llm_name("gemma2", "blk.4.post_attention_norm.weight") \
        == "model.layers.4.post_attention_layernorm.weight"
    assert llm_name("gemma3", "blk.4.post_ffw_norm.weight") \
        == "model.layers.4.post_feedforward_layernorm.weight"
    assert llm_name("llama", "blk.4.ffn_norm.weight") == "model.layers.4.post_attention_layernorm.weight"
    assert llm_name("qwen2vl", "v.blk.0.attn_q.weight") is None    # a vision tower: not ours
    assert llm_name("qwen2", "blk.0.some_new_part.weight") == "blk.0.some_new_part.weight"


@pytest.mark.parametrize("heads", [1, 2, 4, 8])
def test_unpermute_index_inverts_llama_cpp(heads):
    x = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    back = torch.from_numpy(llama_cpp_permute(x, heads))[llama_unpermute_index(64, heads)]
    assert torch.equal(back, torch.from_numpy(x))


def test_llama_without_head_count_is_refused(tmp_path):
    path = tmp_path / "no_heads.gguf"
    write_gguf(path, {"blk.0.attn_q.weight": (np.ones((64, 32), np.float32), QT.Q8_0)}, arch="llama")
    with pytest.raises(GGUFError, match="llama.attention.head_count") as e:
        text_encoder_state_dict(GGUFFile(path))
    assert "no_heads.gguf" in str(e.value)


def test_non_integer_kv_head_count_is_refused(tmp_path):
    path = tmp_path / "kv_heads.gguf"
    write_gguf(path, {"blk.0.attn_k.weight": (np.ones((64, 32), np.float32), QT.Q8_0)}, arch="llama",
               kv={"llama.attention.head_count": 8, "llama.attention.head_count_kv": "two"})
    with pytest.raises(GGUFError, match="head_count_kv is 'two'"):
        text_encoder_state_dict(GGUFFile(path))


def test_head_count_that_does_not_fit_the_rows_is_refused(tmp_path):
    path = tmp_path / "bad_heads.gguf"
    write_gguf(path, {"blk.0.attn_k.weight": (np.ones((96, 32), np.float32), QT.Q8_0)}, arch="llama",
               kv={"llama.attention.head_count": 8, "llama.attention.head_count_kv": 5})
    with pytest.raises(GGUFError, match="5 heads") as e:
        text_encoder_state_dict(GGUFFile(path))
    assert "blk.0.attn_k.weight" in str(e.value) or "k_proj" in str(e.value)


def test_unknown_text_architecture_lists_the_supported_ones(tmp_path):
    path = tmp_path / "phi.gguf"
    write_gguf(path, {"blk.0.attn_q.weight": (np.ones((64, 32), np.float32), QT.Q8_0)}, arch="phi3")
    with pytest.raises(GGUFError, match="phi3") as e:
        text_encoder_state_dict(GGUFFile(path))
    assert "qwen2vl" in str(e.value) and "gemma2" in str(e.value)


def test_gemma_without_a_vocabulary_is_refused(tmp_path):
    path, _ = build(tmp_path, "gemma2", QT.Q8_0, vocabulary=False)
    with pytest.raises(GGUFError, match="no sentencepiece vocabulary") as e:
        text_encoder_state_dict(GGUFFile(path))
    assert "gemma2.gguf" in str(e.value)


@pytest.mark.parametrize("vocab, gets_tokenizer", [(256384, True), (32128, False)],
                         ids=["umt5", "t5"])
def test_t5_gets_the_file_tokenizer_only_for_umt5(tmp_path, vocab, gets_tokenizer):
    """UMT5 (Wan, ACE) tokenizes with the file's vocabulary; T5 with ComfyUI's own."""
    path = tmp_path / "t5.gguf"
    write_gguf(path, {"token_embd.weight": (np.zeros((vocab, 32), np.float32), QT.Q8_0),
                      "enc.blk.0.attn_q.weight": (np.ones((32, 32), np.float32), QT.Q8_0)},
               arch="t5encoder", kv={**SPM_KV, "tokenizer.ggml.model": "t5"})
    sd = text_encoder_state_dict(GGUFFile(path))
    assert ("spiece_model" in sd) == gets_tokenizer
    assert sd["shared.weight"].shape == (vocab, 32)
