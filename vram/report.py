"""What the VRAM monitor shows: a snapshot of every pool, a text table, and a residency map.

Knows nothing of ComfyUI. The snapshot and the text need neither torch nor numpy (the live
panel's background thread builds snapshots); the map image needs numpy.
"""
import sys
import time

from .stats import fmt_bytes

STATE_CODES = {"held": "H", "resident": "R", "streamed": "S"}
# Colours of the residency map (RGB 0-255); the legend and the web panel use the same ones.
COLOURS = {
    "H": (167, 112, 255),   # held: pinned resident, never evicted
    "R": (63, 185, 80),     # resident: mapped, reused without a copy
    "S": (214, 120, 40),    # streamed: not mapped, copied through a temporary at each use
}
LEGEND = (("H", "held / pinned"), ("R", "resident"), ("S", "streamed / not resident"))
BACKGROUND = (30, 30, 34)
TRACK = (58, 58, 64)
TEXT = (225, 225, 230)
DIM_TEXT = (150, 150, 160)


# --- snapshot ---------------------------------------------------------------------------------
def pool_snapshot(pool):
    """``pool.stats()`` plus, per VBAR, its slots' states as one letter each (H/R/S, priority
    order, the states of ``VBAR.slot_states()``) and the bytes streamed so far.

    The pool lock is held only to read the counters and copy each VBAR's page map (a few
    microseconds per model): the live panel snapshots while sampling faults on another thread.
    The per-slot work happens after, on the copies."""
    with pool.lock:
        st = pool.stats()
        raw = [(bytes(v.mapped), list(v.slots)) for v in pool.vbars]
    for (mapped, slots), d in zip(raw, st["vbars"]):
        d["slot_states"] = slot_codes(mapped, slots)
        d["streamed_bytes"] = sum(s.offloads * s.nbytes for s in slots)
    st["streamed_bytes"] = sum(d["streamed_bytes"] for d in st["vbars"])
    return st


def slot_codes(mapped, slots):
    """What ``VBAR.slot_states()`` says, one letter a slot, from a copy of the page map."""
    return "".join("H" if s.held else ("R" if 0 not in mapped[s.p0:s.p1 + 1] else "S")
                   for s in slots)


def device_numbers(device, stats):
    """Total/free memory of the device and what torch's caching allocator holds.

    CUDA numbers come from torch only when this process already initialised CUDA: the monitor
    must never be the one to create a CUDA context (or import torch). Elsewhere the pool's
    budget stands for the device: total = budget + headroom, free = total - resident.
    """
    out = {"device": device, "source": "pool budget", "total_bytes": None, "free_bytes": None,
           "torch_allocated_bytes": 0, "torch_reserved_bytes": 0}
    torch = sys.modules.get("torch")
    if device.startswith("cuda") and torch is not None:
        try:
            if torch.cuda.is_initialized():
                index = int(device.split(":")[1]) if ":" in device else 0
                free, total = torch.cuda.mem_get_info(index)
                out.update(source="cuda", total_bytes=total, free_bytes=free,
                           torch_allocated_bytes=torch.cuda.memory_allocated(index),
                           torch_reserved_bytes=torch.cuda.memory_reserved(index))
                return out
        except Exception as e:  # noqa: BLE001 - a monitor reports, it never fails the run
            out["error"] = f"{type(e).__name__}: {e}"
    total = stats["capacity_bytes"] or (stats["budget_bytes"] + stats["headroom_bytes"])
    out["total_bytes"] = total
    out["free_bytes"] = max(0, total - stats["resident_bytes"] - stats["used_by_others_bytes"])
    return out


def collect(pools=None):
    """``{"time", "pools": {dev: pool snapshot}, "devices": {dev: device numbers}}`` for a
    ``{device: Pool}`` mapping, by default every pool of this process (``vram.pools()``).
    Closed pools are left out."""
    if pools is None:
        from . import pools as all_pools

        pools = all_pools()
    snap = {"time": time.time(), "pools": {}, "devices": {}}
    for dev, pool in list(pools.items()):
        if pool.closed:
            continue
        st = pool_snapshot(pool)
        snap["pools"][dev] = st
        snap["devices"][dev] = device_numbers(dev, st)
    return snap


def moved_since(prev, cur):
    """Per (device, VBAR name): bytes mapped (copied in) and streamed between two snapshots.

    A VBAR absent from ``prev``, or whose counters went down (the model was reloaded under the
    same name), counts from zero."""
    before = {}
    for dev, st in (prev or {}).get("pools", {}).items():
        for v in st["vbars"]:
            before[(dev, v["name"])] = v
    out = {}
    for dev, st in cur["pools"].items():
        for v in st["vbars"]:
            p = before.get((dev, v["name"]))
            if p is None or v["bytes_mapped"] < p["bytes_mapped"] or v["faults"] < p["faults"]:
                p = {"bytes_mapped": 0, "streamed_bytes": 0}
            out[(dev, v["name"])] = {
                "mapped": v["bytes_mapped"] - p["bytes_mapped"],
                "streamed": v["streamed_bytes"] - p["streamed_bytes"],
            }
    return out


# --- text -------------------------------------------------------------------------------------
def _pct(part, whole):
    return f"{100 * part / whole:.0f}%" if whole else "-"


def _short(name, width):
    name = str(name)
    if len(name) <= width:
        return name
    return name[:width // 2 - 1] + "…" + name[-(width - width // 2):]


def _watermark(v):
    # At or above the last slot it limits nothing: nothing of this model was evicted since it
    # was last prioritized.
    wm = v["watermark_bytes"]
    return "none" if wm >= v["allocated_bytes"] else fmt_bytes(wm)


COLUMNS = ("model", "reserved", "resident", "pinned", "held", "watermark", "hits", "misses",
           "offloaded", "evictions", "moved in", "streamed")


def text_report(snap, prev=None):
    """A fixed-width table per device; 'moved in'/'streamed' count since ``prev``."""
    moved = moved_since(prev, snap)
    lines = []
    if not snap["pools"]:
        return "VBAR VRAM monitor: no VBAR pool yet (no VBAR loader has run in this process)."
    for dev, st in snap["pools"].items():
        d = snap["devices"][dev]
        lines.append(f"VBAR VRAM monitor - {dev} ({st['backend']} backend)")
        lines.append(f"device  total {fmt_bytes(d['total_bytes'])}, "
                     f"free {fmt_bytes(d['free_bytes'])}"
                     f" ({d['source']}); torch allocated {fmt_bytes(d['torch_allocated_bytes'])},"
                     f" reserved {fmt_bytes(d['torch_reserved_bytes'])}")
        used = st["resident_bytes"]
        lines.append(f"pool    budget {fmt_bytes(st['budget_bytes'])}, used {fmt_bytes(used)} "
                     f"({_pct(used, st['budget_bytes'])}), peak "
                     f"{fmt_bytes(st['peak_resident_bytes'])}, headroom "
                     f"{fmt_bytes(st['headroom_bytes'])}, others "
                     f"{fmt_bytes(st['used_by_others_bytes'])}")
        if not st["vbars"]:
            lines.append("        no models loaded")
            lines.append("")
            continue
        rows = [COLUMNS]
        for v in st["vbars"]:
            m = moved[(dev, v["name"])]
            rows.append((
                _short(v["name"], 36), fmt_bytes(v["reserved_bytes"]),
                fmt_bytes(v["resident_bytes"]),
                fmt_bytes(v["pinned_bytes"]), fmt_bytes(v["held_bytes"]),
                _watermark(v), str(v["hits"]), str(v["misses"]),
                str(v["offloaded"]), str(v["evictions"]), fmt_bytes(m["mapped"]),
                fmt_bytes(m["streamed"])))
        widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
        for r in rows:
            cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
            lines.append("  ".join(cells).rstrip())
        lines.append("")
    lines.append("held = pinned, never evicted. moved in = pages mapped and copied in;")
    lines.append("streamed = bytes copied through a temporary; both since this monitor last ran" +
                 ("." if prev else " (first run: since each model loaded)."))
    return "\n".join(lines)


# --- residency map ----------------------------------------------------------------------------
def map_rows(snap):
    """(label, detail, slot_states) per VBAR, devices in order, highest priority first."""
    multi = len(snap["pools"]) > 1
    rows = []
    for dev, st in snap["pools"].items():
        for v in st["vbars"]:
            label = f"{dev}: {v['name']}" if multi else v["name"]
            states = v.get("slot_states", "")
            detail = (f"{fmt_bytes(v['resident_bytes'])} of "
                      f"{fmt_bytes(v['allocated_bytes'])} resident"
                      f" | {states.count('H')} held, {states.count('R')} resident, "
                      f"{states.count('S')} streamed of {v['slots']} slots")
            rows.append((label, detail, states))
    return rows


def residency_map(snap, width=768, bar_height=18, label_height=16, gap=10, pad=10):
    """The residency map as a uint8 numpy array (H, W, 3), plus the text to draw on it.

    One bar per model; each slot (a layer's weight, in priority = first-use order, held ones
    first) gets an equal share of the bar, coloured by its state. Returns ``(image, labels)``,
    labels = ``[(x, y, text, rgb, align)]``, y the top of the text line, align "left"
    (x = left edge) or "right" (x = right edge): the caller draws them
    with whatever font it has (numpy has none), so the picture is complete without text too.
    """
    import numpy as np

    rows = map_rows(snap)
    legend_h = label_height + gap
    height = pad + legend_h + max(1, len(rows)) * (label_height + bar_height + gap) + pad - gap
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    labels = []
    # Legend: a swatch and a name per state.
    x, y = pad, pad
    for code, name in LEGEND:
        img[y + 3:y + label_height - 3, x:x + 10] = COLOURS[code]
        labels.append((x + 14, y, name, TEXT, "left"))
        x += 14 + 7 * len(name) + 20
    y += legend_h
    bar_w = width - 2 * pad
    palette = np.array([TRACK, COLOURS["H"], COLOURS["R"], COLOURS["S"]], dtype=np.uint8)
    index = {"H": 1, "R": 2, "S": 3}
    if not rows:
        labels.append((pad, y, "no VBAR models loaded", DIM_TEXT, "left"))
    for label, detail, states in rows:
        labels.append((pad, y, label, TEXT, "left"))
        labels.append((width - pad, y, detail, DIM_TEXT, "right"))
        y += label_height
        bar = img[y:y + bar_height, pad:pad + bar_w]
        n = len(states)
        if n:
            codes = np.frombuffer(states.encode(), dtype=np.uint8)
            lut = np.zeros(256, dtype=np.uint8)
            for c, i in index.items():
                lut[ord(c)] = i
            # Pixel column x shows slot floor(x * n / bar_w): every slot gets >= 1 column
            # while n <= bar_w, and a long model is sampled evenly rather than cut off.
            cols = (np.arange(bar_w) * n) // bar_w
            bar[:] = palette[lut[codes[cols]]][None, :, :]
            if bar_w // n >= 4:
                # Wide cells: a dark seam at each slot boundary so single layers can be counted.
                starts = np.flatnonzero(np.diff(cols)) + 1
                bar[:, starts] = BACKGROUND
        else:
            bar[:] = TRACK
        y += bar_height + gap
    return img, labels
