"""Fuzzing the model-file parsers, CI-sized: benchmarks/fuzz_parsers.py runs 10,000+ per parser.

Each parser gets a few hundred seeded mutations plus hypothesis-driven ones, run in subprocess
batches (a segfault ends a worker, not pytest). Every case must load correctly or raise the
pack's typed error naming the file. The inputs that broke a parser once are replayed here too.
"""
import json
import os
import pathlib
import struct
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import fuzz_parsers as F  # noqa: E402

from vbar_loaders.loaders.errors import (  # noqa: E402
    GGUFError, ModelFileError, NF4Error, SafetensorsError)
from vbar_loaders.loaders.gguf.file import GGUFFile  # noqa: E402

CASES = {"safetensors": 300, "nf4": 200, "gguf": 250}
HYPOTHESIS = 30


def _args(tmp_path, *extra):
    # A hang never ends; 30 s (the soft timer fires at half) leaves room for a case that first
    # imports a module while the machine is busy (seen at 5 s on a 2-core box at load 11).
    args = F.parse_args(["--seed", "1", "--jobs", "2", "--case-timeout", "30", *extra])
    args.dir = str(tmp_path)
    return args


@pytest.mark.parametrize("parser", list(CASES))
def test_every_mutated_file_loads_or_raises_typed_error(parser, tmp_path):
    lines = []
    args = _args(tmp_path, "--hypothesis", str(HYPOTHESIS))
    t = F.fuzz([parser], CASES[parser], args, out=lines.append)[parser]
    text = "\n".join(lines)
    assert t.cases >= CASES[parser] + HYPOTHESIS, text
    assert t.bad() == 0, text
    assert not t.falsifying, text
    # Both outcomes really occur: the mutations are neither all fatal nor all harmless.
    assert t.counts["ok"] > CASES[parser] // 20 and t.counts["typed"] > CASES[parser] // 2, text
    # No allocation sized by a header field. The bound leaves room for torch and allocator
    # noise seen on a loaded 2-core machine (up to ~160 MiB once); a header-sized allocation
    # is gigabytes, or a MemoryError that counts as "other" above.
    assert t.peak_growth < 384 << 20, text


def test_harness_reports_crash_hang_and_huge_allocation(tmp_path, monkeypatch):
    """A segfault, a hang that ignores the timer signal and a 1 TB allocation are each caught,
    counted, and the batch goes on with the next case."""
    monkeypatch.setenv("VBAR_FUZZ_SELFTEST", "crash:2,hang:4,alloc:6")
    args = _args(tmp_path, "--jobs", "1", "--case-timeout", "2")
    t = F.fuzz(["safetensors"], 9, args, out=lambda *a: None)["safetensors"]
    assert t.cases == 9
    assert (t.counts["crash"], t.counts["hang"], t.counts["other"]) == (1, 1, 1)
    details = " ".join(g[1]["detail"] for g in t.groups.values())
    assert "SIGSEGV" in details and "no result within" in details
    assert "can't allocate memory" in details or "MemoryError" in details


def test_cases_are_reproducible():
    import random

    for parser in F.PARSERS:
        base = F.build_base(parser)
        a = F.make_case(parser, random.Random(f"{parser}:3:17"), base)
        b = F.make_case(parser, random.Random(f"{parser}:3:17"), base)
        assert a[0] == b[0] and a[1] == b[1]


# --- inputs that once escaped as untyped errors ---------------------------------------------------
def _st_file(tmp_path, header):
    text = json.dumps(header).encode()
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(text)) + text)
    return str(p)


@pytest.mark.parametrize("shape", [[0, 2**62, 4], [2**32] * 5000])
def test_safetensors_shape_overflowing_int64_is_typed(tmp_path, shape):
    from vbar_loaders.loaders.files.safetensors_file import SafetensorsFile

    path = _st_file(tmp_path, {"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}})
    with pytest.raises(SafetensorsError, match="too many elements") as e:
        SafetensorsFile(path).get_tensor("a")
    assert path in str(e.value)


def _nf4_entries():
    from vbar_loaders.loaders.nf4.codec import nf4_state_dict_entries

    sd = nf4_state_dict_entries("l", torch.randn(16, 64), compress_statistics=True)
    key = "l.weight.quant_state.bitsandbytes__nf4"
    return sd, key, json.loads(bytes(sd[key].tolist()))


@pytest.mark.parametrize("edit", [
    {"raw": b"[" * 100000 + b"]" * 100000},   # RecursionError in json
    {"dtype": ["float32"]}, {"dtype": {"a": 1}},   # unhashable
    {"nested_offset": 10**400},                     # OverflowError in math.isfinite
    {"nested_blocksize": 2**64},                    # torch view() overflow
    {"shape": [2**32] * 5000},                      # 48,000-digit byte count
])
def test_nf4_malformed_quant_state_is_typed(edit):
    from vbar_loaders.loaders.nf4.codec import parse_quant_state

    sd, key, qs = _nf4_entries()
    raw = edit.pop("raw", None) or json.dumps(dict(qs, **edit)).encode()
    sd[key] = torch.tensor(list(raw), dtype=torch.uint8)
    with pytest.raises(NF4Error) as e:
        parse_quant_state(sd, "l", "/models/flux-nf4.safetensors")
    assert "/models/flux-nf4.safetensors" in str(e.value)


def _gguf_bytes(kv_payload, n_kv=1):
    key = b"a"
    return (b"GGUF" + struct.pack("<IQQ", 3, 0, n_kv) + struct.pack("<Q", len(key)) + key
            + kv_payload)


@pytest.mark.parametrize("name,blob", [
    # gguf.GGUFReader loops forever (and grows memory) on an array longer than the file.
    ("array-count", _gguf_bytes(struct.pack("<IIQ", 9, 0, 10**12) + b"\1" * 10)),
    ("string-length", _gguf_bytes(struct.pack("<IQ", 8, 2**63) + b"abc")),
    ("bad-type", _gguf_bytes(struct.pack("<I", 77) + b"\0" * 16)),
    ("kv-count", _gguf_bytes(b"", n_kv=2**64 - 1)),
])
def test_gguf_hostile_headers_are_typed(tmp_path, name, blob):
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(blob)
    with pytest.raises(GGUFError) as e:
        GGUFFile(str(path))
    assert str(path) in str(e.value)
    assert isinstance(e.value, ModelFileError)


def test_cli_prints_the_table(tmp_path):
    import subprocess

    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fuzz_parsers.py"), "--cases",
                        "20", "--parsers", "safetensors", "--jobs", "1"], capture_output=True,
                       text=True, timeout=120, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    row = next(line for line in p.stdout.splitlines() if line.startswith("safetensors"))
    assert row.split()[1] == "20", p.stdout
    for col in ("cases", "correct", "typed", "other", "max ms/case", "peak RSS +MiB"):
        assert col in p.stdout
