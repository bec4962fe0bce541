"""loaders/gguf/tokenizer.py: a sentencepiece model rebuilt from GGUF metadata tokenizes
exactly like the model it came from.

Real sentencepiece models are trained here on a generated corpus (no downloads), written into
GGUF metadata the way llama.cpp's converter does (pieces, scores and types from the model's
protobuf, the normalizer's switches and character map), rebuilt, and compared on text chosen
to exercise normalization, whitespace handling, byte fallback and unknown characters."""
import pytest

spm = pytest.importorskip("sentencepiece")
pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")

from gguf_helpers import write_gguf  # noqa: E402
from spm_helpers import CASES, TEXTS, to_gguf, train  # noqa: E402
from vbar_loaders.loaders.errors import GGUFError  # noqa: E402
from vbar_loaders.loaders.gguf.file import GGUFFile  # noqa: E402
from vbar_loaders.loaders.gguf.tokenizer import has_sentencepiece, sentencepiece_model  # noqa: E402

@pytest.mark.parametrize("case", CASES)
def test_rebuilt_model_tokenizes_as_the_original(tmp_path, case):
    kind, opts = CASES[case]
    original = train(**opts)
    path = tmp_path / f"{case}.gguf"
    to_gguf(path, original, kind)
    gf = GGUFFile(path)
    assert has_sentencepiece(gf)
    want = spm.SentencePieceProcessor(model_proto=original)
    got = spm.SentencePieceProcessor(model_proto=sentencepiece_model(gf))
    assert got.get_piece_size() == want.get_piece_size()
    assert (got.unk_id(), got.bos_id(), got.eos_id(), got.pad_id()) == \
           (want.unk_id(), want.bos_id(), want.eos_id(), want.pad_id())
    for text in TEXTS:
        assert got.encode(text) == want.encode(text), text
        assert got.encode(text, out_type=str) == want.encode(text, out_type=str), text
        ids = want.encode(text)
        assert got.decode(ids) == want.decode(ids), text
    if case == "bpe_bytes":
        assert any(t.startswith("<0x") for t in want.encode(TEXTS[4], out_type=str))  # fell back to bytes
    if case == "unigram_nfkc":
        assert "ＦＵＬＬ" not in "".join(want.encode(TEXTS[2], out_type=str))   # NFKC applied


def test_protobuf_fields_decode_as_written(tmp_path):
    """The hand-written protobuf parses with the official schema, field for field."""
    original = train(**CASES["bpe_bytes"][1])
    path = tmp_path / "t.gguf"
    to_gguf(path, original, "llama")
    want = pb.ModelProto.FromString(original)
    got = pb.ModelProto.FromString(sentencepiece_model(GGUFFile(path)))
    assert [(p.piece, p.score, p.type) for p in got.pieces] \
        == [(p.piece, p.score, p.type) for p in want.pieces]
    for f in ("model_type", "byte_fallback", "unk_id", "bos_id", "eos_id", "pad_id"):
        assert getattr(got.trainer_spec, f) == getattr(want.trainer_spec, f), f
    for f in ("precompiled_charsmap", "add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces"):
        assert getattr(got.normalizer_spec, f) == getattr(want.normalizer_spec, f), f


def test_non_sentencepiece_and_missing_vocabularies_are_named(tmp_path):
    import numpy as np
    from gguf import GGMLQuantizationType as QT

    path = tmp_path / "gpt2tok.gguf"
    write_gguf(path, {"token_embd.weight": (np.zeros((8, 32), np.float32), QT.F32)}, arch="qwen2",
               kv={"tokenizer.ggml.model": "gpt2"})
    gf = GGUFFile(path)
    assert not has_sentencepiece(gf)
    with pytest.raises(GGUFError, match="gpt2") as e:
        sentencepiece_model(gf)
    assert "gpt2tok.gguf" in str(e.value)
    path = tmp_path / "novocab.gguf"
    write_gguf(path, {"token_embd.weight": (np.zeros((8, 32), np.float32), QT.F32)}, arch="t5encoder",
               kv={"tokenizer.ggml.model": "t5"})
    with pytest.raises(GGUFError, match="tokens"):
        sentencepiece_model(GGUFFile(path))


@pytest.mark.parametrize("kv, problem", [
    ({"tokenizer.ggml.tokens": [1, 2, 3]}, "tokens[0] = 1"),
    ({"tokenizer.ggml.scores": ["x", "y", "z"]}, "scores[0] = 'x'"),
    ({"tokenizer.ggml.token_type": [1, 9, 1]}, "token_type[1] = 9"),
    ({"tokenizer.ggml.scores": [0.0]}, "3 tokens but 1 scores"),
    ({"tokenizer.ggml.add_space_prefix": 1}, "add_space_prefix is 1, not a boolean"),
    ({"tokenizer.ggml.precompiled_charsmap": "abc"}, "precompiled_charsmap is not a byte array"),
    ({"tokenizer.ggml.model": ["llama"]}, "['llama']"),     # found by the fuzzer: was a TypeError
], ids=["int-tokens", "str-scores", "type-9", "short-scores", "int-flag", "str-charsmap",
        "list-model"])
def test_corrupt_vocabulary_is_named(tmp_path, kv, problem):
    import numpy as np
    from gguf import GGMLQuantizationType as QT

    base = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "a", "b"],
            "tokenizer.ggml.scores": [0.0, -1.0, -2.0], "tokenizer.ggml.token_type": [2, 1, 1]}
    path = tmp_path / "corrupt.gguf"
    write_gguf(path, {"token_embd.weight": (np.zeros((3, 32), np.float32), QT.F32)}, arch="gemma2",
               kv={**base, **kv})
    with pytest.raises(GGUFError) as e:
        sentencepiece_model(GGUFFile(path))
    assert problem in str(e.value) and "corrupt.gguf" in str(e.value)
