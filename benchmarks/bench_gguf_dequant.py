"""Throughput of GGUF dequantization to bfloat16, per quant type.

Columns, all in GB/s of bf16 output and all measured in the same run:
  ours     loaders/gguf/dequant.dequantize
  ref      gguf-py's numpy reference (then converted to a bf16 torch tensor)
  city96   ComfyUI-GGUF's dequant.py, best of its two dequant_dtype modes (bf16 math, or
           fp16 math then a cast); only if CITY96_GGUF_PATH names its checkout or the file.
           It has no kernel for F32/F16 (it just casts, as we do): shown as "-".
  memcpy   clone() of a bf16 tensor of the output's size (allocation included, as in ours)
Each method runs in a process of its own, and each rep times every method once, in turn:
load from other processes hits all columns alike, while one method's allocations and thread
pools cannot speed up or slow down another's (measured: sharing a process moved city96's
numbers by up to 3x, depending on what ran before it). The table shows medians.

By default the worker processes run with glibc's malloc keeping freed memory (no mmap per
large tensor), as CUDA's caching allocator does on a GPU: otherwise every column pays page
faults for each fresh temporary, and the method with the most temporaries (city96) is slowed
most by a cost that a GPU does not have. --page-faults measures with the default malloc.

    python benchmarks/bench_gguf_dequant.py [--quick] [--reps N] [--types Q8_0,Q4_K]
                                            [--threads N] [--clock wall|cpu] [--page-faults]
"""
import argparse
import hashlib
import importlib.util
import multiprocessing as mp
import os
import pathlib
import resource
import statistics
import sys
import time
import types
import zlib

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from vbar_loaders.loaders.gguf.dequant import QTYPE_BLOCK, dequantize

FLOATS = (QT.F32, QT.F16, QT.BF16)
F16_FIELDS = {
    QT.Q8_0: (0,), QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q5_0: (0,), QT.Q5_1: (0, 2),
    QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,),
    QT.IQ4_NL: (0,), QT.IQ4_XS: (0,),
}


def load_city96(path=None):
    """ComfyUI-GGUF's dequant module from ``path`` (its checkout or the file; default
    CITY96_GGUF_PATH), or None when neither is given."""
    path = path or os.environ.get("CITY96_GGUF_PATH")
    if not path:
        return None
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / "dequant.py"
    if not path.is_file():
        raise FileNotFoundError(f"ComfyUI-GGUF's dequant.py not found at {path}: give its checkout")
    if "tqdm" not in sys.modules:  # it only uses tqdm.write for a log line
        try:
            import tqdm  # noqa: F401
        except ImportError:
            sys.modules["tqdm"] = types.SimpleNamespace(tqdm=types.SimpleNamespace(write=print))
    spec = importlib.util.spec_from_file_location("city96_dequant", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_raw(qt, rows, cols, rng):
    if qt in FLOATS:
        x = rng.standard_normal((rows, cols), dtype=np.float32)
        return gguf.quants.quantize(x, qt).view(np.uint8).reshape(rows, -1)
    bs, ts = GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, size=(rows * cols // bs, ts), dtype=np.uint8)
    for off in F16_FIELDS[qt]:
        raw[:, off:off + 2] = rng.normal(0, 0.5, (raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def methods(qt, raw_np, shape, city, device="cpu"):
    """The timed callables for one case, on ``device`` (the gguf-py reference always runs on
    the host: it is numpy)."""
    raw = torch.from_numpy(raw_np).to(device)
    out = {
        "ours": lambda: dequantize(raw, qt, shape, torch.bfloat16),
        "ref": lambda: torch.from_numpy(gguf.quants.dequantize(raw_np, qt)).to(torch.bfloat16),
    }
    if city is not None and qt in city.dequantize_functions:
        def c96(dt):
            return lambda: city.dequantize(raw, qt, shape, dtype=dt).to(torch.bfloat16)
        out["city96"] = c96(torch.bfloat16)
        out["city96/fp16"] = c96(None)
    src = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_()
    out["memcpy"] = src.clone
    return out


def _warm(fn, keep_freed):
    """First call, and with freed memory kept, more until one call page-faults no more:
    glibc grows its heap over the first few calls of a new size (measured: three 72 MB
    clones faulting all their pages, then none), which would skew a median of few reps."""
    res = fn()
    for _ in range(10 if keep_freed else 0):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        if resource.getrusage(resource.RUSAGE_SELF).ru_minflt == before:
            break
    return res


def _worker(conn, threads, clock_name, keep_freed):
    """One method's process: set up a case on request, then time single calls of it."""
    torch.set_num_threads(threads)
    clock = time.perf_counter if clock_name == "wall" else time.process_time
    city = load_city96()
    fn = None
    while True:
        msg = conn.recv()
        if msg is None:
            return
        if msg[0] == "case":
            _, method, name, rows, cols = msg
            rng = np.random.default_rng(zlib.crc32(f"{name} {rows}x{cols}".encode()))
            raw = make_raw(QT[name], rows, cols, rng)
            fn = methods(QT[name], raw, (rows, cols), city).get(method)
            # warm-up, and a digest of the result for the cross-check
            conn.send(None if fn is None else
                      hashlib.sha1(_warm(fn, keep_freed).contiguous().view(torch.uint8).numpy()).hexdigest())
        else:
            t = clock()
            fn()
            conn.send(clock() - t)


# After a parallel region, OpenMP's threads spin-wait for more work (libgomp: up to tens of ms);
# the previous method's spinning threads would otherwise share the cores with the next one.
SETTLE_S = 0.05


class Workers:
    """One process per method, timed in turn."""

    def __init__(self, names, threads, clock, keep_freed=True):
        ctx = mp.get_context("spawn")
        saved = dict(os.environ)
        if keep_freed:   # read by glibc when each worker starts
            os.environ.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(1 << 40))
        self.conns, self.procs = {}, []
        for name in names:
            a, b = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(b, threads, clock, keep_freed), daemon=True)
            p.start()
            self.conns[name], self.procs = a, self.procs + [p]
        os.environ.clear()
        os.environ.update(saved)

    def measure(self, qt_name, rows, cols, reps):
        for c_name, c in self.conns.items():
            c.send(("case", c_name, qt_name, rows, cols))
        digests = {k: c.recv() for k, c in self.conns.items()}
        live = {k: c for k, c in self.conns.items() if digests[k] is not None}
        times = {k: [] for k in live}
        for _ in range(reps):
            for k, c in live.items():
                time.sleep(SETTLE_S)
                c.send("go")
                times[k].append(c.recv())
        return {k: statistics.median(v) for k, v in times.items()}, digests

    def close(self):
        for c in self.conns.values():
            c.send(None)
        for p in self.procs:
            p.join(10)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one rep (smoke test)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--types", default=",".join(q.name for q in QTYPE_BLOCK))
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time instead of wall time; with --threads 1 it "
                         "shrugs off other processes competing for the cores")
    ap.add_argument("--page-faults", action="store_true",
                    help="default malloc: large temporaries are fresh mmaps, page-faulted per call")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [(64, 512), (64, 1024)] if args.quick else [(3072, 3072), (3072, 12288)]
    reps = 1 if args.quick else args.reps
    city = load_city96()
    names = ["ours", "ref"] + (["city96", "city96/fp16"] if city else []) + ["memcpy"]
    workers = Workers(names, args.threads, args.clock, keep_freed=not args.page_faults)
    malloc = "default malloc" if args.page_faults else "freed memory kept"
    print(f"torch {torch.__version__}, {args.threads} threads, {args.clock} clock, median of {reps} "
          f"reps, one process per method, {malloc}; "
          f"city96: {'yes' if city else 'no (set CITY96_GGUF_PATH)'}")
    hdr = (f"{'type':7} {'shape':>11} {'ours':>7} {'ref':>7} {'city96':>7} {'memcpy':>7} "
           f"{'ours/ref':>9} {'ours/c96':>9} {'ours/memcpy':>12}")
    print(hdr)
    print("-" * len(hdr))
    try:
        for name in args.types.split(","):
            for rows, cols in shapes:
                t, digests = workers.measure(name, rows, cols, reps)
                if digests["ours"] != digests["ref"]:
                    raise SystemExit(f"{name}: result differs from the gguf reference")
                gbs = {k: rows * cols * 2 / v / 1e9 for k, v in t.items()}
                c96 = max(gbs.get("city96", 0), gbs.get("city96/fp16", 0))
                c96_cols = ((f"{c96:7.2f}", f"{gbs['ours'] / c96:8.2f}x") if c96
                            else (f"{'-':>7}", f"{'-':>9}"))
                print(f"{name:7} {rows:>5}x{cols:<5} {gbs['ours']:7.2f} {gbs['ref']:7.2f} {c96_cols[0]} "
                      f"{gbs['memcpy']:7.2f} {gbs['ours'] / gbs['ref']:8.1f}x {c96_cols[1]} "
                      f"{gbs['ours'] / gbs['memcpy']:11.2f}x", flush=True)
    finally:
        workers.close()


if __name__ == "__main__":
    main()
