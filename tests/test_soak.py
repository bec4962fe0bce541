"""Soak, CI-sized: benchmarks/soak.py loads, runs and unloads three models 60 times (1000 in the
benchmark) under a budget smaller than any two of them, with a snapshot thread hammering the
allocator. Runs in a subprocess: a page fault on an unmapped host page must fail the test, not
kill pytest, and the RSS trend must not include pytest's own allocations."""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_soak_returns_every_page_and_keeps_outputs_and_rss_flat():
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    env.pop("VBAR_BUDGET", None)
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--runs", "60",
                        "--warmup", "15", "--json"], capture_output=True, text=True, timeout=120,
                       env=env, cwd=ROOT)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    r = json.loads(next(line[5:] for line in p.stdout.splitlines() if line.startswith("JSON ")))
    assert r["failures"] == [] and r["leaked_objects"] == 0, out
    # The budget really was tight: pages were evicted, weights streamed, and resident ones reused.
    t = r["totals"]
    assert t["evictions"] > 0 and t["offloaded"] > 0 and t["hits"] > 0, out
    assert t["hits"] + t["misses"] + t["offloaded"] == t["faults"], out
    assert r["budget"] < sum(r["models"].values()), out
    assert r["snapshots"] > 0 and r["snapshot_errors"] == 0, out
    assert r["rss_growth_mib"] < 4, out
    assert r["fds"][1] <= r["fds"][0], out


def test_soak_catches_an_unload_that_keeps_its_pages():
    """The checks bite: a 'forgetful' unload that drops the model but never closes its store
    leaves the VBAR reserved and its pages resident, and the soak says so."""
    import soak

    from vbar_loaders.vram import Pool
    from vbar_loaders.vram.host_backend import HostBackend

    def forgetful_unload(self):
        import weakref

        self.file.close()
        refs = [weakref.ref(self.file)]
        self.model = self.file = None
        return refs

    orig = soak.Live.unload
    soak.Live.unload = forgetful_unload
    pool = Pool(HostBackend(), budget=640 << 10)   # not the process-wide pool other tests use
    try:
        lines = []
        r = soak.soak(runs=4, warmup=0, hammer=False, pool=pool, out=lines.append)
    finally:
        soak.Live.unload = orig
        pool.close()
    text = "\n".join(r["failures"])
    assert "after unload reserved" in text and "VBARs open" in text, lines


def test_slope():
    import soak

    assert soak.slope_per_run([0, 2, 4, 6]) == 2
    assert abs(soak.slope_per_run([5, 5, 5])) < 1e-12
