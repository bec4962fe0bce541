"""Soak: load, run and unload three small models over and over under a tight VRAM budget.

    .venv/bin/python benchmarks/soak.py --runs 1000 [--budget 1536K] [--warmup 30] [--json]

Stands in for a server that runs for days: each run loads one of three models (weights read
zero-copy from real .safetensors files by SafetensorsFile, layers vbarized into a WeightStore on
the host backend), runs it twice, and unloads the model loaded by the run before, so two models
are live at any time; the budget is smaller than the largest model, so pages are evicted and
weights streamed all along. Another thread snapshots the allocator throughout, as the monitor
panel does.

Checked at every run, and counted as a failure otherwise:
* after an unload, the pool's reserved and resident bytes equal the other live models' own, the
  pool holds one VBAR per live model, and the freed range is gone from /proc/self/maps;
* the unloaded model, store and file are freed by reference counting (no cycle, no leak);
* per VBAR hits + misses + offloaded == faults, and the pool's resident bytes <= its budget;
* every output equals that model's first output bit for bit;
* no snapshot raises.
RSS is sampled after every unload; after the warm-up its least-squares slope and its growth over
the whole run must stay within --max-growth (a few MiB).
"""
import argparse
import array
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import weakref

import torch
from torch import nn


# --- the three models (real-looking key names; two dtypes; linear, conv, embedding, norms) ------
class Mlp(nn.Module):
    """A Flux-like stack: img_in, blocks of (norm, fc1, fc2), final_layer."""

    def __init__(self, width=128, depth=3):
        super().__init__()
        self.img_in = nn.Linear(32, width)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "norm": nn.LayerNorm(width), "fc1": nn.Linear(width, 2 * width),
            "fc2": nn.Linear(2 * width, width)}) for _ in range(depth))
        self.final_layer = nn.ModuleDict({"linear": nn.Linear(width, 16)})

    def forward(self, x):
        h = self.img_in(x)
        for b in self.blocks:
            h = h + b["fc2"](torch.nn.functional.gelu(b["fc1"](b["norm"](h))))
        return self.final_layer["linear"](h)

    @staticmethod
    def example():
        return torch.randn(4, 32, generator=torch.Generator().manual_seed(1))


class ConvNet(nn.Module):
    """A VAE-decoder-like conv stack with GroupNorm."""

    def __init__(self, ch=48):
        super().__init__()
        self.conv_in = nn.Conv2d(4, ch, 3, padding=1)
        self.mid = nn.ModuleDict({"norm1": nn.GroupNorm(8, ch),
                                  "conv1": nn.Conv2d(ch, ch, 3, padding=1),
                                  "conv2": nn.Conv2d(ch, ch, 3, padding=1)})
        self.up = nn.ConvTranspose2d(ch, ch, 2, stride=2)
        self.conv_out = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        h = h + self.mid["conv2"](torch.relu(self.mid["conv1"](self.mid["norm1"](h))))
        return self.conv_out(self.up(h))

    @staticmethod
    def example():
        return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))


class TextEncoder(nn.Module):
    """A CLIP-text-like encoder in bfloat16: token embedding, layers, final norm."""

    def __init__(self, vocab=1024, width=96, depth=2):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "ln": nn.LayerNorm(width), "mlp_fc1": nn.Linear(width, 4 * width),
            "mlp_fc2": nn.Linear(4 * width, width)}) for _ in range(depth))
        self.final_norm = nn.RMSNorm(width)

    def forward(self, ids):
        h = self.token_embedding(ids).float()
        for layer in self.layers:
            h = h + layer["mlp_fc2"](torch.nn.functional.gelu(layer["mlp_fc1"](layer["ln"](h))))
        return self.final_norm(h)

    @staticmethod
    def example():
        return torch.randint(0, 1024, (2, 7), generator=torch.Generator().manual_seed(3))


MODELS = {"flux_mlp": (Mlp, torch.float32), "vae_conv": (ConvNet, torch.float32),
          "clip_text": (TextEncoder, torch.bfloat16)}


def write_models(folder):
    """One .safetensors file per model, written by the safetensors package; returns paths."""
    from safetensors.torch import save_file

    paths = {}
    for i, (name, (cls, dtype)) in enumerate(MODELS.items()):
        torch.manual_seed(100 + i)
        sd = {k: v.to(dtype).contiguous() for k, v in cls().state_dict().items()}
        paths[name] = os.path.join(folder, f"{name}.safetensors")
        save_file(sd, paths[name])
    return paths


# --- one live model -------------------------------------------------------------------------
class Live:
    """A model loaded from its file into a WeightStore of ``pool``."""

    def __init__(self, name, path, pool, page_size):
        from vbar_loaders.loaders.files.safetensors_file import SafetensorsFile
        from vbar_loaders.loaders.runtime.vbar_modules import vbarize
        from vbar_loaders.loaders.runtime.weight_store import WeightStore

        cls, _ = MODELS[name]
        self.name = name
        self.file = SafetensorsFile(path)
        with torch.device("meta"):   # no throwaway init weights: the file's views are adopted
            self.model = cls()
        self.model.load_state_dict({k: self.file.get_tensor(k) for k in self.file.keys()},
                                   assign=True)
        self.store = WeightStore(name, pool, page_size=page_size,
                                 source_check=self.file.check_unchanged)
        vbarize(self.model, self.store)
        self.vbar = self.store.vbar
        self.range = (self.vbar.base, self.vbar.base + self.vbar.size)

    def run(self):
        self.vbar.prioritize()   # as ComfyUI's load_models_gpu does before sampling
        with torch.no_grad():
            return self.model(MODELS[self.name][0].example())

    def unload(self):
        """store.close() and drop every reference; returns weakrefs that must die with it."""
        self.store.close()
        self.file.close()
        refs = [weakref.ref(self.model), weakref.ref(self.store), weakref.ref(self.file)]
        self.model = self.store = self.file = self.vbar = None
        return refs


# --- checks -------------------------------------------------------------------------------------
def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds():
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def range_mapped(lo, hi):
    """Whether any mapping of this process overlaps [lo, hi) (Linux; False elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                a, b = (int(x, 16) for x in line.split(None, 1)[0].split("-"))
                if a < hi and lo < b:
                    return True
    except OSError:
        pass
    return False


def consistency_errors(stats):
    errs = []
    if stats["resident_bytes"] > stats["budget_bytes"]:
        errs.append(f"resident {stats['resident_bytes']} > budget {stats['budget_bytes']}")
    for v in stats["vbars"]:
        if v["hits"] + v["misses"] + v["offloaded"] != v["faults"]:
            errs.append(f"{v['name']}: hits {v['hits']} + misses {v['misses']} + offloaded "
                        f"{v['offloaded']} != faults {v['faults']}")
        if v["resident_bytes"] > v["reserved_bytes"]:
            errs.append(f"{v['name']}: resident > reserved")
    return errs


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


class Hammer(threading.Thread):
    """Snapshots the allocator in a loop, as the monitor's pusher thread and HTTP route do."""

    def __init__(self, pool):
        super().__init__(name="soak-snapshot", daemon=True)
        try:
            from vbar_loaders import routes

            self.snap, self.source = routes.snapshot, "routes.snapshot()"
        except Exception as e:  # noqa: BLE001 - routes.py is optional here
            self.snap, self.source = pool.stats, f"pool.stats() (routes: {type(e).__name__})"
        self.pool = pool
        self.stop = threading.Event()
        self.calls = 0
        self.errors = []

    def run(self):
        while not self.stop.is_set():
            try:
                s = self.snap()
                pools = s.get("pools", {"cpu": s}) if "pools" in s else {"cpu": s}
                for st in pools.values():
                    for e in consistency_errors(st):
                        self.errors.append(f"snapshot: {e}")
                self.calls += 1
            except Exception as e:  # noqa: BLE001 - every error is a finding
                self.errors.append(f"{type(e).__name__}: {e}")
            time.sleep(0.0005)


def slope_per_run(series):
    """Least-squares slope of ``series`` (bytes per run)."""
    n = len(series)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, statistics.fmean(series)
    num = sum((i - mx) * (y - my) for i, y in enumerate(series))
    return num / sum((i - mx) ** 2 for i in range(n))


# --- the soak ---------------------------------------------------------------------------------
def soak(runs=1000, budget=640 << 10, page_size=64 << 10, warmup=30, max_growth=4 << 20,
         forwards=2, hammer=True, pool=None, out=print):
    """Returns the figures as a dict (``failures``: every problem found). ``pool``: default the
    process-wide host pool (the one routes.snapshot() reports), its budget set to ``budget``."""
    from vbar_loaders.vram import get_pool

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    folder = tempfile.mkdtemp(prefix="vbar-soak-")
    paths = write_models(folder)
    pool = pool or get_pool("cpu", budget=budget)
    budget = pool.budget()
    names = list(MODELS)
    first, live, failures = {}, [], []
    # Preallocated raw arrays: the series themselves must not add Python objects as they grow.
    rss, blocks, fds = (array.array("q", bytes(8 * runs)) for _ in range(3))
    samples = 0
    totals = {k: 0 for k in ("faults", "hits", "misses", "offloaded", "evictions")}
    leaked = needed_gc = 0
    sizes = {}
    ham = Hammer(pool)
    if hammer:
        ham.start()

    def fail(run, msg):
        if len(failures) < 50:
            failures.append(f"run {run}: {msg}")

    try:
        for run in range(runs):
            name = names[run % len(names)]
            m = Live(name, paths[name], pool, page_size)
            sizes[name] = sum(h.nbytes for h in m.store.handles)
            live.append(m)
            if len(pool.vbars) != len(live):
                fail(run, f"{len(pool.vbars)} VBARs open with {len(live)} models live")
            for _ in range(forwards):   # the second forward finds resident pages: hits
                y = m.run()
                if name not in first:
                    first[name] = y.clone()
                elif not same_bits(y, first[name]):
                    fail(run, f"{name}: output differs from its first run")
            for e in consistency_errors(pool.stats()):
                fail(run, e)
            if len(live) < 2:
                continue
            # Unload the model of the previous run: only the others' bytes may remain.
            gone = live.pop(0)
            vstats = {v["name"]: v for v in pool.stats()["vbars"]}
            before_other = [vstats[o.name] for o in live]
            for v in pool.stats()["vbars"]:
                if v["name"] == gone.name:
                    for k in totals:
                        totals[k] += v[k]
            lo, hi = gone.range
            refs = gone.unload()
            del gone
            if any(r() is not None for r in refs):
                needed_gc += 1
                gc.collect()
                leaked += sum(r() is not None for r in refs)
            st = pool.stats()
            want_reserved = sum(v["reserved_bytes"] for v in before_other)
            want_resident = sum(v["resident_bytes"] for v in before_other)
            if st["reserved_bytes"] != want_reserved or st["resident_bytes"] != want_resident:
                fail(run, f"after unload reserved {st['reserved_bytes']} (want {want_reserved}), "
                          f"resident {st['resident_bytes']} (want {want_resident})")
            if len(st["vbars"]) != len(live):
                fail(run, f"{len(st['vbars'])} VBARs open after unload, {len(live)} models live")
            if range_mapped(lo, hi):
                fail(run, f"the unloaded VBAR's range {lo:#x}-{hi:#x} is still mapped")
            rss[samples], blocks[samples], fds[samples] = (rss_bytes(), sys.getallocatedblocks(),
                                                           open_fds())
            samples += 1
        for m in live:
            for v in pool.stats()["vbars"]:
                if v["name"] == m.name:
                    for k in totals:
                        totals[k] += v[k]
            m.unload()
        live.clear()
        end = pool.stats()
        if end["reserved_bytes"] or end["resident_bytes"] or end["vbars"]:
            fail(runs, f"after the last unload: {end['reserved_bytes']} reserved, "
                       f"{end['resident_bytes']} resident, {len(end['vbars'])} VBARs")
    finally:
        ham.stop.set()
        if hammer:
            ham.join()
        for f in os.listdir(folder):
            os.unlink(os.path.join(folder, f))
        os.rmdir(folder)

    rss, blocks, fds = rss[:samples], blocks[:samples], fds[:samples]
    w = warmup if len(rss) > warmup + 1 else 0
    series = rss[w:]
    slope = slope_per_run(series)
    if fds and fds[-1] > fds[w]:
        fail(runs, f"open file descriptors grew from {fds[w]} to {fds[-1]}")
    growth = max(0.0, slope * (len(series) - 1))
    if growth > max_growth:
        fail(runs, f"RSS grows {growth / 2**20:.2f} MiB over {len(series)} runs after warm-up "
                   f"(limit {max_growth / 2**20:.1f} MiB)")
    failures += [f"snapshot thread: {e}" for e in ham.errors[:20]]
    res = {
        "runs": runs, "models": {n: sizes.get(n, 0) for n in names}, "budget": budget,
        "failures": failures, "leaked_objects": leaked, "needed_gc": needed_gc,
        "rss_start_mib": series[0] / 2**20 if series else 0,
        "rss_end_mib": series[-1] / 2**20 if series else 0,
        "rss_slope_kib_per_run": slope / 1024, "rss_growth_mib": growth / 2**20,
        "rss_range_mib": (max(series) - min(series)) / 2**20 if series else 0,
        "py_blocks_slope_per_run": slope_per_run(blocks[w:]),
        "fds": [fds[w], fds[-1]] if fds else [0, 0],
        "snapshots": ham.calls, "snapshot_source": ham.source, "snapshot_errors": len(ham.errors),
        "totals": totals, "wall_s": time.perf_counter() - t0,
    }
    report(res, out)
    return res


def report(r, out=print):
    sizes = ", ".join(f"{n} {b / 2**20:.2f} MiB" for n, b in r["models"].items())
    out(f"soak: {r['runs']} runs, models {sizes}, budget {r['budget'] / 2**20:.2f} MiB, "
        f"{r['wall_s']:.1f} s")
    t = r["totals"]
    out(f"faults {t['faults']}, hits {t['hits']}, misses {t['misses']}, offloaded "
        f"{t['offloaded']}, evictions {t['evictions']}")
    out(f"RSS after warm-up: {r['rss_start_mib']:.1f} -> {r['rss_end_mib']:.1f} MiB, slope "
        f"{r['rss_slope_kib_per_run']:+.3f} KiB/run, fitted growth {r['rss_growth_mib']:.2f} MiB, "
        f"range {r['rss_range_mib']:.2f} MiB")
    out(f"Python heap blocks: slope {r['py_blocks_slope_per_run']:+.2f}/run; open fds "
        f"{r['fds'][0]} -> {r['fds'][1]}")
    out(f"snapshots: {r['snapshots']} via {r['snapshot_source']}, {r['snapshot_errors']} errors")
    out(f"unloads needing gc: {r['needed_gc']}, objects leaked: {r['leaked_objects']}")
    for f in r["failures"]:
        out("FAIL " + f)
    out("OK" if not r["failures"] else f"FAILED: {len(r['failures'])} problems")


def main(argv=None):
    from vbar_loaders.vram import parse_bytes

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--budget", default="640K",
                    help="pool budget (default: less than the largest model, far less than all)")
    ap.add_argument("--forwards", type=int, default=2, help="forward passes per load")
    ap.add_argument("--page-size", default="64K")
    ap.add_argument("--warmup", type=int, default=30, help="runs left out of the RSS trend")
    ap.add_argument("--max-growth", default="4M", help="allowed RSS growth after warm-up")
    ap.add_argument("--no-hammer", action="store_true", help="no snapshot thread")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    a = ap.parse_args(argv)
    r = soak(a.runs, parse_bytes(a.budget), parse_bytes(a.page_size), a.warmup,
             parse_bytes(a.max_growth), a.forwards, hammer=not a.no_hammer)
    if a.json:
        print("JSON " + json.dumps(r))
    return 1 if r["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
