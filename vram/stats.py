"""Counters in the vocabulary of ``torch.cuda.memory_stats``: current, peak, and event counts."""

COUNTERS = (
    "faults",            # every fault() call
    "hits",              # succeeded, signature unchanged: nothing to copy
    "misses",            # succeeded, pages mapped anew: caller must copy
    "offloaded",         # failed: caller streams through a temporary
    "watermark_fails",   # offloaded early because the slot lies above the watermark
    "evictions",         # pages unmapped to make room (any cause)
    "bytes_mapped",      # physical bytes mapped, cumulative
    "bytes_unmapped",    # physical bytes unmapped, cumulative
    "prefetch_hits",     # reported by callers that prepare weights ahead: used as prepared
    "prefetch_wasted",   # prepared, then released unused
)


class Counters:
    __slots__ = COUNTERS

    def __init__(self):
        self.reset()

    def reset(self):
        for name in COUNTERS:
            setattr(self, name, 0)

    def as_dict(self):
        return {name: getattr(self, name) for name in COUNTERS}


def fmt_bytes(n):
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
