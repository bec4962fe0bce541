"""VBAR allocator costs on the host backend: hit path, miss path, and reserving a huge range.

    .venv/bin/python benchmarks/bench_vram.py [--quick] [--strict]

  hit   fault()+unpin() of a slot whose pages are still mapped: what every layer pays at every
        forward once its weight is resident. Median over batches, in microseconds.
  miss  fault() of a slot whose pages were all evicted: mapping them again (mprotect and
        pre-faulting, as cuMemCreate+cuMemMap pay the physical cost up front), per MiB. The
        copy of the weight into the pages is not included; unmapping (eviction) is shown apart.
  reserve  create_vbar() of a 100 GiB range: address space only, so it must be fast and leave
        the resident set unchanged but for the allocator's own per-page bookkeeping.

Timings are medians over rounds run in one process; other load on the machine hits them all.
``--strict`` exits 1 when a goal is missed (off by default: a shared CI box is noisy).
"""
import argparse
import gc
import mmap
import os
import statistics
import sys
import time

from vbar_loaders.vram import Pool
from vbar_loaders.vram.host_backend import HostBackend

MiB = 1 << 20
GiB = 1 << 30
HIT_GOAL_US = 3.0
RESERVE_GOAL_MS = 1.0
RSS_GOAL_BYTES = 1 * MiB


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


def vm_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * mmap.PAGESIZE


def _batches(fn, batches, n):
    """Per-call ns of ``fn(n)`` over ``batches`` batches; gc off while timing."""
    out = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(batches):
            t0 = time.perf_counter_ns()
            fn(n)
            out.append((time.perf_counter_ns() - t0) / n)
    finally:
        gc.enable()
    return out


def _page(backend, page_mib):
    """``page_mib`` MiB, or the backend's granularity if that is larger (CUDA: usually 2 MiB)."""
    return max(page_mib * MiB, backend.granularity)


def bench_hit(batches, n, pages=1, new_backend=HostBackend):
    """``new_backend``: a callable returning the backend to measure (gpu_check passes CUDA's)."""
    backend = new_backend()
    pool = Pool(backend, budget=GiB)
    ps = _page(backend, 2)
    vbar = pool.create_vbar("hit", 64 * MiB, page_size=ps)
    # A slot spanning exactly `pages` pages (a 512-byte aligned weight usually straddles one
    # more page than its size suggests).
    if pages == 1:
        slot = vbar.alloc(MiB, name="w")
    else:
        vbar.alloc(ps - 4096, name="pad")
        slot = vbar.alloc(ps * (pages - 2) + 8192, name="w")
    assert slot.p1 - slot.p0 + 1 == pages, slot
    fault, unpin = vbar.fault, vbar.unpin
    r = fault(slot)
    assert r.ok
    unpin(slot)

    def both(k):
        for _ in range(k):
            fault(slot)
            unpin(slot)

    def faults(k):
        for _ in range(k):
            fault(slot)

    def unpins(k):
        for _ in range(k):
            unpin(slot)

    def empty(k):
        for _ in range(k):
            pass

    both_ns = _batches(both, batches, n)
    f_ns, u_ns = [], []
    for _ in range(batches):   # fault n times (pins stack up), then unpin n times
        f_ns += _batches(faults, 1, n)
        u_ns += _batches(unpins, 1, n)
    loop_ns = _batches(empty, batches, n)
    hits = vbar.stats()["hits"]
    pool.close()
    med = statistics.median
    return {"both": med(both_ns) / 1e3, "fault": med(f_ns) / 1e3, "unpin": med(u_ns) / 1e3,
            "loop": med(loop_ns) / 1e3, "best": min(both_ns) / 1e3, "hits": hits}


def bench_use_hit(batches, n, new_backend=HostBackend):
    """The whole per-layer path: WeightStore.use() on a resident weight (context manager)."""
    import torch

    from vbar_loaders.loaders.runtime.weight_store import WeightStore

    backend = new_backend()
    pool = Pool(backend, budget=GiB)
    store = WeightStore("use", pool, page_size=_page(backend, 2))
    h = store.add("w", torch.zeros(512, 1024))
    store.build()
    dev, dt = store.device, torch.float32
    use = store.use
    with use(h, dev, dt):
        pass

    def run(k):
        for _ in range(k):
            with use(h, dev, dt):
                pass

    ns = _batches(run, batches, n)
    pool.close()
    return statistics.median(ns) / 1e3


def bench_miss(rounds, slot_mib, page_mib, new_backend=HostBackend):
    backend = new_backend()
    ps = _page(backend, page_mib)
    pool = Pool(backend, budget=4 * slot_mib * MiB)
    vbar = pool.create_vbar("miss", slot_mib * MiB, page_size=ps)
    slot = vbar.alloc(slot_mib * MiB, name="w")
    fault_ns, evict_ns = [], []
    gc.disable()
    try:
        for _ in range(rounds + 1):
            t0 = time.perf_counter_ns()
            r = vbar.fault(slot)
            t1 = time.perf_counter_ns()
            assert r.ok and r.changed
            vbar.unpin(slot)
            t2 = time.perf_counter_ns()
            freed = vbar.free_memory(slot_mib * MiB)
            t3 = time.perf_counter_ns()
            assert freed == slot_mib * MiB
            fault_ns.append(t1 - t0)
            evict_ns.append(t3 - t2)
    finally:
        gc.enable()
    pool.close()
    fault_ns, evict_ns = fault_ns[1:], evict_ns[1:]   # first round warms up
    med = statistics.median
    return {"fault_us_per_mib": med(fault_ns) / 1e3 / slot_mib,
            "evict_us_per_mib": med(evict_ns) / 1e3 / slot_mib,
            "gbps": slot_mib * MiB / med(fault_ns)}


def bench_reserve(rounds, size, page_mib, new_backend=HostBackend):
    backend = new_backend()
    pool = Pool(backend, budget=GiB)
    ps = _page(backend, page_mib)
    # Warm the allocator's code path so import and first-call costs are not counted.
    pool.create_vbar("warm", 64 * MiB, page_size=ps).close()
    times = []
    rss_delta = vm_delta = 0
    for i in range(rounds):
        gc.collect()
        rss0, vm0 = rss_bytes(), vm_bytes()
        t0 = time.perf_counter_ns()
        v = pool.create_vbar("big", size, page_size=ps)
        t1 = time.perf_counter_ns()
        rss1, vm1 = rss_bytes(), vm_bytes()
        times.append(t1 - t0)
        if i == 0 or rss1 - rss0 > rss_delta:
            rss_delta = rss1 - rss0
        vm_delta = vm1 - vm0
        pages = v.npages
        v.close()
    pool.close()
    return {"ms": statistics.median(times) / 1e6, "rss_delta": rss_delta, "vm_delta": vm_delta,
            "pages": pages}


def fmt_table(rows):
    heads = ["measure", "value", "goal", "verdict"]
    w = [max(len(h), *(len(str(r[i])) for r in rows)) for i, h in enumerate(heads)]
    line = "  ".join(f"{{:{a}{n}}}" for a, n in zip("<><<", w))
    out = [line.format(*heads), "  ".join("-" * n for n in w)]
    out += [line.format(*map(str, r)) for r in rows]
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (CI smoke run, ~2 s)")
    ap.add_argument("--strict", action="store_true", help="exit 1 if a goal is missed")
    args = ap.parse_args(argv)
    q = args.quick
    hb, hn = (15, 2000) if q else (101, 10000)
    mr, ms = (3, 32) if q else (15, 128)
    rr = 5 if q else 25

    print(f"VBAR allocator, host backend; python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"{'quick' if q else 'full'} run, medians")
    h1 = bench_hit(hb, hn, pages=1)
    h3 = bench_hit(hb, hn, pages=3)
    use_us = bench_use_hit(hb, hn // 4)
    m2 = bench_miss(mr, ms, 2)
    m32 = bench_miss(mr, ms, 32)
    r32 = bench_reserve(rr, 100 * GiB, 32)
    r2 = bench_reserve(rr, 100 * GiB, 2)

    hit_ok = h1["both"] <= HIT_GOAL_US
    res_ok = r32["ms"] < RESERVE_GOAL_MS
    rss_ok = r32["rss_delta"] < RSS_GOAL_BYTES
    rows = [
        ["hit: fault+unpin, 1-page slot (us)", f"{h1['both']:.2f}", f"<= {HIT_GOAL_US:g}",
         "PASS" if hit_ok else "MISS"],
        ["  fault alone (us)", f"{h1['fault']:.2f}", "", ""],
        ["  unpin alone (us)", f"{h1['unpin']:.2f}", "", ""],
        ["  best batch fault+unpin (us)", f"{h1['best']:.2f}", "", ""],
        ["hit: fault+unpin, 3-page slot (us)", f"{h3['both']:.2f}", "", "info"],
        ["hit: WeightStore.use() resident (us)", f"{use_us:.2f}", "", "info"],
        ["miss: fault after eviction, 2 MiB pages (us/MiB)", f"{m2['fault_us_per_mib']:.1f}", "",
         f"info ({m2['gbps']:.1f} GB/s)"],
        ["miss: fault after eviction, 32 MiB pages (us/MiB)", f"{m32['fault_us_per_mib']:.1f}", "",
         f"info ({m32['gbps']:.1f} GB/s)"],
        ["  eviction (unmap), 2 MiB pages (us/MiB)", f"{m2['evict_us_per_mib']:.1f}", "", ""],
        ["  eviction (unmap), 32 MiB pages (us/MiB)", f"{m32['evict_us_per_mib']:.1f}", "", ""],
        ["reserve 100 GiB VBAR, 32 MiB pages (ms)", f"{r32['ms']:.3f}", f"< {RESERVE_GOAL_MS:g}",
         "PASS" if res_ok else "MISS"],
        ["  RSS growth while reserved (KiB)", f"{r32['rss_delta'] / 1024:.0f}",
         f"< {RSS_GOAL_BYTES // 1024}", "PASS" if rss_ok else "MISS"],
        ["  address space reserved (GiB)", f"{r32['vm_delta'] / GiB:.1f}", "", ""],
        ["reserve 100 GiB VBAR, 2 MiB pages (ms)", f"{r2['ms']:.3f}", "", "info"],
        ["  RSS growth while reserved (KiB)", f"{r2['rss_delta'] / 1024:.0f}", "",
         f"info ({r2['pages']} pages of bookkeeping)"],
    ]
    print(fmt_table(rows))
    missed = [r[0].strip() for r in rows if r[3] == "MISS"]
    print(f"\ngoals: {'all met' if not missed else 'MISSED: ' + '; '.join(missed)}")
    return 1 if (missed and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
