"""P4: step time with part of the model streaming, against the overlap bound.

The bound is max(compute, bytes streamed per step / copy bandwidth), both measured in this run:
compute is the all-resident step time; bandwidth is a plain tensor copy of the same size.
Compute runs on one thread so the prefetch worker has a core of its own for the copies, as a
GPU has copy engines beside its SMs. Streams pay for a real copy (``copy_streams``), as a
transfer to a device would, into memory that malloc keeps (``keep_freed_memory``), as a
device's caching allocator would: a fresh 16 MiB host buffer per stream would add page faults
that a GPU does not have. Every configuration is timed one step at a time in rotation.

    python benchmarks/bench_overlap.py [--quick]
"""
import argparse
import copy
import statistics
import time

import torch

from vbar_loaders.loaders.runtime.vbar_modules import vbarize
from vbar_loaders.loaders.runtime.weight_store import WeightStore
from vbar_loaders.vram import Pool
from vbar_loaders.vram.host_backend import HostBackend

PAGE = 2 << 20
DEPTH = int(__import__("os").environ.get("VBAR_PREFETCH", "1"))


def keep_freed_memory():
    """Make glibc's malloc keep freed memory in the process (no mmap per large block, no trim),
    as CUDA's caching allocator does on a GPU. Otherwise every fresh large temporary on the host
    is page-faulted in, a cost the device being simulated does not have. Returns whether it
    took effect (glibc only)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))


def _synced(device):
    """A clock read that first waits for the device's queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        def now():
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return now
    return time.perf_counter


def run(width, layers, tokens, reps, new_backend=HostBackend):
    """Every configuration is built first, then timed one step at a time in rotation (a copy of
    the streamed bytes included), so a noisy stretch on a shared machine hits all alike.

    ``new_backend``: a callable returning the VBAR backend (gpu_check passes CUDA's). The model
    computes on that backend's device; the weights' sources stay on the host, as a loader leaves
    them, and the copy bandwidth is a plain host-to-device ``copy_`` of the same bytes."""
    torch.manual_seed(0)
    plain = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).eval()
    total = sum(p.numel() * 4 for p in plain.parameters())
    configs = [(4.0, False)] + [(f, pf) for f in (0.75, 0.5, 0.25) for pf in (False, True)]
    backend = new_backend()
    device = backend.device()
    page = max(PAGE, backend.granularity)
    now = _synced(device)
    x = torch.randn(tokens, width).to(device)
    with torch.no_grad():
        ref = copy.deepcopy(plain).to(device)(x)
        built = {}
        for fraction, prefetch in configs:
            model = copy.deepcopy(plain)
            pool = Pool(backend if not built else new_backend(),
                        budget=max(page, int(total * fraction) // page * page))
            store = WeightStore("p4", pool, page_size=page, copy_streams=True)
            vbarize(model, store)
            if prefetch:
                store.enable_prefetch(DEPTH)
            assert torch.equal(model(x), ref), f"{fraction:.0%} resident: output differs from the plain model"
            model(x)
            built[fraction, prefetch] = (model, store, pool)
        src = torch.empty(total // 4)
        dst = torch.empty_like(src, device=device)
        dst.copy_(src)
        times = {k: [] for k in built}
        copies = []
        before = {k: sum(h.streams for h in v[1].handles) for k, v in built.items()}
        for _ in range(reps):
            for k, (model, _, _) in built.items():
                t = now()
                model(x)
                times[k].append(now() - t)
            t = now()
            dst.copy_(src)
            copies.append(now() - t)
        compute = statistics.median(times[4.0, False])
        bw = total / statistics.median(copies)
        rows = []
        for fraction in (0.75, 0.5, 0.25):
            store = built[fraction, True][1]
            streamed = sum(h.nbytes for h in store.handles if h.slot is not None and h.slot.offloads > 0)
            per_step = (sum(h.streams for h in store.handles) - before[fraction, True]) / reps
            bound = max(compute, streamed / bw)
            rows.append((fraction, streamed, statistics.median(times[fraction, False]),
                         statistics.median(times[fraction, True]), bound,
                         store.prefetch_stats()["prefetch_hits"], per_step))
        for _, store, pool in built.values():
            store.close()
            pool.close()
    return compute, bw, total, rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    kept = keep_freed_memory()
    width, layers, tokens, reps = (512, 6, 8, 3) if args.quick else (2048, 12, 12, 21)
    compute, bw, total, rows = run(width, layers, tokens, reps)
    print(f"P4 overlap: {layers} x Linear({width}, {width}) fp32 = {total / 2**20:.0f} MiB, "
          f"{tokens} tokens, compute 1 thread; all-resident step {compute * 1e3:.1f} ms, "
          f"copy {bw / 1e9:.2f} GB/s; median of {reps} rotations; freed memory kept: {kept}")
    print(f"{'resident':>8s} {'streamed MiB':>12s} {'no prefetch ms':>14s} {'prefetch ms':>11s} "
          f"{'bound ms':>9s} {'prefetch/bound':>14s} {'goal':>6s}")
    for fraction, streamed, t_off, t_on, bound, hits, _ in rows:
        goal = "<=1.15" if fraction == 0.5 else ""
        print(f"{fraction * 100:7.0f}% {streamed / 2**20:12.1f} {t_off * 1e3:14.1f} {t_on * 1e3:11.1f} "
              f"{bound * 1e3:9.1f} {t_on / bound:14.2f} {goal:>6s}")


if __name__ == "__main__":
    main()
