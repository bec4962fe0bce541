"""Fuzz the model-file parsers: mutated safetensors, GGUF and NF4 files, each in a subprocess.

    .venv/bin/python benchmarks/fuzz_parsers.py --cases 10000 [--parsers safetensors,gguf,nf4]
        [--seed 0] [--jobs 2] [--hypothesis N] [--keep DIR]

Every case must end in a correct load or in the pack's typed error (loaders.errors.ModelFileError)
whose message names the file. Anything else fails the run: another exception, a wrong load, a
crash (the worker dies by a signal), a hang (a case over its time limit), an allocation sized by
an unchecked field (the worker's address space is capped, so it surfaces as MemoryError).

Columns: cases run, correct loads, typed errors, other outcomes (must all be 0: other exceptions,
wrong loads, crashes, hangs), the slowest case, and the peak RSS of a worker over its RSS after
warm-up (seeded cases; it would show an allocation sized by a header field).

Cases run in batches inside worker processes, so a segfault or SIGBUS ends one worker (it is
restarted after that case) instead of the run. Case i of a parser is generated from
``random.Random("<parser>:<seed>:<i>")``, so any case can be replayed on its own:

    .venv/bin/python benchmarks/fuzz_parsers.py --parsers gguf --replay 1234

``--hypothesis N`` also runs N examples per parser driven by hypothesis (``st.randoms``), which
shrinks a failing case to a minimal mutation list.
"""
import argparse
import json
import math
import os
import random
import re
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
PARSERS = ("safetensors", "gguf", "nf4")
EXT = {"safetensors": ".safetensors", "gguf": ".gguf", "nf4": ".safetensors"}

# Values that break parsers: zero, one, powers of two at every width boundary, sizes that
# overflow int64/uint64/float, a trillion elements, negatives.
BIG = [0, 1, 2, 3, 7, 8, 255, 256, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1,
       2**63 - 1, 2**63, 2**64 - 1, 10**12, 10**30]
JSON_ODD = [-1, -2**63, 2**64, 10**400, 1.5, -0.0, 1e308, float("nan"), float("inf"), "4", "",
            None, True, False, [], {}, [1], "F32", "nf4"]


def _odd_value(rng):
    return rng.choice(BIG + JSON_ODD) if rng.random() < 0.8 else _deep(rng)


def _deep(rng):
    # Deep nesting: json.loads recurses, so this probes RecursionError handling.
    depth = rng.choice([50, 5000, 200000])
    return json.loads("[" * 50 + "]" * 50) if depth == 50 else RawJSON("[" * depth + "]" * depth)


class RawJSON(str):
    """A JSON fragment spliced verbatim (json.dumps would recurse on it like the parser)."""


def _dumps(obj):
    """json.dumps that splices RawJSON fragments in verbatim."""
    raws = []

    def walk(o):
        if isinstance(o, RawJSON):
            raws.append(str(o))
            return f"\x00RAW{len(raws) - 1}\x00"
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, list):
            return [walk(v) for v in o]
        return o

    text = json.dumps(walk(obj), separators=(",", ":"))
    for i, raw in enumerate(raws):
        text = text.replace(f'"\\u0000RAW{i}\\u0000"', raw)
    return text


def raw_mutation(rng, blob, log, region=None):
    """Byte-level damage: bit flips, truncation, junk appended, bytes inserted or removed."""
    b = bytearray(blob)
    lo, hi = region or (0, len(b))
    hi = max(lo + 1, min(hi, len(b)))
    op = rng.choice(["flip", "flip", "truncate", "append", "insert", "delete", "zero", "ff"])
    if op == "flip" and b:
        for _ in range(rng.choice([1, 1, 2, 8])):
            i = rng.randrange(lo, hi) if lo < len(b) else rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
            log.append(f"flip byte {i}")
    elif op == "truncate":
        n = rng.randrange(len(b) + 1)
        del b[n:]
        log.append(f"truncate to {n}")
    elif op == "append":
        n = rng.choice([1, 7, 4096])
        b += bytes(rng.getrandbits(8) for _ in range(min(n, 64))) * (n // min(n, 64))
        log.append(f"append {n} bytes")
    elif op == "insert":
        i = rng.randrange(lo, hi + 1) if lo <= len(b) else len(b)
        n = rng.choice([1, 3, 8])
        b[i:i] = bytes(rng.getrandbits(8) for _ in range(n))
        log.append(f"insert {n} bytes at {i}")
    elif op == "delete" and b:
        i = rng.randrange(lo, hi) if lo < len(b) else 0
        n = rng.choice([1, 3, 8])
        del b[i:i + n]
        log.append(f"delete {n} bytes at {i}")
    elif b:
        i = rng.randrange(lo, hi) if lo < len(b) else 0
        n = rng.choice([1, 4, 8, 64])
        b[i:i + n] = (b"\0" if op == "zero" else b"\xff") * len(b[i:i + n])
        log.append(f"{op} {n} bytes at {i}")
    return bytes(b)


def _n_mutations(rng):
    return rng.choice([1, 1, 1, 1, 1, 1, 1, 2, 2, 3])


# ==== safetensors ================================================================================

def st_split(blob):
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def st_join(header, data, length=None):
    text = _dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)   # the spec pads the header with spaces to 8 bytes
    n = len(text) if length is None else length
    return struct.pack("<Q", n) + text + data


def st_base_tensors():
    import torch

    g = torch.Generator().manual_seed(0)
    return {
        "blocks.0.attn.qkv.weight": torch.randn(4, 8, generator=g),
        "blocks.0.attn.qkv.bias": torch.randn(8, generator=g).half(),
        "blocks.0.norm.weight": torch.randn(7, generator=g).bfloat16(),
        "pos_ids": torch.arange(4).view(2, 2),
        "mask": torch.tensor([True, False, True]),
        "scale": torch.tensor(0.5),
        "empty": torch.zeros(0, 3),
        "codes": torch.arange(9, dtype=torch.uint8),
    }


def st_base():
    from safetensors.torch import save

    return save(st_base_tensors(), metadata={"format": "pt", "modelspec.title": "fuzz"})


def _edit_entry(rng, header, log):
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    e = header[name]
    if not isinstance(e, dict):
        header[name] = _odd_value(rng)
        log.append(f"{name} = odd value")
        return
    what = rng.choice(["dtype", "shape", "shape", "offsets", "offsets", "offsets", "keys",
                       "entry", "rename", "reshape"])
    if what == "dtype":
        e["dtype"] = rng.choice(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "I8", "F8_E4M3",
                                 "C64", "F4", "Q4_0", "f32", "", 7, None, ["F32"]])
        log.append(f"{name}.dtype = {e['dtype']!r}")
    elif what == "shape":
        shape = e.get("shape")
        shape = list(shape) if isinstance(shape, list) else []
        op = rng.choice(["set", "append", "pop", "odd", "many"])
        if op == "set" and shape:
            shape[rng.randrange(len(shape))] = _odd_value(rng)
        elif op == "append":
            shape.insert(rng.randrange(len(shape) + 1), rng.choice([0, 1, 2, 10**12, 2**63]))
        elif op == "pop" and shape:
            shape.pop(rng.randrange(len(shape)))
        elif op == "many":
            shape = [rng.choice([1, 2, 2**32]) for _ in range(rng.choice([8, 64, 5000]))]
        else:
            shape = _odd_value(rng)
        e["shape"] = shape
        log.append(f"{name}.shape {op} -> {str(shape)[:80]}")
    elif what == "reshape":
        # Same element count, other shape: must load, with the new shape.
        shape = e.get("shape")
        n = math.prod(shape) if isinstance(shape, list) and all(
            type(d) is int for d in shape) else 4
        e["shape"] = rng.choice([[n], [1, n], [n, 1], [1, 1, n]])
        if n > 2**64:
            e["shape"] = [4]
        log.append(f"{name}.shape = {str(e['shape'])[:80]} (same numel)")
    elif what == "offsets":
        offs = e.get("data_offsets")
        b, end = offs if isinstance(offs, list) and len(offs) == 2 else (0, 0)
        others = [v.get("data_offsets") for k, v in header.items()
                  if k not in ("__metadata__", name) and isinstance(v, dict)]
        others = [o for o in others if o is not None]
        op = rng.choice(["shift", "swap", "end+1", "alias", "odd", "len3", "huge", "neg"])
        if op == "shift":
            d = rng.choice([-8, -1, 1, 8, 4096])
            offs = [b + d, end + d]
        elif op == "swap":
            offs = [end, b]
        elif op == "end+1":
            offs = [b, end + 1]
        elif op == "alias" and others:
            offs = list(rng.choice(others))
        elif op == "len3":
            offs = [b, end, end]
        elif op == "huge":
            offs = [b, b + 10**12] if rng.random() < 0.5 else [2**64 - 8, 2**64]
        elif op == "neg":
            offs = [-4, end]
        else:
            offs = [b, _odd_value(rng)] if rng.random() < 0.5 else _odd_value(rng)
        e["data_offsets"] = offs
        log.append(f"{name}.data_offsets {op} -> {str(offs)[:80]}")
    elif what == "keys":
        key = rng.choice(["dtype", "shape", "data_offsets"])
        if rng.random() < 0.5:
            e.pop(key, None)
            log.append(f"del {name}.{key}")
        else:
            e["extra"] = _odd_value(rng)
            log.append(f"{name}.extra = odd value")
    elif what == "entry":
        header[name] = _odd_value(rng)
        log.append(f"{name} = odd value")
    else:
        new = rng.choice(["", "ü" * 3, "x" * 65536, "__metadata__", "a\u0000b"])
        header[new] = header.pop(name)
        log.append(f"rename {name} -> {new[:20]!r}")


def _edit_metadata(rng, header, log):
    op = rng.choice(["value", "drop", "whole"])
    if op == "value":
        meta = header.get("__metadata__")
        header["__metadata__"] = dict(meta if isinstance(meta, dict) else {}, k=_odd_value(rng))
    elif op == "drop":
        header.pop("__metadata__", None)
    else:
        header["__metadata__"] = _odd_value(rng)
    log.append(f"__metadata__ {op}")


def mutate_safetensors(rng, base, log):
    blob = base["blob"]
    for _ in range(_n_mutations(rng)):
        try:
            header, data = st_split(blob)
        except (ValueError, struct.error, RecursionError):
            header = None
        r = rng.random()
        if header is not None and isinstance(header, dict) and r < 0.55:
            if rng.random() < 0.85:
                _edit_entry(rng, header, log)
            else:
                _edit_metadata(rng, header, log)
            blob = st_join(header, data)
        elif header is not None and isinstance(header, dict) and r < 0.62:
            op = rng.choice(["not-object", "dup-key", "bad-utf8", "bad-json", "deep"])
            text = _dumps(header).encode()
            if op == "not-object":
                text = rng.choice([b"[]", b"1", b'"x"', b"null"])
            elif op == "dup-key":
                k = rng.choice([k for k in header])
                text = text[:-1] + b"," + json.dumps(k).encode() + b":" + \
                    _dumps(header[k]).encode() + b"}"
            elif op == "bad-utf8":
                i = text.index(b'"') + 1
                text = text[:i] + b"\xff\xfe" + text[i:]
            elif op == "bad-json":
                text = text[: rng.randrange(1, len(text))]
            else:
                text = b"{" + b'"a":' * 1 + b"[" * 100000 + b"]" * 100000 + b"}"
            log.append(f"header {op}")
            blob = struct.pack("<Q", len(text)) + text + data
        elif r < 0.72:
            n = struct.unpack("<Q", blob[:8])[0] if len(blob) >= 8 else 0
            v = rng.choice([0, 1, 2, 7, n - 1, n + 1, len(blob) - 8, len(blob) - 7, 2**64 - 1,
                            100 * 2**20 + 1, 2**63])
            v %= 2**64
            blob = struct.pack("<Q", v) + blob[8:]
            log.append(f"header length = {v}")
        elif r < 0.75:
            magic = rng.choice([b"PK\x03\x04", b"\x80\x02", b"GGUF", b""])
            blob = magic + blob[len(magic):] if magic else b""
            log.append(f"magic {magic!r}")
        else:
            n = struct.unpack("<Q", blob[:8])[0] if len(blob) >= 8 else 0
            region = (0, 8 + n) if rng.random() < 0.7 and n < len(blob) else None
            blob = raw_mutation(rng, blob, log, region)
    return blob


def check_safetensors(path, blob, base):
    """Open with the pack's reader; on success every tensor must be exactly what the header says."""
    from vbar_loaders.loaders.files.safetensors_file import DTYPES, SafetensorsFile

    f = SafetensorsFile(path)
    try:
        # Independent oracle: the header, read here with plain json.
        (n,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8:8 + n])
        meta = header.pop("__metadata__", {})
        assert f.metadata == meta, "metadata differs from the header"
        assert sorted(f.keys()) == sorted(header), "tensor names differ from the header"
        for name, e in header.items():
            t = f.get_tensor(name)
            assert t.dtype == DTYPES[e["dtype"]] and list(t.shape) == e["shape"], name
            b, end = e["data_offsets"]
            got = t.contiguous().reshape(-1).view(__import__("torch").uint8).numpy().tobytes()
            assert got == blob[8 + n + b: 8 + n + end], f"{name}: bytes differ from the file"
    finally:
        f.close()
    return "ok"


# ==== GGUF =======================================================================================

VT = dict(UINT8=0, INT8=1, UINT16=2, INT16=3, UINT32=4, INT32=5, FLOAT32=6, BOOL=7, STRING=8,
          ARRAY=9, UINT64=10, INT64=11, FLOAT64=12)
SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
              12: "d"}


class _GGUFOut:
    """A GGUF byte stream that remembers where each header number lies, for field mutations."""

    def __init__(self):
        self.buf = bytearray()
        self.fields = []   # (offset, struct format, label)

    def put(self, fmt, value, label):
        self.fields.append((len(self.buf), fmt, label))
        self.buf += struct.pack("<" + fmt, value)

    def string(self, s, label):
        b = s if isinstance(s, bytes) else s.encode()
        self.put("Q", len(b), label + ".len")
        self.buf += b

    def value(self, vtype, v, label):
        if vtype == VT["STRING"]:
            self.string(v, label)
        elif vtype == VT["ARRAY"]:
            itype, items = v
            self.put("I", itype, label + ".itype")
            self.put("Q", len(items), label + ".count")
            for j, item in enumerate(items):
                self.value(itype, item, f"{label}[{j}]")
        else:
            self.put(SCALAR_FMT[vtype], v, label)


def gguf_build(m):
    """Serialize a model dict: magic, version, kvs [(key, type, value)], tensors
    [{name, dims (ne0 first), type, data, offset?}], alignment."""
    w = _GGUFOut()
    w.buf += m["magic"]
    w.fields.append((0, "4s", "magic"))
    w.put("I", m["version"], "version")
    w.put("Q", len(m["tensors"]), "tensor_count")
    w.put("Q", len(m["kvs"]), "kv_count")
    for i, (key, vtype, value) in enumerate(m["kvs"]):
        w.string(key, f"kv{i}.key")
        w.put("I", vtype, f"kv{i}.type")
        w.value(vtype, value, f"kv{i}")
    align, off, offsets = m["alignment"], 0, []
    for t in m["tensors"]:
        offsets.append(t.get("offset", off))
        off += len(t["data"])
        off += -off % align
    for i, t in enumerate(m["tensors"]):
        w.string(t["name"], f"t{i}.name")
        w.put("I", len(t["dims"]), f"t{i}.n_dims")
        for j, d in enumerate(t["dims"]):
            w.put("Q", d, f"t{i}.dim{j}")
        w.put("I", t["type"], f"t{i}.type")
        w.put("Q", offsets[i], f"t{i}.offset")
    w.buf += b"\0" * (-len(w.buf) % align)
    for t in m["tensors"]:
        w.buf += t["data"] + b"\0" * (-len(t["data"]) % align)
    return bytes(w.buf), w.fields


def _qbytes(qt, dims):
    from gguf import GGML_QUANT_SIZES

    bs, ts = GGML_QUANT_SIZES[qt]
    return math.prod(dims) // bs * ts


def gguf_base_model():
    import numpy as np
    from gguf import GGMLQuantizationType as QT

    rng = np.random.default_rng(0)
    specs = [("img_in.weight", [8, 4], QT.F32), ("img_in.bias", [4], QT.F16),
             ("double_blocks.0.img_attn.qkv.weight", [64, 2], QT.Q8_0),
             ("double_blocks.0.img_mlp.0.weight", [32, 3], QT.Q4_0),
             ("double_blocks.0.img_mlp.2.weight", [256, 1], QT.Q4_K),
             ("txt_in.weight", [32, 2], QT.Q5_1), ("norm.scale", [256], QT.Q6_K),
             ("final_layer.linear.weight", [3, 2], QT.BF16)]
    tensors = []
    for name, dims, qt in specs:
        if qt in (QT.F32, QT.F16, QT.BF16):
            vals = rng.standard_normal(math.prod(dims)).astype(np.float32)
            data = (vals.astype(np.float16).tobytes() if qt == QT.F16 else vals.tobytes()
                    if qt == QT.F32 else (vals.view(np.uint32) >> 16).astype(np.uint16).tobytes())
        else:
            data = rng.integers(0, 256, _qbytes(qt, dims), dtype=np.uint8)
            # Sane fp16 scales in every block header keep the reference free of NaN noise.
            data = data.tobytes()
        tensors.append(dict(name=name, dims=dims, type=int(qt), data=data))
    kvs = [("general.architecture", VT["STRING"], "flux"), ("general.name", VT["STRING"], "fuzz"),
           ("general.alignment", VT["UINT32"], 32), ("general.file_type", VT["UINT32"], 7),
           ("general.quantization_version", VT["UINT32"], 2), ("flux.u8", VT["UINT8"], 7),
           ("flux.i8", VT["INT8"], -1), ("flux.u16", VT["UINT16"], 9),
           ("flux.i16", VT["INT16"], -3), ("flux.i32", VT["INT32"], -7),
           ("flux.f32", VT["FLOAT32"], 1.5), ("flux.bool", VT["BOOL"], True),
           ("flux.u64", VT["UINT64"], 2**40), ("flux.i64", VT["INT64"], -5),
           ("flux.f64", VT["FLOAT64"], 2.5),
           # A sentencepiece vocabulary: the tokenizer rebuild reads all of these.
           ("tokenizer.ggml.model", VT["STRING"], "llama"),
           ("tokenizer.ggml.tokens", VT["ARRAY"], (VT["STRING"], ["<s>", "a", "bc", "ü"])),
           ("tokenizer.ggml.scores", VT["ARRAY"], (VT["FLOAT32"], [0.0, -1.0, -2.0, -3.0])),
           ("tokenizer.ggml.token_type", VT["ARRAY"], (VT["INT32"], [3, 1, 1, 1])),
           ("tokenizer.ggml.bos_token_id", VT["UINT32"], 0),
           ("tokenizer.ggml.add_space_prefix", VT["BOOL"], False),
           ("flux.layers", VT["ARRAY"], (VT["INT32"], [1, 2, 3])),
           ("flux.empty", VT["ARRAY"], (VT["UINT8"], [])),
           ("flux.nested", VT["ARRAY"], (VT["ARRAY"], [(VT["UINT8"], [1, 2]), (VT["UINT8"], [3])]))]
    return dict(magic=b"GGUF", version=3, kvs=kvs, tensors=tensors, alignment=32)


def _gguf_semantic(rng, m, log):
    import copy

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

    m = copy.deepcopy(m)
    ts = m["tensors"]
    i = rng.randrange(len(ts))
    t = ts[i]
    op = rng.choice(["retype", "retype", "reshape", "dims", "ndims", "offset", "align", "dup-key",
                     "dup-tensor", "names", "version", "kvtype", "drop-tensor", "many-tensors"])
    if op == "retype":
        # Another type with data of the right size: loads, or is refused as unsupported.
        qt = rng.choice(list(QT))
        bs, _ = GGML_QUANT_SIZES[qt]
        t["type"], t["dims"] = int(qt), [bs, rng.choice([1, 2])]
        t["data"] = bytes(rng.getrandbits(8) for _ in range(_qbytes(qt, t["dims"])))
        log.append(f"{t['name']} -> {qt.name} {t['dims']}")
    elif op == "reshape":
        n, bs = math.prod(t["dims"]), GGML_QUANT_SIZES[QT(t["type"])][0]
        t["dims"] = rng.choice([[n], [bs, n // bs], [n, 1], [n, 1, 1, 1]])
        if t["dims"][0] % bs:
            t["dims"] = [n]
        log.append(f"{t['name']} dims -> {t['dims']} (same numel)")
    elif op == "dims":
        j = rng.randrange(len(t["dims"]))
        t["dims"][j] = rng.choice(BIG) % 2**64
        log.append(f"{t['name']}.dims[{j}] = {t['dims'][j]}")
    elif op == "ndims":
        t["dims"] = rng.choice([[], [0], [1] * 5, [1] * 64, t["dims"] + [2**32, 2**32]])
        log.append(f"{t['name']}.dims = {str(t['dims'])[:60]}")
    elif op == "offset":
        others = [u for u in ts if u is not t]
        t["offset"] = rng.choice([1, 31, 2**40, 2**64 - 1, 2**63]
                                 + [32 * k for k in range(0, 40, 3)])
        if others and rng.random() < 0.3:
            t["data"] = others[0]["data"]
        log.append(f"{t['name']}.offset = {t['offset']}")
    elif op == "align":
        k = next(j for j, kv in enumerate(m["kvs"]) if kv[0] == "general.alignment")
        choice = rng.choice(["value", "type", "drop"])
        if choice == "value":
            v = rng.choice([0, 1, 2, 3, 8, 64, 4096, 2**31, 2**32 - 1])
            m["kvs"][k] = ("general.alignment", VT["UINT32"], v)
            if v and not v & (v - 1) and v <= 4096:
                m["alignment"] = v   # a valid alignment, honoured by the writer: must load
        elif choice == "type":
            m["kvs"][k] = rng.choice([("general.alignment", VT["UINT64"], 32),
                                      ("general.alignment", VT["STRING"], "32"),
                                      ("general.alignment", VT["INT32"], -32)])
        else:
            del m["kvs"][k]
            m["alignment"] = 32   # the default
        log.append(f"alignment {choice}: {m['kvs'][k] if choice != 'drop' else 'dropped'}")
    elif op == "dup-key":
        m["kvs"].append(rng.choice(m["kvs"]))
        log.append("duplicate kv key")
    elif op == "dup-tensor":
        ts.append(dict(t))
        log.append("duplicate tensor name")
    elif op == "names":
        new = rng.choice([b"", b"\xff\xfe", "ü".encode(), b"x" * 70000, b"a\0b"])
        if rng.random() < 0.5:
            t["name"] = new
        else:
            k = rng.randrange(len(m["kvs"]))
            m["kvs"][k] = (new,) + tuple(m["kvs"][k][1:])
        log.append(f"name -> {new[:12]!r}")
    elif op == "version":
        m["version"] = rng.choice([0, 1, 2, 4, 3 << 24, 2**32 - 1])
        log.append(f"version = {m['version']}")
    elif op == "kvtype":
        k = rng.randrange(len(m["kvs"]))
        key = m["kvs"][k][0]
        m["kvs"][k] = rng.choice([(key, VT["ARRAY"], (VT["FLOAT64"], [1.0] * 3)),
                                  (key, VT["STRING"], "x" * 300),
                                  (key, VT["ARRAY"], (VT["ARRAY"], [])),
                                  (key, VT["BOOL"], False)])
        log.append(f"kv {key!r} retyped")
    elif op == "drop-tensor":
        ts.pop(i)
        log.append(f"drop tensor {t['name']}")
    else:
        ts.extend(dict(t, name=f"{t['name']}.{k}") for k in range(200))
        log.append("200 more tensors")
    return m


def _gguf_field(rng, blob, fields, log):
    fields = [f for f in fields if f[0] + struct.calcsize("<" + f[1]) <= len(blob)]
    if not fields:   # an earlier mutation cut the header short
        return raw_mutation(rng, blob, log)
    off, fmt, label = rng.choice(fields)
    if fmt == "4s":
        new = rng.choice([b"GGUG", b"FUGG", b"\0\0\0\0", b"GGML", b"PK\x03\x04"])
        log.append(f"magic = {new!r}")
        return blob[:off] + new + blob[off + 4:]
    size = struct.calcsize("<" + fmt)
    (old,) = struct.unpack_from("<" + fmt, blob, off)
    if fmt in "fd":
        new = rng.choice([float("nan"), float("inf"), -0.0, 1e308 if fmt == "d" else 3e38])
    elif fmt == "?":
        return blob[:off] + bytes([rng.choice([2, 255])]) + blob[off + 1:]
    else:
        bits = size * 8
        cands = BIG + [old + 1, old - 1, old * 2, old + 32, len(blob), len(blob) - off]
        if label.endswith((".type", ".itype")):
            cands += list(range(0, 16)) + [40, 2**31]
        new = rng.choice(cands) % 2**bits
        if fmt in "bhiq" and new >= 2**(bits - 1):
            new -= 2**bits
    log.append(f"{label} = {new}")
    return blob[:off] + struct.pack("<" + fmt, new) + blob[off + size:]


def mutate_gguf(rng, base, log):
    m = base["model"]
    r = rng.random()
    if r < 0.3:
        m = _gguf_semantic(rng, m, log)
    blob, fields = gguf_build(m)
    for _ in range(_n_mutations(rng) if r >= 0.3 else rng.choice([0, 0, 1])):
        if rng.random() < 0.65:
            blob = _gguf_field(rng, blob, fields, log)
        else:
            head_end = fields[-1][0] + 8 if rng.random() < 0.7 else len(blob)
            blob = raw_mutation(rng, blob, log, (0, head_end))
    return blob


def gguf_open(path):
    """Load every tensor as the pack does: {name: ((qtype, file offset, nbytes), value as
    float32 for quantized tensors / the typed view for plain ones)}."""
    import torch

    from vbar_loaders.loaders.gguf import file as gguf_file
    from vbar_loaders.loaders.gguf import tokenizer as gguf_tokenizer
    from vbar_loaders.loaders.gguf import weights as gguf_weights

    gf = gguf_file.GGUFFile(path)
    for key in gf.fields():
        gf.field(key)
    if gguf_tokenizer.has_sentencepiece(gf):
        gguf_tokenizer.sentencepiece_model(gf)
    out = {}
    for name in gf.keys():
        info = gf.info(name)
        v = gguf_weights.model_tensor(gf, name)
        if gguf_weights.is_gguf_weight(v):
            v = v.dequantize(torch.float32)
        assert tuple(v.shape) == tuple(info.shape), f"{name}: shape {tuple(v.shape)} != info"
        out[name] = ((info.qtype, info.offset, info.nbytes), v)
    return out


def check_gguf(path, blob, base):
    """Every tensor must hold the file's bytes at its offset, dequantized exactly as the
    gguf package's numpy reference does."""
    import numpy as np
    import torch
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, quants

    for name, ((qtype, offset, nbytes), v) in gguf_open(path).items():
        qt = QT(qtype)
        raw = np.frombuffer(blob, dtype=np.uint8, count=nbytes, offset=offset)
        bs, ts = GGML_QUANT_SIZES[qt]
        assert nbytes == v.numel() // bs * ts, f"{name}: {nbytes} bytes for {v.numel()} values"
        if qt.name in ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"):
            got = v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            assert got == raw.tobytes(), f"{name}: values differ from the file's bytes"
            continue
        if v.numel() == 0:
            continue
        ref = quants.dequantize(raw.reshape(-1, ts), qt).reshape(-1).astype(np.float32)
        w = v.float().reshape(-1)
        ref = torch.from_numpy(np.ascontiguousarray(ref))
        same = (w.view(torch.int32) == ref.view(torch.int32)) | (w.isnan() & ref.isnan())
        assert bool(same.all()), f"{name}: {qt.name} dequantized values differ from gguf.quants"
    return "ok"


# ==== NF4 ========================================================================================

NF4_LAYERS = ("double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.0", "final_layer.linear")


def nf4_base():
    import torch

    from vbar_loaders.loaders.nf4.codec import dequantize_nf4, nf4_state_dict_entries, parse_quant_state

    g = torch.Generator().manual_seed(1)
    sd = {}
    # v1 (nested absmax, two nested blocks), v2 fp4 with an odd element count, v1 fp32.
    sd.update(nf4_state_dict_entries(NF4_LAYERS[0], torch.randn(160, 128, generator=g).bfloat16(),
                                     blocksize=64, compress_statistics=True, quant_type="nf4"))
    sd.update(nf4_state_dict_entries(NF4_LAYERS[1], torch.randn(33, 7, generator=g).half(),
                                     blocksize=32, compress_statistics=False, quant_type="fp4"))
    sd.update(nf4_state_dict_entries(NF4_LAYERS[2], torch.randn(2, 300, generator=g),
                                     blocksize=128, compress_statistics=True, quant_type="nf4"))
    sd["final_layer.linear.bias"] = torch.randn(2, generator=g)
    sd = {k: v.contiguous() for k, v in sd.items()}
    want = {p: dequantize_nf4(parse_quant_state(sd, p, "base")) for p in NF4_LAYERS}
    return dict(sd=sd, want=want)


def _nf4_edit_state(rng, sd, log):
    import torch

    keys = [k for k in sd if ".quant_state." in k]
    if not keys:
        return set()
    key = rng.choice(keys)
    prefix = key.split(".weight.quant_state.")[0]
    try:
        qs = json.loads(sd[key].reshape(-1).to(torch.uint8).numpy().tobytes())
    except (ValueError, RecursionError):
        qs = None
    if not isinstance(qs, dict):   # an earlier mutation broke it: edit a fresh copy
        qs = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64]}
    what = rng.choice(["quant_type", "blocksize", "dtype", "shape", "shape", "nested_blocksize",
                       "nested_offset", "nested_dtype", "drop", "whole", "blob"])
    if what == "quant_type":
        qs["quant_type"] = rng.choice(["nf4", "fp4", "int8", "", None, 4, ["nf4"]])
    elif what == "blocksize":
        qs["blocksize"] = rng.choice([32, 64, 128, 4096, 0, -64, 63, 8192, 2**40, "64", 64.0, True,
                                      None, [64]])
    elif what == "dtype":
        qs["dtype"] = rng.choice(["float32", "float16", "bfloat16", "float64", "int8", "", None,
                                  ["float32"], {"a": 1}, 16])
    elif what == "shape":
        shape = qs.get("shape")
        if not (isinstance(shape, list) and shape and all(type(d) is int for d in shape)
                and math.prod(shape) < 2**64):
            shape = [64]
        n = math.prod(shape)
        qs["shape"] = rng.choice([[n], [1, n], shape + [1], shape[::-1], [], [0], [-n], [n, 0],
                                  [10**12], [2**63, 2], [10**400], [1.5], ["4"], [[4]], None, "x",
                                  shape[:-1] + [shape[-1] + 1], [2**32] * 5000])
    elif what in ("nested_blocksize", "nested_offset", "nested_dtype"):
        qs[what] = _odd_value(rng) if rng.random() < 0.7 else rng.choice(
            [256, 1, 2**62, 0.5, "float32", "float16"])
    elif what == "drop":
        field = rng.choice(list(qs))
        del qs[field]
        what = f"drop {field}"
    elif what == "whole":
        qs = _odd_value(rng)
    text = (_dumps(qs).encode() if what != "blob"
            else sd[key].reshape(-1).to(torch.uint8).numpy().tobytes())
    if what == "blob":
        op = rng.choice(["bad-utf8", "truncate", "not-json", "float-dtype", "2d"])
        if op == "bad-utf8":
            text = text[:5] + b"\xc3\x28" + text[5:]
        elif op == "truncate":
            text = text[: rng.randrange(len(text))]
        elif op == "not-json":
            text = b"\x00" * 8
        what = f"blob {op}"
        if op == "float-dtype":
            sd[key] = torch.tensor(list(text), dtype=torch.float32)
            log.append(f"{key}: {what}")
            return {prefix}
        if op == "2d":
            text += b" " * (-len(text) % 2)
            sd[key] = torch.tensor(list(text), dtype=torch.uint8).view(2, -1)
            log.append(f"{key}: {what}")
            return {prefix}
    sd[key] = torch.tensor(list(text), dtype=torch.uint8)
    log.append(f"{key}: {what} -> {text[:80]!r}")
    return {prefix}


def _nf4_edit_tensor(rng, sd, log):
    import torch

    key = rng.choice([k for k in sd if ".quant_state." not in k] or list(sd))
    t = sd[key]
    op = rng.choice(["shorter", "longer", "dtype", "2d", "empty", "drop", "scalar"])
    if op == "shorter" and t.numel():
        t = t.reshape(-1)[: max(0, t.numel() - rng.choice([1, 2, t.numel()]))]
    elif op == "longer":
        t = torch.cat([t.reshape(-1), t.reshape(-1)[:1].repeat(rng.choice([1, 2, 300]))])
    elif op == "dtype":
        dt = rng.choice([torch.float16, torch.float32, torch.uint8, torch.int32, torch.bfloat16,
                         torch.int64, torch.bool, torch.float64])
        # Half: a value cast; half: the same bytes read as another dtype (bnb's quant_storage).
        nbytes = t.numel() * t.element_size()
        if rng.random() < 0.5 or nbytes % torch.empty((), dtype=dt).element_size():
            t = t.to(dt) if dt != torch.bool else t != 0
        else:
            t = t.reshape(-1).view(torch.uint8).view(dt)
    elif op == "2d" and t.numel() % 2 == 0:
        t = t.reshape(2, -1)
    elif op == "empty":
        t = t.reshape(-1)[:0]
    elif op == "scalar" and t.numel():
        t = t.reshape(-1)[0]
    elif op == "drop":
        del sd[key]
        log.append(f"drop {key}")
        return {key.split(".weight")[0]}
    sd[key] = t.contiguous().clone()
    log.append(f"{key}: {op} -> {t.dtype} {tuple(t.shape)}")
    return {key.split(".weight")[0]}


def _nf4_rename(rng, sd, log):
    keys = [k for k in sd if ".quant_state." in k]
    if not keys:
        return set()
    key = rng.choice(keys)
    new = key.rsplit("__", 1)[0] + "__" + rng.choice(["fp4", "nf4", "q8", ""])
    sd[new] = sd.pop(key)
    log.append(f"rename {key} -> {new}")
    return {key.split(".weight")[0]}


def mutate_nf4(rng, base, log):
    """Returns (file bytes, prefixes whose entries were touched)."""
    from safetensors.torch import save

    sd = dict(base["sd"])
    touched = set()
    raw = rng.random() < 0.2
    for _ in range(_n_mutations(rng) if not raw else rng.choice([0, 1])):
        r = rng.random()
        fn = _nf4_edit_state if r < 0.6 else _nf4_edit_tensor if r < 0.93 else _nf4_rename
        touched |= fn(rng, sd, log)
    blob = save(sd)
    if raw:
        blob = raw_mutation(rng, blob, log)
        touched = set(NF4_LAYERS)
    return blob, touched


def check_nf4(path, touched, base):
    """Open as a loader does, parse every 4-bit layer found, dequantize; untouched layers must
    decode bit-identically to the original file."""
    from vbar_loaders.loaders.nf4.codec import dequantize_nf4, parse_quant_state
    from vbar_loaders.loaders.files.safetensors_file import SafetensorsFile

    f = SafetensorsFile(path)
    try:
        keys = f.keys()
        prefixes = sorted({k.split(".weight.quant_state.")[0] for k in keys
                           if ".weight.quant_state." in k}
                          | {k[: -len(".weight.absmax")] for k in keys
                             if k.endswith(".weight.absmax")})
        for p in prefixes:
            w = parse_quant_state(f, p, path)
            out = dequantize_nf4(w)
            assert out.shape == w.shape and out.dtype == w.dtype, f"{p}: wrong shape/dtype"
            if p not in touched and p in base["want"]:
                want = base["want"][p]
                assert out.shape == want.shape and bool((out.view(-1).view(__import__(
                    "torch").uint8) == want.view(-1).view(__import__("torch").uint8)).all()), \
                    f"{p}: untouched layer decodes differently"
    finally:
        f.close()
    return "ok"


# ==== one case ===================================================================================

def build_base(parser):
    if parser == "safetensors":
        return {"blob": st_base()}
    if parser == "gguf":
        return {"model": gguf_base_model()}
    return nf4_base()


def unmutated(parser, base):
    """The valid file every case of ``parser`` starts from."""
    if parser == "safetensors":
        return base["blob"]
    if parser == "gguf":
        return gguf_build(base["model"])[0]
    from safetensors.torch import save

    return save(base["sd"])


def make_case(parser, rng, base):
    """(file bytes, mutation log, extra) for one case."""
    log = []
    if parser == "safetensors":
        return mutate_safetensors(rng, base, log), log, None
    if parser == "gguf":
        return mutate_gguf(rng, base, log), log, None
    blob, touched = mutate_nf4(rng, base, log)
    return blob, log, touched


class CaseTimeout(BaseException):
    """Raised by the per-case timer; BaseException so no parser's `except Exception` eats it."""


def run_case(parser, path, blob, extra, base, pre=None):
    """Classify one case: ('ok'|'typed'|'other'|'hang', detail)."""
    from vbar_loaders.loaders.errors import ModelFileError

    try:
        if pre is not None:
            pre()
        if parser == "safetensors":
            check_safetensors(path, blob, base)
        elif parser == "gguf":
            check_gguf(path, blob, base)
        else:
            check_nf4(path, extra, base)
        return "ok", ""
    except CaseTimeout:
        return "hang", "over the per-case time limit:\n" + traceback.format_exc(limit=-6)
    except ModelFileError as e:
        if path not in str(e):
            return "other", f"typed error does not name the file: {e}"
        return "typed", f"{type(e).__name__}: {e}"[:300]
    except AssertionError as e:
        return "other", f"wrong load: {e}"
    except BaseException as e:  # noqa: BLE001 - the point is to catch everything else
        if isinstance(e, KeyboardInterrupt):
            raise
        return "other", f"{type(e).__name__}: {str(e)[:300]}\n" + traceback.format_exc(limit=-6)


# ==== worker (a subprocess) ======================================================================

def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss():
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: across fork + exec Linux
    carries the parent's peak into it, so a worker started by a large process (a test session
    that loaded models) would report that process's size as its own."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _vm_size():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _write(path, blob):
    # A fresh inode per case: a mapping left from the previous case stays valid.
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)


def worker(args):
    import torch

    torch.set_num_threads(1)
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 1000))
    base = build_base(args.parser)
    path = os.path.join(args.dir, f"case-{args.parser}-{os.getpid()}{EXT[args.parser]}")
    emit = sys.stdout

    def timer(*_):
        raise CaseTimeout()

    signal.signal(signal.SIGALRM, timer)

    # Self-test of the harness (tests/test_fuzz_parsers.py): "crash:3,hang:5,alloc:7" makes
    # those cases segfault, hang with the timer signal blocked, or allocate 1 TB.
    selftest = dict(item.split(":") for item in os.environ.get("VBAR_FUZZ_SELFTEST", "").split(",")
                    if item)
    selftest = {int(v): k for k, v in selftest.items()}

    def one(rng, index):
        blob, log, extra = make_case(args.parser, rng, base)
        _write(path, blob)
        with open(path + ".log", "w") as f:   # read by the parent if this case kills us
            f.write("\n".join(log))
        before = _rss()
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, args.case_timeout * 0.5)
        try:
            pre = (lambda: _selftest(selftest[index])) if index in selftest else None
            kind, detail = run_case(args.parser, path, blob, extra, base, pre)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        dt = time.perf_counter() - t0
        after = _rss()
        rec = {"i": index, "h": index < 0, "kind": kind, "s": dt, "rss": after,
               "grow": after - before,
               "maxrss": _peak_rss()}
        if kind not in ("ok", "typed"):
            rec.update(detail=detail, log=log)
        elif dt > 0.1:   # slow: say which mutation, for the report's slowest case
            rec.update(log=log)
        emit.write(json.dumps(rec) + "\n")
        emit.flush()
        return kind, detail, log

    # Warm-up: the unmutated file loads, then its caches and allocator pools are in place.
    blob = unmutated(args.parser, base)
    for _ in range(3):
        _write(path, blob)
        kind, detail = run_case(args.parser, path, blob, set(), base)
        if kind != "ok":
            raise SystemExit(f"the unmutated {args.parser} file does not load: {detail}")
    baseline = _rss()
    # Cap the address space: an allocation sized by an unchecked header field (say 10^12
    # elements) fails as MemoryError here, an "other" outcome, instead of passing unnoticed
    # because its pages were never touched.
    cap = _vm_size() + (args.vm_headroom << 20)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    emit.write(json.dumps({"ready": True, "baseline": baseline}) + "\n")
    emit.flush()

    for i in range(args.start, args.stop):
        one(random.Random(f"{args.parser}:{args.seed}:{i}"), i)
    if args.hypothesis:
        hypothesis_worker(args, one)
    try:
        os.unlink(path)
    except OSError:
        pass
    emit.write(json.dumps({"done": True}) + "\n")   # what follows is interpreter shutdown
    emit.flush()


def _selftest(what):
    if what == "crash":
        import ctypes

        ctypes.string_at(0)   # SIGSEGV
    elif what == "hang":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})   # the soft timer cannot fire
        time.sleep(3600)
    elif what == "alloc":
        import torch

        torch.empty(10**12, dtype=torch.uint8)


def hypothesis_worker(args, one):
    """The same cases drawn by hypothesis, which shrinks a failure to a minimal mutation list."""
    from hypothesis import HealthCheck, given, seed, settings, strategies as st

    seen = []

    @seed(args.seed)
    @settings(max_examples=args.hypothesis, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.randoms(use_true_random=False))
    def prop(rng):
        kind, detail, log = one(rng, -1 - len(seen))   # negative: not a seeded case index
        seen.append(kind)
        assert kind in ("ok", "typed"), f"{kind}: {detail}\nmutations: {log}"

    try:
        prop()
    except AssertionError as e:
        sys.stdout.write(json.dumps({"falsifying": str(e)[:2000]}) + "\n")
        sys.stdout.flush()


# ==== parent =====================================================================================

class Tally:
    def __init__(self, parser):
        self.parser = parser
        self.counts = {k: 0 for k in ("ok", "typed", "other", "crash", "hang")}
        self.max_s = 0.0
        self.slowest = None         # (case, mutations) of the slowest case
        self.peak_growth = 0        # max over workers: peak RSS - RSS after warm-up (seeded)
        self.max_case_growth = 0    # max over cases: RSS after - RSS before
        self.groups = {}            # failure signature -> [count, first example]
        self.falsifying = []
        self.lock = threading.Lock()

    @property
    def cases(self):
        return sum(self.counts.values())

    def add_failure(self, rec):
        first = rec["detail"].splitlines()[0] if rec.get("detail") else ""
        sig = rec["kind"] + ": " + re.sub(r"\d+", "#", re.sub(r"/\S+", "<path>", first))[:120]
        group = self.groups.setdefault(sig, [0, rec])
        group[0] += 1

    def bad(self):
        return self.counts["other"] + self.counts["crash"] + self.counts["hang"]


def _read_lines(proc, timeout, buf):
    """Yield stdout lines; None if no line arrived within ``timeout()`` seconds."""
    fd = proc.stdout.fileno()
    while True:
        while b"\n" in buf[0]:
            line, buf[0] = buf[0].split(b"\n", 1)
            yield line.decode()
        ready, _, _ = select.select([fd], [], [], timeout())
        if not ready:
            yield None
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return
        buf[0] += chunk


def run_range(parser, start, stop, args, tally, hypothesis=0):
    """Run cases [start, stop) of ``parser``, then ``hypothesis`` examples, in worker processes;
    a worker that crashes or hangs is replaced, starting after the case that killed it."""
    i = start
    while True:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--parser", parser,
               "--seed", str(args.seed), "--start", str(i), "--stop", str(stop),
               "--dir", args.dir, "--case-timeout", str(args.case_timeout),
               "--vm-headroom", str(args.vm_headroom), "--hypothesis", str(hypothesis)]
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
        proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env)
        errs = []
        reader = threading.Thread(target=lambda: errs.append(proc.stderr.read()), daemon=True)
        reader.start()
        baseline, ready, buf, hung, in_hyp, done = None, False, [b""], False, False, False
        state = {"ready": False}
        for line in _read_lines(proc, lambda: args.case_timeout if state["ready"] else 300, buf):
            if line is None:
                hung = True
                break
            rec = json.loads(line)
            if "ready" in rec:
                ready, baseline = True, rec["baseline"]
                state["ready"] = True
                continue
            if "done" in rec:
                done = True
                state["ready"] = False   # shutdown may be slow on a loaded machine: not a hang
                continue
            if "falsifying" in rec:
                tally.falsifying.append(rec["falsifying"])
                continue
            with tally.lock:
                tally.counts[rec["kind"]] += 1
                if rec["s"] > tally.max_s:
                    tally.max_s, tally.slowest = rec["s"], (rec["i"], rec.get("log"))
                if not rec["h"]:   # hypothesis' own bookkeeping grows as it searches
                    tally.peak_growth = max(tally.peak_growth, rec["maxrss"] - baseline)
                tally.max_case_growth = max(tally.max_case_growth, rec["grow"])
                if rec["kind"] not in ("ok", "typed"):
                    tally.add_failure(rec)
            if rec["h"]:
                in_hyp = True
            else:
                i = rec["i"] + 1
        if hung:
            proc.kill()
        rc = proc.wait()
        reader.join(5)
        if not ready:
            raise SystemExit(f"{parser} worker failed to start (rc {rc}):\n"
                             + (errs[0].decode() if errs else ""))
        if done or (rc == 0 and not hung):
            return
        # The case that was running died with the worker: keep its file and mutation list.
        kind = "hang" if hung else "crash"
        case = os.path.join(args.dir, f"case-{parser}-{proc.pid}{EXT[parser]}")
        log = open(case + ".log").read().splitlines() if os.path.exists(case + ".log") else []
        keep = None
        if args.keep and os.path.exists(case):
            keep = os.path.join(args.keep, f"{kind}-{parser}-{i}{EXT[parser]}")
            os.makedirs(args.keep, exist_ok=True)
            shutil.copy(case, keep)
        with tally.lock:
            tally.counts[kind] += 1
            detail = (f"worker exited with {'signal ' + signal.Signals(-rc).name if rc < 0 else rc}"
                      if not hung else f"no result within {args.case_timeout} s")
            err = errs[0].decode(errors="replace").strip().splitlines()[-3:] if errs else []
            tally.add_failure({"i": i, "kind": kind, "detail": detail + "\n" + "\n".join(err),
                               "log": log, "file": keep})
        if in_hyp or i >= stop:
            return   # hypothesis cannot resume mid-search; the crash is the finding
        i += 1


def fuzz(parsers, cases, args, out=print):
    """Run ``cases`` per parser (+ ``args.hypothesis`` hypothesis examples); returns tallies."""
    tallies = {}
    for parser in parsers:
        tally = tallies[parser] = Tally(parser)
        t0 = time.perf_counter()
        jobs = max(1, min(args.jobs, cases))
        bounds = [cases * k // jobs for k in range(jobs + 1)]
        # The hypothesis examples run after the seeded cases of the last worker.
        threads = [threading.Thread(target=run_range, args=(parser, bounds[k], bounds[k + 1], args,
                                                           tally),
                                    kwargs={"hypothesis": args.hypothesis if k == jobs - 1 else 0})
                   for k in range(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        tally.wall_s = time.perf_counter() - t0
    report(tallies, out)
    return tallies


def report(tallies, out=print):
    head = (f"{'parser':<12} {'cases':>7} {'correct':>8} {'typed':>7} {'other':>6} {'crash':>6} "
            f"{'hang':>5} {'max ms/case':>12} {'peak RSS +MiB':>14} {'wall s':>7}")
    out(head)
    out("-" * len(head))
    for p, t in tallies.items():
        c = t.counts
        out(f"{p:<12} {t.cases:>7} {c['ok']:>8} {c['typed']:>7} {c['other']:>6} {c['crash']:>6} "
            f"{c['hang']:>5} {t.max_s * 1e3:>12.1f} {t.peak_growth / 2**20:>14.1f} "
            f"{t.wall_s:>7.1f}")
    for p, t in tallies.items():
        if t.slowest and t.slowest[1]:
            out(f"{p}: slowest case {t.slowest[0]} ({t.max_s * 1e3:.0f} ms): {t.slowest[1]}")
    for p, t in tallies.items():
        groups = sorted(t.groups.values(), key=lambda g: (g[1]["kind"] == "other", -g[0]))
        for n, f in groups[:8]:
            out(f"\n{p}: {n} x {f['kind']}, e.g. case {f['i']}: {f['detail']}\n"
                f"  mutations: {f.get('log')}" + (f"\n  file kept: {f['file']}" if f.get("file")
                                                   else ""))
        for s in t.falsifying[:2]:
            out(f"\n{p}: hypothesis, shrunk: {s}")


def replay(parser, index, args):
    """Run one case in this process, printing its mutations and outcome."""
    base = build_base(parser)
    blob, log, extra = make_case(parser, random.Random(f"{parser}:{args.seed}:{index}"), base)
    path = os.path.join(args.dir, f"replay-{parser}-{index}{EXT[parser]}")
    _write(path, blob)
    print("mutations:", log)
    print(run_case(parser, path, blob, extra, base))
    print("file:", path)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=10000, help="seeded cases per parser")
    ap.add_argument("--parsers", default=",".join(PARSERS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=max(1, min(4, (os.cpu_count() or 2))))
    ap.add_argument("--hypothesis", type=int, default=0,
                    help="also run N hypothesis-driven examples per parser (shrinks failures)")
    ap.add_argument("--case-timeout", type=float, default=10.0, help="seconds per case")
    ap.add_argument("--vm-headroom", type=int, default=2048,
                    help="MiB of address space a worker may add after warm-up")
    ap.add_argument("--keep", default=None, help="keep the files of crashing/hanging cases here")
    ap.add_argument("--replay", type=int, default=None, help="run one case here and explain it")
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--parser", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--stop", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for p in args.parsers.split(","):
        if p and p not in PARSERS:
            ap.error(f"unknown parser {p!r}: choose from {', '.join(PARSERS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    parsers = [p for p in args.parsers.split(",") if p]
    tmp = None
    if args.dir is None:
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        args.dir = tmp = tempfile.mkdtemp(prefix="vbar-fuzz-", dir=shm)
    try:
        if args.replay is not None:
            return replay(parsers[0], args.replay, args)
        print(f"fuzz: {args.cases} seeded cases per parser (seed {args.seed}), "
              f"{args.hypothesis} hypothesis examples, {args.jobs} workers, "
              f"{args.case_timeout:g} s per case")
        tallies = fuzz(parsers, args.cases, args)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if any(t.bad() for t in tallies.values()) else 0


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    sys.exit(main())
