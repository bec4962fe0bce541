"""What single eager-torch ops cost on this CPU: the floor under the P5/P6 dequant goals.

A dequantizer written in eager torch is a sequence of whole-tensor ops, each one pass over
memory. This times the passes the fastest sequences are made of, on one cache-sized chunk
of 2^19 values (as the pack's CPU kernels work), and sets them against the reference each
goal names, measured in the same run:

  Q8_0 (P5 goal: >= 2x ComfyUI-GGUF): any method reads int8 quants, scales them per block
       and writes bf16. ComfyUI-GGUF already does it in the two cheapest ops (int8 -> bf16,
       then a bf16 multiply). CPU kernels fuse nothing, and an op whose operands differ in
       dtype first copies them to a common dtype, so no single op does both.
  NF4  (P6 goal: pure torch >= 0.5x bitsandbytes' CPU kernel): any method maps 4-bit codes
       through the 16-value codebook (a gather) and writes bf16. Timed here for a whole
       3072x3072 weight against bitsandbytes on the same tensor.

Inputs never change between reps (every op writes elsewhere): repeating an in-place multiply
drives values into denormals, which are 10x slower on x86 and would skew the table.

    python benchmarks/bench_eager_floor.py [--reps N] [--quick]
"""
import argparse
import statistics
import time

import torch

from vbar_loaders.loaders.nf4 import kernels as K

CHUNK = 1 << 19


def timed(fn, reps):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def q8_0_ops(reps):
    n = CHUNK // 32
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (n, 34), dtype=torch.uint8, generator=g)
    blocks[:, :2] = (torch.randn(n, 1, generator=g) * 0.02).half().view(torch.uint8)
    q = blocks[:, 2:].view(torch.int8)          # strided, as the blocks lie in the file
    d = blocks[:, :2].view(torch.float16).float()
    f, f_out = torch.empty(n, 32).copy_(q), torch.empty(n, 32)
    b, b_out = torch.empty(n, 32, dtype=torch.bfloat16).copy_(q), torch.empty(n, 32, dtype=torch.bfloat16)
    db = d.bfloat16()
    rows = {
        "int8 -> bf16 copy": lambda: b_out.copy_(q),
        "int8 -> f32 copy": lambda: f_out.copy_(q),
        "f32 * scale -> f32": lambda: torch.mul(f, d, out=f_out),
        "f32 -> bf16 copy": lambda: b_out.copy_(f),
        "bf16 * scale -> bf16": lambda: torch.mul(b, db, out=b_out),
        "f32 * scale -> bf16 (mixed, one call)": lambda: torch.mul(f, d, out=b_out),
        "int8 * scale -> bf16 (mixed, one call)": lambda: torch.mul(q, d, out=b_out),
    }
    return {k: timed(fn, reps) for k, fn in rows.items()}


def nf4_ops(reps):
    import bitsandbytes.functional as F
    x = torch.randn(3072, 3072, generator=torch.Generator().manual_seed(0)).bfloat16()
    packed, state = F.quantize_4bit(x, blocksize=64, compress_statistics=False, quant_type="nf4")
    flat = packed.view(-1)
    table = K._pair_table("nf4", "cpu")
    idx = torch.empty(CHUNK // 2, dtype=torch.int32)
    pairs = torch.empty(CHUNK // 2, dtype=torch.int64)
    vals = pairs.view(torch.float32).view(-1, 64)
    scaled = torch.empty(CHUNK).view(-1, 64)
    out = torch.empty(CHUNK, dtype=torch.bfloat16).view(-1, 64)
    absmax = state.absmax[: CHUNK // 64, None].float()
    chunks = x.numel() // CHUNK

    def gather_all():   # every byte of the weight through the table, nothing else
        for s in range(0, flat.numel(), CHUNK // 2):
            torch.index_select(table, 0, idx.copy_(flat[s: s + CHUNK // 2]), out=pairs)

    def gather_one_thread():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            gather_all()
        finally:
            torch.set_num_threads(threads)

    return {
        "bitsandbytes dequantize_4bit": timed(lambda: F.dequantize_4bit(packed, state), reps),
        "index copy + pair gather, all threads": timed(gather_all, reps),
        "index copy + pair gather, 1 thread": timed(gather_one_thread, reps),
        # as the kernel scales on CPU: in fp32, then one cast (out of place here: see the top)
        "f32 * absmax, -> bf16 (the last passes)": chunks * timed(
            lambda: out.copy_(torch.mul(vals, absmax, out=scaled)), reps),
        "pack's portable kernel": timed(lambda: K.dequantize_4bit(
            flat, state.absmax.float(), "nf4", x.numel(), 64, torch.bfloat16), reps),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=101)
    ap.add_argument("--quick", action="store_true", help="3 reps (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps = 3
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.reps}\n")

    t = q8_0_ops(args.reps)
    print(f"Q8_0, one chunk of {CHUNK} values (us):")
    for k, v in t.items():
        print(f"  {k:42} {v:8.1f}")
    city = t["int8 -> bf16 copy"] + t["bf16 * scale -> bf16"]
    exact = min(t["int8 -> f32 copy"] + t["f32 * scale -> f32"] + t["f32 -> bf16 copy"],
                t["int8 -> f32 copy"] + t["f32 * scale -> bf16 (mixed, one call)"],
                t["int8 * scale -> bf16 (mixed, one call)"])
    print(f"  ComfyUI-GGUF's two ops {city:.1f}; fastest exact sequence {exact:.1f}; "
          f"its speed-up {city / exact:.2f}x (goal 2x)")
    print(f"  ceiling if one op converted and scaled as fast as the bare int8 -> bf16 copy "
          f"(CPU torch has none): {city / t['int8 -> bf16 copy']:.2f}x\n")

    try:
        t = nf4_ops(max(5, args.reps // 10))
    except ImportError:
        print("NF4: bitsandbytes not installed, skipped")
        return
    bnb = t["bitsandbytes dequantize_4bit"]
    print("NF4, a 3072x3072 weight (us), and bitsandbytes / it:")
    for k, v in t.items():
        print(f"  {k:42} {v:8.1f}   {bnb / v:5.2f}x")
    floor = t["index copy + pair gather, all threads"] + t["f32 * absmax, -> bf16 (the last passes)"]
    print(f"  gather + last passes alone: {bnb / floor:.2f}x of bitsandbytes (goal 0.5x)")


if __name__ == "__main__":
    main()
