"""demo.py and benchmarks/bench_vram.py run as a user would run them, in subprocesses."""
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(*args, timeout=300):
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    p = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=env)
    return p.returncode, p.stdout, p.stderr


def test_demo_small_model_matches_plain_torch_and_reports():
    rc, out, err = run(ROOT / "demo.py", "--layers", "2", "--width", "256", "--steps", "2")
    assert rc == 0, out + err
    assert re.search(r"^OK: 2 steps, outputs equal to plain torch", out, re.M), out
    # pool counters, one row per step, with every column the brief asks for
    for col in ("budget MiB", "resident MiB", "peak MiB", "hits", "misses", "offloaded",
                "watermark_fails", "evictions", "mapped MiB", "unmapped MiB"):
        assert col in out, col
    assert re.search(r"^1 +\d+ ", out, re.M) and re.search(r"^2 +\d+ ", out, re.M), out
    # residency table and bar map; the default holds block 0 (hold() is its first fault) and
    # half the weights fit
    assert re.search(r"^blocks\.0\.fc1\.weight +[\d.]+ +held +3 +0$", out, re.M), out
    assert re.search(r"^emb\.weight +[\d.]+ +resident ", out, re.M), out
    assert re.search(r"^head\.weight +[\d.]+ +streamed +2 +2$", out, re.M), out
    m = re.search(r"^map: \[([H#.]+)\]", out, re.M)
    assert m and m.group(1).startswith("#HHHH") and m.group(1).endswith("."), out


def test_demo_explicit_budget_and_no_hold():
    rc, out, err = run(ROOT / "demo.py", "--layers", "1", "--width", "128", "--steps", "1",
                       "--hold", "0", "--budget", "64M")
    assert rc == 0, out + err
    assert "budget 64.0 MiB" in out
    m = re.search(r"^map: \[([H#.]+)\]", out, re.M)
    assert m and set(m.group(1)) == {"#"}, out   # everything fits


def test_demo_hold_that_cannot_fit_is_refused_cleanly():
    rc, out, err = run(ROOT / "demo.py", "--layers", "2", "--width", "256", "--steps", "1",
                       "--budget", "1M")
    assert rc == 2, out + err
    assert "cannot hold" in out and "raise the budget" in out
    assert "Traceback" not in err


def test_bench_vram_quick():
    rc, out, err = run(ROOT / "benchmarks" / "bench_vram.py", "--quick")
    assert rc == 0, out + err
    hit = re.search(r"^hit: fault\+unpin, 1-page slot \(us\) +([\d.]+) +<= 3 +(PASS|MISS)", out, re.M)
    assert hit, out
    assert float(hit.group(1)) > 0
    assert re.search(r"^miss: fault after eviction, 2 MiB pages \(us/MiB\) +[\d.]+", out, re.M), out
    res = re.search(r"^reserve 100 GiB VBAR, 32 MiB pages \(ms\) +([\d.]+) +< 1 +(PASS|MISS)", out, re.M)
    assert res, out
    assert re.search(r"^  address space reserved \(GiB\) +100\.0", out, re.M), out
    assert re.search(r"^goals: ", out, re.M), out


def test_perf_suite_runs_at_tiny_sizes():
    rc, out, err = run(ROOT / "benchmarks" / "perf_suite.py", "--quick", timeout=600)
    assert rc == 0, out[-3000:] + err[-3000:]
    for label in ("P1+P3", "P2", "P4", "P5", "P6", "P5/P6 floor"):
        assert f"--- {label} took" in out and "(exit 0)" in out
    assert "prefetch/bound" in out and "load: ours / load_file" in out


def test_bench_eager_floor_prints_both_verdicts():
    rc, out, err = run(ROOT / "benchmarks" / "bench_eager_floor.py", "--quick")
    assert rc == 0, out + err
    assert re.search(r"fastest exact sequence [\d.]+; its speed-up [\d.]+x \(goal 2x\)", out), out
    assert re.search(r"gather \+ last passes alone: [\d.]+x of bitsandbytes \(goal 0\.5x\)", out), out


def test_bench_gguf_alloc_prints_every_row_and_refuses_a_type_gguf_cannot_make():
    rc, out, err = run(ROOT / "benchmarks" / "bench_gguf_alloc.py", "--shape", "64,512", "--runs", "1")
    assert rc == 0, out + err
    assert out.startswith("Q8_0 64x512 (0.0 M values) -> float32"), out
    rows = re.findall(r"^  (.+?) +([\d.]+) ms +([\d.]+) ns/value +([\d.]+) of fresh decode$", out, re.M)
    assert len(rows) == 4, out
    assert rows[0][0].startswith("decode, fresh output") and float(rows[0][3]) == 1.0, out
    rc, out, err = run(ROOT / "benchmarks" / "bench_gguf_alloc.py", "--qtype", "Q4_K", "--shape", "64,512")
    assert rc == 1 and "gguf-py cannot quantize Q4_K" in out + err and "Traceback" not in err, out + err
