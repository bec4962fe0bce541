"""Sentencepiece models trained on a generated corpus, and written into GGUF metadata the way
llama.cpp's convert_hf_to_gguf.py writes a sentencepiece vocabulary. Needs sentencepiece and
protobuf (test tools only: the pack itself needs neither)."""
import io
import random

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

WORDS = ("photo red cube wooden table studio light cinematic portrait of a cat dog sunset "
         "mountain river forest night city neon rain reflection ancient temple golden hour "
         "café naïve Ünïcödé 東京 夜景 ｆｕｌｌｗｉｄｔｈ ﬁ ligature 12345 3.14 x2").split()
TEXTS = [
    "a photo of a red cube on a wooden table, studio light",
    "  leading and   repeated   spaces  ",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ and the ﬁ ligature (NFKC folds them)",
    "café naïve 東京の夜景 cinematic",
    "unseen characters: ☃ ✈ 𝔘 and emoji 🙂",
    "digits 1234567890 and 3.14159",
    "",
]


SYLLABLES = "ka lo mi ne ru sa to vi ze pho tre qua ing ly str ght ou ei ck".split()


def corpus(seed=0):
    rng = random.Random(seed)
    for _ in range(3000):
        words = [rng.choice(WORDS) if rng.random() < 0.5 else
                 "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))
                 for _ in range(rng.randint(3, 12))]
        yield " ".join(words)


def train(vocab_size=220, **opts):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=corpus(), model_writer=buf, vocab_size=vocab_size,
                                   minloglevel=2, **opts)
    return buf.getvalue()


def to_gguf(path, model_bytes, tokenizer_model, **kv_extra):
    """What llama.cpp's convert_hf_to_gguf.py writes for a sentencepiece vocabulary."""
    import numpy as np
    import gguf
    from gguf import GGMLQuantizationType as QT

    m = pb.ModelProto.FromString(model_bytes)
    w = gguf.GGUFWriter(str(path), "t5encoder" if tokenizer_model == "t5" else "gemma2")
    w.add_tokenizer_model(tokenizer_model)
    w.add_token_list([p.piece for p in m.pieces])
    w.add_token_scores([p.score for p in m.pieces])
    w.add_token_types([int(p.type) for p in m.pieces])
    ts = m.trainer_spec
    for name, v in (("unk", ts.unk_id), ("bos", ts.bos_id), ("eos", ts.eos_id), ("pad", ts.pad_id)):
        if v >= 0:
            getattr(w, {"unk": "add_unk_token_id", "bos": "add_bos_token_id",
                        "eos": "add_eos_token_id", "pad": "add_pad_token_id"}[name])(v)
    ns = m.normalizer_spec
    w.add_add_space_prefix(ns.add_dummy_prefix)
    w.add_remove_extra_whitespaces(ns.remove_extra_whitespaces)
    if ns.precompiled_charsmap:
        w.add_precompiled_charsmap(ns.precompiled_charsmap)
    for k, v in kv_extra.items():
        w.add_string(k, v)
    w.add_tensor("token_embd.weight", np.zeros((len(m.pieces), 32), np.float32), raw_dtype=QT.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


CASES = {
    # T5/UMT5: unigram, NFKC character map, spaces collapsed
    "unigram_nfkc": ("t5", dict(model_type="unigram", normalization_rule_name="nmt_nfkc")),
    # Gemma: BPE, no normalization, no dummy prefix, byte fallback, whitespace kept
    "bpe_bytes": ("llama", dict(model_type="bpe", normalization_rule_name="identity", byte_fallback=True,
                                vocab_size=600, add_dummy_prefix=False, remove_extra_whitespaces=False,
                                pad_id=0, bos_id=2, eos_id=1, unk_id=3)),
    # Llama 2: BPE with the dummy prefix
    "bpe_prefix": ("llama", dict(model_type="bpe", normalization_rule_name="identity",
                                 remove_extra_whitespaces=False)),
}
