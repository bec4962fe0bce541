"""NF4 dequant throughput on CPU: ours vs bitsandbytes' native kernel vs a plain bf16 copy.

    .venv/bin/python benchmarks/bench_nf4.py [--quick] [--rounds N]

GB/s counts the bf16 output bytes. All methods run round-robin in one process, so load
from other processes hits them alike; each figure is the median over rounds.
"""
import argparse
import statistics
import time

import torch

from vbar_loaders.loaders.nf4.codec import dequantize_nf4, parse_quant_state


def bnb_case(x, nested):
    import bitsandbytes.functional as F
    q, st = F.quantize_4bit(x, blocksize=64, compress_statistics=nested, quant_type="nf4")
    entries = {"l.weight": q, **{"l.weight." + k: v for k, v in st.as_dict(packed=True).items()}}
    return (lambda: F.dequantize_4bit(q, st)), entries


def have_bitsandbytes():
    try:
        import bitsandbytes  # noqa: F401
        return True
    except ImportError:
        return False


def measure(shape, nested, rounds, have_bnb, device="cpu", sync=None):
    """GB/s (bf16 output bytes, median over ``rounds``) of each method for one case on
    ``device``: ours, pack, copy, and bnb when installed; ours must be bit-exact with bnb.
    ``sync``: called before each clock read (torch.cuda.synchronize on a GPU)."""
    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=torch.bfloat16) * 0.02).to(device)
    nbytes = x.numel() * 2
    if have_bnb:
        bnb_fn, entries = bnb_case(x, nested)
    else:
        from vbar_loaders.loaders.nf4.codec import nf4_state_dict_entries
        bnb_fn, entries = None, nf4_state_dict_entries("l", x, compress_statistics=nested)
    w = parse_quant_state(entries, "l", "bench")
    # "ours" is the portable torch path; "pack" is what a layer runs: bitsandbytes'
    # kernel when it is installed, behind the pack's parsing and shape handling.
    fns = {"ours": lambda: dequantize_nf4(w, torch.bfloat16, use_bnb=False),
           "pack": lambda: dequantize_nf4(w, torch.bfloat16), "copy": x.clone}
    if bnb_fn:
        fns["bnb"] = bnb_fn
        assert torch.equal(fns["ours"](), bnb_fn()), "not bit-exact: fix before timing"
    sync = sync or (lambda: None)
    times = {k: [] for k in fns}
    for _ in range(3):  # warm caches, allocator and thread pool
        for f in fns.values():
            f()
    for _ in range(rounds):
        for k, f in fns.items():
            sync()
            t = time.perf_counter()
            f()
            sync()
            times[k].append(time.perf_counter() - t)
    return {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()}


def run(shapes, rounds):
    have_bnb = have_bitsandbytes()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"bitsandbytes {'yes' if have_bnb else 'not installed'}, {rounds} rounds, medians\n")
    head = (f"{'shape':>12} {'layout':>6} | {'torch GB/s':>10} {'pack GB/s':>9} {'bnb GB/s':>9} "
            f"{'copy GB/s':>9} | {'torch/bnb':>9} {'pack/bnb':>8} {'torch/copy':>10}")
    print(head)
    print("-" * len(head))
    for shape in shapes:
        for nested in (False, True):
            gbs = measure(shape, nested, rounds, have_bnb)
            b = gbs.get("bnb")
            nan = float("nan")
            print(f"{'x'.join(map(str, shape)):>12} {'v1' if nested else 'v2':>6} | {gbs['ours']:10.2f} "
                  f"{gbs['pack']:9.2f} {b if b else nan:9.2f} {gbs['copy']:9.2f} | "
                  f"{gbs['ours'] / b if b else nan:9.2f} {gbs['pack'] / b if b else nan:8.2f} "
                  f"{gbs['ours'] / gbs['copy']:10.2f}")
    print("\nv1 = nested (8-bit) absmax, decoded each call; v2 = fp32 absmax. copy = x.clone().\n"
          "torch = the portable kernel; pack = dequantize_nf4 as layers call it (bitsandbytes' "
          "kernel when installed).")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few rounds (smoke test)")
    ap.add_argument("--rounds", type=int, default=None)
    a = ap.parse_args()
    shapes = [(256, 256), (256, 1024)] if a.quick else [(3072, 3072), (3072, 12288)]
    run(shapes, a.rounds or (5 if a.quick else 21))


if __name__ == "__main__":
    main()
