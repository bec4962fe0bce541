"""benchmarks/gpu_check.py without a GPU: the no-CUDA exit, the driver probe, and every section
run on the fake CUDA driver and the CPU (--selftest), down to the numbers in its table."""
import ctypes
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))
import gpu_check  # noqa: E402

CITY96 = os.environ.get("CITY96_GGUF_PATH") or "/work/comfy/ggufsrc"


def table(out):
    """The printed table as dicts, cut at the columns the dashes line marks."""
    lines = out.splitlines()
    i = next(n for n, ln in enumerate(lines) if ln.startswith("section "))
    spans = [m.span() for m in re.finditer(r"-+", lines[i + 1])]
    spans[-1] = (spans[-1][0], None)
    keys = ["section", "measure", "value", "ref", "ratio", "verdict"]
    rows = []
    for ln in lines[i + 2:]:
        if not ln.strip():
            break
        rows.append({k: ln[a:b].strip() for k, (a, b) in zip(keys, spans)})
    return rows


def number(text):
    m = re.match(r"^(\d+(?:\.\d+)?)", text)
    assert m, f"not a number: {text!r}"
    return float(m.group(1))


def test_without_cuda_it_says_so_and_exits_0_at_once_importing_nothing_heavy():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    t = time.time()
    p = subprocess.run([sys.executable, "-X", "importtime", str(SCRIPT)], capture_output=True,
                       text=True, env=env, timeout=60)
    took = time.time() - t
    assert p.returncode == 0, p.stdout + p.stderr
    assert "no CUDA device" in p.stdout and "CUDA_VISIBLE_DEVICES" in p.stdout, p.stdout
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in p.stderr.splitlines() if "|" in ln}
    assert not {"torch", "numpy", "gguf", "bitsandbytes", "pytest"} & imported
    assert took < 10, took       # interpreter start-up only (a loaded CI box included)


class _FakeLib:
    def __init__(self, init_rc=0, count=0):
        self.init_rc, self.count = init_rc, count

    def cuInit(self, flags):
        return self.init_rc

    def cuDeviceGetCount(self, ptr):
        ctypes.cast(ptr, ctypes.POINTER(ctypes.c_int)).contents.value = self.count
        return 0


@pytest.mark.parametrize("lib,want", [
    (None, (0, "no CUDA driver library")),
    (_FakeLib(init_rc=100), (0, "CUresult 100")),
    (_FakeLib(count=0), (0, "no device")),
    (_FakeLib(count=2), (2, None)),
])
def test_driver_probe(monkeypatch, lib, want):
    def cdll(name):
        if lib is None:
            raise OSError(f"{name}: cannot open shared object file")
        return lib

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(gpu_check.ctypes, "CDLL", cdll)
    count, why = gpu_check.cuda_probe()
    assert count == want[0]
    assert (why is None) if want[1] is None else (want[1] in why), why


def test_selftest_runs_every_section_and_prints_real_numbers(capsys, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)   # workflows on the CPU take minutes
    argv = ["--selftest"] + (["--comfyui-gguf", CITY96] if os.path.isdir(CITY96) else [])
    rc = gpu_check.main(argv)
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = table(out)
    by = {}
    for r in rows:
        by.setdefault(r["section"], []).append(r)
    assert set(by) == {"conformance", "p2", "p4", "gguf", "nf4", "comfy"}, out

    conf = by["conformance"][0]
    m = re.fullmatch(r"(\d+) passed, 0 failed, 0 skipped", conf["value"])
    assert m and int(m.group(1)) >= 3 and conf["verdict"] == "PASS", conf

    hit = next(r for r in by["p2"] if r["measure"].startswith("hit: fault+unpin"))
    assert 0 < number(hit["value"]) < 1000 and hit["verdict"] in ("PASS", "MISS"), hit
    miss = next(r for r in by["p2"] if r["measure"].startswith("miss:"))
    assert number(miss["value"]) > 0 and number(miss["ratio"]) > 0, miss

    p4 = by["p4"][0]
    assert p4["measure"].startswith("50% resident, prefetch")
    step, bound, ratio = number(p4["value"]), number(p4["ref"]), number(p4["ratio"])
    # The ratio is computed before rounding: it must lie where the printed, rounded step and
    # bound (half a unit in their last digit each way) and its own two decimals allow.
    h = 0.005
    assert step > 0 and bound > h, p4
    assert (step - h) / (bound + h) - h <= ratio <= (step + h) / (bound - h) + h, p4
    assert p4["verdict"] in ("PASS", "MISS"), p4    # speed on a shared CPU is not a failure
    streamed = next(r for r in by["p4"] if "streamed" in r["measure"])
    assert number(streamed["ref"]) > 0, streamed

    from vbar_loaders.loaders.gguf.dequant import QTYPE_BLOCK

    types = [r for r in by["gguf"] if "-> bf16" in r["measure"]]
    assert [r["measure"].split()[0] for r in types] == [qt.name for qt in QTYPE_BLOCK]
    for r in types:
        assert number(r["value"]) > 0 and r["verdict"] == "PASS", r
    if os.path.isdir(CITY96):     # ComfyUI-GGUF compared where it has a kernel
        q8 = next(r for r in types if r["measure"].startswith("Q8_0"))
        assert number(q8["ref"]) > 0 and q8["ratio"].endswith("x"), q8

    for r in by["nf4"]:
        assert number(r["value"]) > 0, r
        if r["verdict"] == "PASS":            # bitsandbytes installed: compared, bit-exact
            assert number(r["ref"]) > 0, r
    assert by["comfy"][0]["verdict"] == "skip"
    assert "all checks passed" in out


def test_a_failing_section_makes_the_exit_status_1(capsys, tmp_path):
    rc = gpu_check.main(["--selftest", "--sections", "gguf", "--comfyui-gguf", str(tmp_path / "nope")])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert table(out)[0]["verdict"] == "FAIL"
    assert "dequant.py not found" in out and "FAILED: 1 row(s)" in out


def test_a_missed_speed_goal_fails_only_with_strict(capsys, monkeypatch):
    miss = gpu_check.row("p2", "hit (us)", "4.2", "<= 3", "", "MISS")
    monkeypatch.setitem(gpu_check.FUNCS, "p2", lambda ctx: [miss])
    assert gpu_check.main(["--selftest", "--sections", "p2"]) == 0
    assert table(capsys.readouterr().out)[0]["verdict"] == "MISS"
    assert gpu_check.main(["--selftest", "--sections", "p2", "--strict"]) == 1
    assert "FAILED: 1 row(s)" in capsys.readouterr().out


def test_isolated_section_reports_through_its_child():
    """As on a GPU: the section runs in a child process and its rows come back as JSON."""
    p = subprocess.run([sys.executable, str(SCRIPT), "--selftest", "--isolate", "--sections", "p2"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    hit = next(r for r in table(p.stdout) if r["measure"].startswith("hit: fault+unpin"))
    assert number(hit["value"]) > 0, p.stdout
    assert "gpu_check: p2 took" in p.stderr


def test_a_section_over_its_time_limit_is_stopped_with_its_children(tmp_path):
    code = ("import subprocess, time\n"
            "p = subprocess.Popen(['sleep', '60'])\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(60)\n")
    t = time.time()
    rc, out, err, secs = gpu_check.run_child([sys.executable, "-c", code], limit=2)
    assert rc is None and secs < 20 and time.time() - t < 20
    grandchild = int(out.split()[0])
    for _ in range(50):            # killed with its group, then reaped by init
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the section's own child {grandchild} outlived the time limit")
