"""A sentencepiece model rebuilt from a GGUF file's tokenizer metadata.

Some of ComfyUI's text encoders take their tokenizer from the weights file: UMT5 (Wan, ACE)
and Gemma (Lumina 2) read a serialized sentencepiece model stored as ``spiece_model`` in
Comfy-Org's safetensors. llama.cpp's converter keeps the same vocabulary as GGUF metadata
(``tokenizer.ggml.tokens``, ``scores``, ``token_type``, the normalizer's switches and
character map), from which the model is rebuilt here.

The protobuf is written by hand (a dozen fields of sentencepiece_model.proto): ComfyUI's
requirements include sentencepiece but not the protobuf runtime.
"""
import struct

from ..errors import GGUFError

# tokenizer.ggml.model -> sentencepiece TrainerSpec.model_type
_MODEL_TYPES = {"t5": 1, "llama": 2}     # unigram (T5, UMT5), BPE (Llama 2, Gemma)
_BYTE = 6                                # llama.cpp token types use sentencepiece's numbering
_KEY = "tokenizer.ggml."


def _varint(n):
    n &= (1 << 64) - 1                   # negative int32s are sign-extended to 10 bytes
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _int(field, n):
    return _varint(field << 3) + _varint(int(n))


def _bytes(field, b):
    return _varint(field << 3 | 2) + _varint(len(b)) + b


def _float(field, x):
    return _varint(field << 3 | 5) + struct.pack("<f", x)


def has_sentencepiece(gf):
    # fields() lists keys without decoding: the vocabulary is a quarter million strings
    model = gf.field(_KEY + "model")
    return isinstance(model, str) and model in _MODEL_TYPES and _KEY + "tokens" in gf.fields()


def _flag(gf, name, default):
    v = gf.field(_KEY + name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise GGUFError(gf.path, f"metadata {_KEY}{name} is {v!r}, not a boolean",
                        "The tokenizer metadata is corrupt; convert the model again")
    return v


def sentencepiece_model(gf):
    """Serialized sentencepiece ModelProto (bytes) for the GGUF file ``gf``."""
    model = gf.field(_KEY + "model")
    if not isinstance(model, str) or model not in _MODEL_TYPES:
        raise GGUFError(gf.path, f"its tokenizer ({_KEY}model = {model!r}) is not a sentencepiece "
                        f"one ({' or '.join(_MODEL_TYPES)}), which this encoder needs",
                        "Use the safetensors version of this text encoder, or a GGUF converted "
                        "with llama.cpp's convert_hf_to_gguf.py")
    tokens = gf.field(_KEY + "tokens")
    scores = gf.field(_KEY + "scores")
    types = gf.field(_KEY + "token_type")
    if not isinstance(tokens, list) or not tokens:
        raise GGUFError(gf.path, f"metadata {_KEY}tokens is missing or empty",
                        "The file carries no vocabulary; convert it again with llama.cpp")
    n = len(tokens)
    scores = scores if isinstance(scores, list) else [0.0] * n
    types = types if isinstance(types, list) else [1] * n
    if len(scores) != n or len(types) != n:
        raise GGUFError(gf.path, f"{n} tokens but {len(scores)} scores and {len(types)} token types",
                        "The tokenizer metadata is inconsistent; convert the model again")
    bad = next((f"{_KEY}{what}[{i}] = {v!r}" for what, vals, ok in (
        ("tokens", tokens, lambda v: isinstance(v, str)),
        ("scores", scores, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
        ("token_type", types, lambda v: isinstance(v, int) and 1 <= v <= 6))
        for i, v in enumerate(vals) if not ok(v)), None)
    if bad:
        raise GGUFError(gf.path, f"tokenizer metadata {bad} is not valid",
                        "The tokenizer metadata is corrupt; convert the model again")

    pieces = bytearray()
    for tok, score, typ in zip(tokens, scores, types):
        body = _bytes(1, tok.encode("utf-8")) + _float(2, float(score)) + _int(3, typ)
        pieces += _bytes(1, body)

    def special(name, default):
        v = gf.field(_KEY + name)
        return v if isinstance(v, int) and 0 <= v < n else default

    trainer = (_int(3, _MODEL_TYPES[model]) + _int(4, n)
               + _int(35, any(t == _BYTE for t in types))
               + _int(40, special("unknown_token_id", 0)) + _int(41, special("bos_token_id", -1))
               + _int(42, special("eos_token_id", -1)) + _int(43, special("padding_token_id", -1)))
    charsmap = gf.field(_KEY + "precompiled_charsmap", [])
    if not isinstance(charsmap, list) or not all(isinstance(v, int) for v in charsmap):
        raise GGUFError(gf.path, f"metadata {_KEY}precompiled_charsmap is not a byte array",
                        "The tokenizer metadata is corrupt; convert the model again")
    charsmap = bytes(v & 0xFF for v in charsmap)
    # Defaults as llama.cpp reads these files: a dummy prefix, whitespace kept as it is.
    normalizer = (_bytes(1, b"nmt_nfkc" if charsmap else b"identity") + _bytes(2, charsmap)
                  + _int(3, _flag(gf, "add_space_prefix", True))
                  + _int(4, _flag(gf, "remove_extra_whitespaces", False)) + _int(5, True))
    return bytes(pieces) + _bytes(2, trainer) + _bytes(3, normalizer)
