"""What a CPU dequantization of one large GGUF weight costs when its output is freshly
allocated, as both GGUF loaders do at every use, against decoding into memory that is reused.

On CUDA, torch's caching allocator hands a freed block back to the next allocation of its size.
On a CPU there is no such cache: a weight-sized float32 output (150 MB for 3072x12288) comes from
a fresh mmap, and the first write to every 4 KiB page of it faults. This prints the pack's
decode into a fresh tensor (``dequantize``) and into a reused one (``dequantize_into``), and
the two floors: filling a fresh tensor and filling a reused one (no decoding at all). Ratios
are against the fresh decode, all measured in this run (best of ``--runs``).

    python benchmarks/bench_gguf_alloc.py [--qtype Q8_0] [--shape 3072,12288] [--threads 2]
"""
import argparse
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType, quantize

from vbar_loaders.loaders.gguf.dequant import dequantize, dequantize_into


def best(f, runs):
    f()                                  # warm-up: first touches, lazy tables
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qtype", default="Q8_0", help="a type gguf-py can quantize")
    ap.add_argument("--shape", default="3072,12288", help="rows,cols of the weight")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    qt = GGMLQuantizationType[args.qtype]
    shape = tuple(int(s) for s in args.shape.split(","))
    w = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    try:
        raw = torch.from_numpy(quantize(w, qt).reshape(-1).view(np.uint8).copy())
    except NotImplementedError:
        raise SystemExit(f"gguf-py cannot quantize {args.qtype}; pick one it can (Q8_0, Q4_0, Q5_0, ...)")
    reused = torch.empty(shape, dtype=torch.float32)
    rows = {
        "decode, fresh output (what loaders do on CPU)": lambda: dequantize(raw, qt, shape, torch.float32),
        "decode, reused output": lambda: dequantize_into(reused, raw, qt),
        "no decode: fill a fresh tensor": lambda: torch.empty(shape).fill_(1.0),
        "no decode: fill a reused tensor": lambda: reused.fill_(1.0),
    }
    assert torch.equal(dequantize(raw, qt, shape, torch.float32), dequantize_into(reused, raw, qt))
    times = {name: best(f, args.runs) for name, f in rows.items()}
    ref = times["decode, fresh output (what loaders do on CPU)"]
    n = w.size
    print(f"{args.qtype} {shape[0]}x{shape[1]} ({n / 1e6:.1f} M values) -> float32, "
          f"{args.threads} threads, best of {args.runs}")
    for name, t in times.items():
        print(f"  {name:48s} {t * 1e3:8.1f} ms  {t * 1e9 / n:5.2f} ns/value  {t / ref:5.2f} of fresh decode")


if __name__ == "__main__":
    main()
