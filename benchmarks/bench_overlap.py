"""P4: step time with part of the model streaming, against the overlap bound.

The bound is max(compute, bytes streamed per step / copy bandwidth), both measured in this run:
compute is the all-resident step time; bandwidth is a plain tensor copy of the same size.
Compute runs on one thread so the prefetch worker has a core of its own for the copies, as a
GPU has copy engines beside its SMs. Streams pay for a real copy (``copy_streams``), as a
transfer to a device would.

    python benchmarks/bench_overlap.py [--quick]
"""
import argparse
import copy
import statistics
import time

import _pack  # noqa: F401
import torch

from vbar_loaders.loaders.vbar_modules import vbarize
from vbar_loaders.loaders.weight_store import WeightStore
from vbar_loaders.vram import Pool
from vbar_loaders.vram.host_backend import HostBackend

PAGE = 2 << 20
DEPTH = int(__import__("os").environ.get("VBAR_PREFETCH", "1"))


def median_time(fn, reps):
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def run(width, layers, tokens, reps):
    torch.manual_seed(0)
    plain = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).eval()
    x = torch.randn(tokens, width)
    total = sum(p.numel() * 4 for p in plain.parameters())
    with torch.no_grad():
        ref = plain(x)

        def step_time(fraction, prefetch):
            model = copy.deepcopy(plain)
            pool = Pool(HostBackend(), budget=max(PAGE, int(total * fraction) // PAGE * PAGE))
            store = WeightStore("p4", pool, page_size=PAGE, copy_streams=True)
            vbarize(model, store)
            if prefetch:
                store.enable_prefetch(DEPTH)
            assert torch.equal(model(x), ref)
            model(x)
            before = sum(h.streams for h in store.handles)
            t = median_time(lambda: model(x), reps)
            streamed = sum(h.nbytes for h in store.handles if h.slot is not None
                           and h.slot.offloads > 0)
            per_step = (sum(h.streams for h in store.handles) - before) / reps
            hits = store.prefetch_stats()["prefetch_hits"]
            store.close()
            pool.close()
            return t, streamed, per_step, hits

        compute, _, _, _ = step_time(4.0, False)
        src = torch.empty(total // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)
        bw = total / median_time(lambda: dst.copy_(src), reps)
        rows = []
        for fraction in (0.75, 0.5, 0.25):
            t_off, streamed, _, _ = step_time(fraction, False)
            t_on, streamed, per_step, hits = step_time(fraction, True)
            bound = max(compute, streamed / bw)
            rows.append((fraction, streamed, t_off, t_on, bound, hits))
    return compute, bw, total, rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    width, layers, tokens, reps = (512, 6, 8, 3) if args.quick else (2048, 12, 12, 9)
    compute, bw, total, rows = run(width, layers, tokens, reps)
    print(f"P4 overlap: {layers} x Linear({width}, {width}) fp32 = {total / 2**20:.0f} MiB, "
          f"{tokens} tokens, compute 1 thread; all-resident step {compute * 1e3:.1f} ms, "
          f"copy {bw / 1e9:.2f} GB/s")
    print(f"{'resident':>8s} {'streamed MiB':>12s} {'no prefetch ms':>14s} {'prefetch ms':>11s} "
          f"{'bound ms':>9s} {'prefetch/bound':>14s} {'goal':>6s}")
    for fraction, streamed, t_off, t_on, bound, hits in rows:
        goal = "<=1.15" if fraction == 0.5 else ""
        print(f"{fraction * 100:7.0f}% {streamed / 2**20:12.1f} {t_off * 1e3:14.1f} {t_on * 1e3:11.1f} "
              f"{bound * 1e3:9.1f} {t_on / bound:14.2f} {goal:>6s}")


if __name__ == "__main__":
    main()
