"""Loader latency, RSS growth and step time on a generated checkpoint.

Prints a table of ratios measured in one run (the machine is shared: absolute times mean little):
  * open time of our zero-copy reader vs ``safetensors.torch.load_file`` (goal <= 2 % of it is
    not meaningful when both are lazy; the ratio is printed as measured)
  * RSS growth after loading (goal <= 5 % of the file)
  * step time, everything resident, vs the same model on plain torch modules (goal <= 3 %)
  * step time at 50 % resident vs all resident, and vs the bound max(compute, copy/bandwidth)

    python benchmarks/bench_loader.py            # >= 2 GB file (about a minute)
    python benchmarks/bench_loader.py --quick    # 64 MB, for CI
"""
import argparse
import copy
import gc
import os
import statistics
import tempfile
import time

import torch

from vbar_loaders.loaders.files.safetensors_file import SafetensorsFile
from vbar_loaders.loaders.runtime.vbar_modules import vbarize
from vbar_loaders.loaders.runtime.weight_store import WeightStore
from vbar_loaders.vram import Pool
from vbar_loaders.vram.host_backend import HostBackend


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_model(width, blocks):
    layers = []
    for _ in range(blocks):
        layers += [torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width)]
    return torch.nn.Sequential(*layers).eval()


def write_checkpoint(path, width, blocks):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = make_model(width, blocks)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model


def median_time(fn, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    width, blocks, tokens, reps = (512, 4, 64, 3) if args.quick else (2048, 16, 96, 3)
    tmp = tempfile.mkdtemp(dir=args.dir)
    path = os.path.join(tmp, "bench.safetensors")
    write_checkpoint(path, width, blocks)
    size = os.path.getsize(path)
    rows = []

    # --- loading: both readers are lazy (mmap); compare open+every-tensor-view time and RSS.
    from safetensors.torch import load_file

    def ours():
        f = SafetensorsFile(path)
        return {k: f.get_tensor(k) for k in f.keys()}

    t_ref = median_time(lambda: load_file(path), 5)
    r0 = rss()
    t_ours = median_time(ours, 5)
    sd = ours()
    growth = rss() - r0
    rows.append(("load: ours (ms)", t_ours * 1e3, "", ""))
    rows.append(("load: safetensors.torch.load_file (ms)", t_ref * 1e3, "", ""))
    rows.append(("load: ours / load_file", t_ours / t_ref, "<= 1", "PASS" if t_ours <= t_ref else "MISS"))
    rows.append(("RSS growth after load / file size (%)", 100 * growth / size, "<= 5",
                 "PASS" if growth <= 0.05 * size else "MISS"))

    # --- steps: plain torch vs VBAR-resident vs half resident, same weights (from the file).
    plain = make_model(width, blocks)
    plain.load_state_dict(sd, assign=True)
    x = torch.randn(tokens, width)
    with torch.no_grad():
        ref = plain(x)

        def vbar_model(budget):
            model = copy.deepcopy(plain)
            pool = Pool(HostBackend(), budget=budget)
            vbarize(model, WeightStore("bench", pool, copy_streams=True))
            assert torch.equal(model(x), ref)          # warm: copies in what fits
            return model, pool

        # Interleave the runs (A B A B ...) so drift in the machine's load hits both alike.
        resident, pool_res = vbar_model(4 * size)
        t_plain, t_res = interleaved(lambda: plain(x), lambda: resident(x), reps + 4)
        pool_res.close()
        del resident
        half, pool_half = vbar_model(size // 2)
        t_half = median_time(lambda: half(x), reps + 2)
        st_half = pool_half.stats()
        pool_half.close()
        del half
    gc.collect()
    streamed = st_half["offloaded"] / max(1, st_half["faults"])
    bw = bandwidth(size // 2)
    bound = max(t_res, (size / 2) / bw)
    rows.append(("step: plain torch modules (ms)", t_plain * 1e3, "", ""))
    rows.append(("step: all resident (ms)", t_res * 1e3, "", ""))
    overhead = t_res / t_plain - 1
    rows.append(("step: all resident / plain - 1 (%)", 100 * overhead, "<= 3",
                 "PASS" if overhead <= 0.03 else "MISS"))
    rows.append(("step: 50% budget (ms)", t_half * 1e3, "", f"{100 * streamed:.0f}% of faults streamed"))
    rows.append(("step: 50% budget / all resident", t_half / t_res, "", ""))
    rows.append(("step: 50% budget / max(compute, copy bound)", t_half / bound, "", "info"))

    print(f"checkpoint {size / 2**30:.2f} GiB ({width}x{4 * width} x {2 * blocks} layers, fp32), "
          f"{tokens} tokens, {torch.get_num_threads()} threads, memcpy {bw / 1e9:.1f} GB/s")
    print(f"{'measure':48s} {'value':>10s}  {'goal':6s}  verdict")
    for name, value, goal, verdict in rows:
        print(f"{name:48s} {value:10.3f}  {goal:6s}  {verdict}")
    os.remove(path)


def interleaved(a, b, reps):
    ta, tb = [], []
    for _ in range(reps):
        for fn, out in ((a, ta), (b, tb)):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def bandwidth(nbytes):
    src = torch.empty(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = median_time(lambda: dst.copy_(src), 5)
    return nbytes / t


if __name__ == "__main__":
    main()
