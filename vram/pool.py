"""A pool per device: the budget, and the VBARs sharing it in priority order."""
import threading
import time

from .errors import BadCall, ClosedError, PhysicalOOM
from .vbar import VBAR


class Pool:
    """Physical memory shared by several VBARs.

    ``budget`` is the most bytes our pages may occupy: the user's limit, or the device's capacity,
    less ``headroom`` (kept for activations) and less what others use on the device (CUDA: read
    from the driver at most every ``refresh_s`` seconds).
    """

    def __init__(self, backend, budget=None, headroom=0, refresh_s=0.25):
        if backend.capacity() is None and budget is None:
            raise BadCall(f"{backend.name} backend has no device capacity: give the pool a budget")
        self.backend = backend
        self.lock = threading.RLock()
        self.vbars = []              # highest priority first
        self._closed_counters = {}   # counters of VBARs closed since: the pool's stay cumulative
        self.refresh_s = refresh_s
        self._others = 0
        self._others_at = -1e9
        self.mapped_bytes = 0
        self.peak_mapped_bytes = 0
        self._serial = 0             # global, so a re-mapped page never repeats a signature
        self.closed = False
        self._budget = None
        self.headroom = 0
        self.set_budget(budget, headroom)

    # --- budget -----------------------------------------------------------------------------
    def set_budget(self, budget=None, headroom=None):
        """Change the limit; pages over the new budget are evicted now, lowest priority first."""
        if budget is not None and (not isinstance(budget, int) or budget <= 0):
            raise BadCall(f"budget must be a positive number of bytes, got {budget!r}")
        if headroom is not None and (not isinstance(headroom, int) or headroom < 0):
            raise BadCall(f"headroom must be >= 0 bytes, got {headroom!r}")
        if budget is None and self.backend.capacity() is None:
            raise BadCall(f"{self.backend.name} backend has no device capacity: give the pool a budget")
        with self.lock:
            self._budget = budget
            if headroom is not None:
                self.headroom = headroom
            if self.vbars and self.mapped_bytes > self.budget():
                self.make_room(0)

    @property
    def limit(self):
        """The limit given to ``set_budget`` in bytes, or None: the device's capacity."""
        return self._budget

    def budget(self):
        """Bytes our pages may occupy now: the limit (or the capacity, whichever is smaller)
        less headroom and less what others use on the device; never negative."""
        cap = self.backend.capacity()
        limit = self._budget if cap is None else min(self._budget or cap, cap)
        others = self._others_now() if cap is not None else 0
        return max(0, limit - self.headroom - others)

    def _others_now(self):
        now = time.monotonic()
        if now - self._others_at > self.refresh_s:
            self._others = self.backend.used_by_others(self.mapped_bytes)
            self._others_at = now
        return self._others

    def _free_bytes(self):
        return self.budget() - self.mapped_bytes

    # --- VBARs ------------------------------------------------------------------------------
    def create_vbar(self, name, reserve_bytes, page_size=None):
        """Reserve a range for one model; it starts at the top of the priority order."""
        if not isinstance(reserve_bytes, int) or reserve_bytes <= 0:
            raise BadCall(f"VBAR '{name}': reserve size must be a positive int, got {reserve_bytes!r}")
        ps = page_size or self.backend.default_page_size
        if ps <= 0 or ps % self.backend.granularity:
            raise BadCall(f"VBAR '{name}': page size {ps} must be a positive multiple of the "
                          f"backend granularity {self.backend.granularity}")
        with self.lock:
            if self.closed:
                raise ClosedError("pool is closed")
            vbar = VBAR(self, name, reserve_bytes, ps)
            self.vbars.insert(0, vbar)
            return vbar

    def _move(self, vbar, top, below=None):
        """Reorder the priority list: to the top, to the bottom, or right below ``below``."""
        self.vbars.remove(vbar)
        if below is not None:
            self.vbars.insert(self.vbars.index(below) + 1, vbar)
        elif top:
            self.vbars.insert(0, vbar)
        else:
            self.vbars.append(vbar)

    def _forget(self, vbar):
        if vbar in self.vbars:
            self.vbars.remove(vbar)
            # The pool's event counts are the device's history, as torch.cuda.memory_stats'
            # are: a model unloaded right after it ran must not take its faults with it.
            for key, n in vbar.counters.as_dict().items():
                self._closed_counters[key] = self._closed_counters.get(key, 0) + n

    # --- paging (called with the lock held) ---------------------------------------------------
    def _map_pages(self, vbar, pages):
        """Map ``pages`` of ``vbar`` (sorted), coalescing runs. False if the device ran out."""
        ps = vbar.page_size
        done = []
        try:
            i = 0
            while i < len(pages):
                j = i
                while (self.backend.coalesce and j + 1 < len(pages)
                       and pages[j + 1] == pages[j] + 1):
                    j += 1
                self.backend.map(vbar.base + pages[i] * ps, (j - i + 1) * ps)
                done.extend(pages[i:j + 1])
                i = j + 1
        except PhysicalOOM:
            # The driver disagrees with our budget (someone else allocated): give back this
            # fault's pages and let the caller stream; the next budget refresh sees the truth.
            for p in done:
                self.backend.unmap(vbar.base + p * ps, ps)
            self._others_at = -1e9
            return False
        for p in pages:
            vbar.mapped[p] = 1
            self._serial += 1
            vbar.serial[p] = self._serial
        n = len(pages)
        vbar.mapped_pages += n
        vbar.peak_mapped_pages = max(vbar.peak_mapped_pages, vbar.mapped_pages)
        vbar.counters.bytes_mapped += n * ps
        self.mapped_bytes += n * ps
        self.peak_mapped_bytes = max(self.peak_mapped_bytes, self.mapped_bytes)
        return True

    def _unmap(self, vbar, p):
        ps = vbar.page_size
        self.backend.unmap(vbar.base + p * ps, ps)
        self.mapped_bytes -= ps

    def _evict_for(self, vbar, last_page, nbytes):
        """Free ``nbytes`` for a fault of ``vbar`` ending at ``last_page``, or evict nothing.

        Candidates: every lower-priority VBAR, then ``vbar``'s own pages above ``last_page``;
        lowest priority first, top address down. Higher-priority VBARs are never touched.
        """
        i = self.vbars.index(vbar)
        order = list(reversed(self.vbars[i + 1:]))
        avail = sum(v._evictable_above(0) * v.page_size for v in order)
        avail += vbar._evictable_above(last_page + 1) * vbar.page_size
        if avail < nbytes:
            return False
        freed = 0
        for v in order:
            if freed >= nbytes:
                break
            freed += v._evict_down(nbytes - freed, floor=0)
        if freed < nbytes:
            freed += vbar._evict_down(nbytes - freed, floor=last_page + 1)
        return freed >= nbytes

    def make_room(self, nbytes):
        """Evict unpinned pages, lowest-priority VBAR first, until ``nbytes`` of the budget are free.

        For callers outside the allocator (activations, an OOM retry). Returns bytes freed.
        """
        with self.lock:
            want = nbytes - self._free_bytes()
            freed = 0
            for v in reversed(list(self.vbars)):
                if freed >= want:
                    break
                freed += v._evict_down(want - freed, floor=0)
            return freed

    # --- visibility -------------------------------------------------------------------------
    def stats(self):
        with self.lock:
            cap = self.backend.capacity()
            vb = [v.stats() for v in self.vbars]
            d = {
                "backend": self.backend.name,
                "capacity_bytes": cap,
                "budget_bytes": self.budget(),
                "headroom_bytes": self.headroom,
                "used_by_others_bytes": self._others if cap is not None else 0,
                "resident_bytes": self.mapped_bytes,
                "peak_resident_bytes": self.peak_mapped_bytes,
                "reserved_bytes": sum(v["reserved_bytes"] for v in vb),
                "pinned_bytes": sum(v["pinned_bytes"] for v in vb),
                "vbars": vb,
            }
            from .stats import COUNTERS

            for key in COUNTERS:
                d[key] = sum(v[key] for v in vb) + self._closed_counters.get(key, 0)
            return d

    def close(self):
        with self.lock:
            for v in list(self.vbars):
                v.close()
            self.closed = True
            self.backend.close()
