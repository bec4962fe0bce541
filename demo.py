#!/usr/bin/env python3
"""A small transformer run through the VBAR allocator with half its weights allowed to stay.

    python demo.py [--budget 48M] [--steps 3] [--layers 8] [--width 512] [--hold 1]

Builds a seeded, random-weight transformer in plain torch (8 blocks of width 512: about 98 MiB
of fp32 weights), computes a reference output, then gives a copy of the model its weights
through a VBAR on the host backend (a simulated card whose size is ``--budget``) and runs
``--steps`` forward passes. Every output must equal the plain-torch reference bit for bit:
the script prints OK or FAIL and exits 1 on a mismatch.

After each step it prints the pool's counters; at the end, where every weight lives:
``held`` (pinned by you: never evicted), ``resident`` (mapped, reused without a copy) or
``streamed`` (did not fit the budget: copied through a temporary at each use).
No GPU, no ComfyUI and no model file needed; the pack must be installed (``pip install -e .``).
"""
import argparse
import copy
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from vbar_loaders.loaders.runtime.vbar_modules import execution_order, vbarize
from vbar_loaders.loaders.runtime.weight_store import WeightStore
from vbar_loaders.vram import BudgetExceeded, Pool, parse_bytes
from vbar_loaders.vram.host_backend import HostBackend
from vbar_loaders.vram.stats import fmt_bytes

MiB = 1 << 20
VOCAB = 512


def page_size_for(weights):
    """About 48 pages per model, a power of two between 64 KiB and 2 MiB."""
    ps = 64 << 10
    while ps < 2 * MiB and ps * 48 < weights:
        ps *= 2
    return ps


class Block(nn.Module):
    def __init__(self, d, heads=8):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, layers, width):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, tokens):
        x = self.emb(tokens)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


# --- formatting -----------------------------------------------------------------------------
def mib(n):
    return f"{n / MiB:.1f}"


def table(headers, rows, align=None):
    """Plain-text table; ``align`` is a string of '<'/'>' per column (default: first left)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    align = align or "<" + ">" * (len(headers) - 1)
    fmt = "  ".join(f"{{:{a}{w}}}" for a, w in zip(align, widths))
    lines = [fmt.format(*headers), "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*r) for r in cells]
    return "\n".join(lines)


STATS_HEAD = ["step", "ms", "budget MiB", "resident MiB", "peak MiB", "pinned MiB", "hits",
              "misses", "offloaded", "watermark_fails", "evictions", "mapped MiB", "unmapped MiB"]
EVENTS = ("hits", "misses", "offloaded", "watermark_fails", "evictions", "bytes_mapped",
          "bytes_unmapped")


def stats_row(step, ms, st, prev):
    d = {k: st[k] - prev.get(k, 0) for k in EVENTS}
    return [step, f"{ms:.0f}", mib(st["budget_bytes"]), mib(st["resident_bytes"]),
            mib(st["peak_resident_bytes"]), mib(st["pinned_bytes"]), d["hits"], d["misses"],
            d["offloaded"], d["watermark_fails"], d["evictions"], mib(d["bytes_mapped"]),
            mib(d["bytes_unmapped"])]


MARK = {"held": "H", "resident": "#", "streamed": "."}


def residency(vbar):
    states = vbar.slot_states()
    rows = [[name, mib(nbytes), state, s.faults, s.offloads]
            for (name, nbytes, state), s in zip(states, vbar.slots)]
    bar = "".join(MARK[state] for _, _, state in states)
    return rows, bar, states


# --- the run --------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", help="simulated VRAM for weights, e.g. 48M, 1G "
                    "(default: half the model's weights)")
    ap.add_argument("--steps", type=int, default=3, help="forward passes (default 3)")
    ap.add_argument("--layers", type=int, default=8, help="transformer blocks (default 8)")
    ap.add_argument("--width", type=int, default=512, help="model width, multiple of 8 (default 512)")
    ap.add_argument("--hold", type=int, default=1,
                    help="pin the weights of the first N blocks for the whole run (default 1)")
    ap.add_argument("--tokens", type=int, default=64, help="sequence length (default 64)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.layers < 1 or args.width < 8 or args.width % 8 or args.tokens < 1:
        ap.error("--steps, --layers, --tokens must be >= 1 and --width a multiple of 8")
    if not 0 <= args.hold <= args.layers:
        ap.error("--hold must be between 0 and --layers")

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    ref_model = TinyTransformer(args.layers, args.width).eval()
    tokens = torch.randint(0, VOCAB, (2, args.tokens), generator=torch.Generator().manual_seed(args.seed))
    weights = sum(p.numel() * p.element_size() for p in ref_model.parameters())
    with torch.no_grad():
        ref = ref_model(tokens)

    page = page_size_for(weights)
    budget = parse_bytes(args.budget) if args.budget else max(page, weights // 2 // page * page)
    model = copy.deepcopy(ref_model)
    pool = Pool(HostBackend(), budget=budget)
    store = WeightStore("demo", pool, page_size=page)
    vbarize(model, store, order=execution_order(model, tokens))
    vbar = store.vbar
    print(f"model: {args.layers} blocks x width {args.width}, {weights / MiB:.1f} MiB of fp32 weights "
          f"in {len(vbar.slots)} VBAR slots ({len(store.handles) - len(vbar.slots)} small tensors "
          f"live outside it)")
    default = "" if args.budget else " (default: half the weights)"
    print(f"pool:  host backend, budget {mib(budget)} MiB{default}, "
          f"page {fmt_bytes(page)}, {vbar.size / MiB:.0f} MiB of address space reserved")

    held = []
    for i in range(args.hold):
        prefix = f"blocks.{i}."
        for s in vbar.slots:
            if s.name.startswith(prefix):
                try:
                    vbar.hold(s)
                except BudgetExceeded as e:
                    print(f"cannot hold {s.name}: {e}")
                    pool.close()
                    return 2
                held.append(s)
    if held:
        print(f"held:  {len(held)} slots of the first {args.hold} block(s), "
              f"{mib(sum(s.nbytes for s in held))} MiB pinned for the whole run")

    ok = True
    rows, prev = [], {}
    with torch.no_grad():
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            out = model(tokens)
            ms = (time.perf_counter() - t0) * 1e3
            st = pool.stats()
            rows.append(stats_row(step, ms, st, prev))
            prev = st
            same = torch.equal(out, ref)
            if not same:
                ok = False
                print(f"step {step}: output differs from plain torch, max |diff| "
                      f"{(out - ref).abs().max().item():.3e}")
            if st["resident_bytes"] > st["budget_bytes"]:
                ok = False
                print(f"step {step}: resident {st['resident_bytes']} exceeds budget {st['budget_bytes']}")

    print("\npool counters per step (events during the step; resident/peak/pinned at its end):")
    print(table(STATS_HEAD, rows, "<" + ">" * (len(STATS_HEAD) - 1)))

    res_rows, bar, states = residency(vbar)
    print("\nresidency after the last step (faults and offloads over all steps):")
    print(table(["slot", "MiB", "state", "faults", "offloads"], res_rows, "<><>>"))
    counts = {k: sum(1 for _, _, s in states if s == k) for k in MARK}
    print(f"\nmap: [{bar}]  H held {counts['held']}, # resident {counts['resident']}, "
          f". streamed {counts['streamed']}  (priority order, left = first used)")

    for s in held:
        vbar.release(s)
    pinned = pool.stats()["pinned_bytes"]
    if pinned:
        ok = False
        print(f"pinned bytes left after release: {pinned}")
    pool.close()
    total = time.perf_counter() - t_start
    print(f"\n{'OK' if ok else 'FAIL'}: {args.steps} steps, outputs "
          f"{'equal' if ok else 'NOT equal'} to plain torch ({total:.1f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
