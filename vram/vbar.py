"""A VBAR: one model's reserved virtual range, cut into pages that are mapped on demand.

Slots are handed out by bump allocation, so address order is priority order: the caller
allocates its first-used (most important) weights first. Every method takes the pool's lock.

Pins belong to whoever took them: each slot counts its own fault pins (``Slot.pins``, one per
fault not yet unpinned) and its hold (``Slot.held``); a page's pin count is the sum over the
slots on it. So ``unpin``/``release`` must match a fault/hold *of that slot*: a pin taken by
a neighbour sharing the page, or by the hold, is not the caller's to drop. A call that does
not match raises a typed BadCall and changes nothing.
"""
from .errors import AlreadyHeld, BadCall, BudgetExceeded, ClosedError, NotHeld, NotPinned, WrongVBAR

SLOT_ALIGN = 512


class Slot:
    """A weight's place in a VBAR. ``offset``/``nbytes`` are relative to the VBAR's base."""

    __slots__ = ("vbar", "index", "name", "offset", "nbytes", "p0", "p1", "gen", "signature",
                 "result", "faults", "offloads", "pins", "held", "__weakref__")

    def __init__(self, vbar, index, name, offset, nbytes, p0, p1):
        self.vbar, self.index, self.name = vbar, index, name
        self.offset, self.nbytes, self.p0, self.p1 = offset, nbytes, p0, p1
        self.gen = -1           # vbar.unmap_gen when `signature` was last known valid
        self.signature = None   # serials of pages p0..p1 at the last successful fault
        self.result = None
        self.faults = 0
        self.offloads = 0
        self.pins = 0           # fault pins of this slot not yet unpinned
        self.held = False       # the hold's pin (one at most)

    @property
    def addr(self):
        return self.vbar.base + self.offset

    def __repr__(self):
        return f"<Slot {self.name or self.index} {self.nbytes}B @+{self.offset:#x} pages {self.p0}-{self.p1}>"


class Fault:
    """Result of ``VBAR.fault``. ``ok`` False means: stream through a temporary, nothing pinned."""

    __slots__ = ("ok", "signature", "changed")

    def __init__(self, ok, signature=None, changed=False):
        self.ok, self.signature, self.changed = ok, signature, changed

    def __bool__(self):
        return self.ok

    def __repr__(self):
        return f"Fault(ok={self.ok}, changed={self.changed}, signature={self.signature})"


OFFLOADED = Fault(False)


class VBAR:
    def __init__(self, pool, name, reserve_bytes, page_size):
        self.pool = pool
        self.name = name
        self.page_size = page_size
        self.size = -(-reserve_bytes // page_size) * page_size
        self.npages = self.size // page_size
        self.base = pool.backend.reserve(self.size)
        self.mapped = bytearray(self.npages)   # 0/1 per page
        self.pins = [0] * self.npages         # per page: sum of its slots' pins (+1 per hold)
        self.serial = [0] * self.npages
        self.watermark = self.npages           # faults above this page may not evict
        self.top = 0                           # bump pointer (bytes)
        self.slots = []
        self.unmap_gen = 0                     # bumped on every unmap: invalidates cached hits
        self.mapped_pages = 0
        self.pinned_pages = 0                  # pages with pins > 0
        self.peak_mapped_pages = 0
        self.closed = False
        from .stats import Counters

        self.counters = Counters()
        self.lock = pool.lock

    # --- allocation -------------------------------------------------------------------------
    def alloc(self, nbytes, name=None, align=SLOT_ALIGN):
        if not isinstance(nbytes, int) or nbytes <= 0:
            raise BadCall(f"VBAR '{self.name}': slot size must be a positive int, got {nbytes!r}")
        with self.lock:
            self._check_open()
            offset = -(-self.top // align) * align
            if offset + nbytes > self.size:
                raise BadCall(f"VBAR '{self.name}': slot '{name}' of {nbytes} bytes does not fit the "
                              f"reserved {self.size} bytes ({self.size - offset} left); reserve more "
                              f"when creating the VBAR")
            self.top = offset + nbytes
            slot = Slot(self, len(self.slots), name, offset, nbytes,
                        offset // self.page_size, (offset + nbytes - 1) // self.page_size)
            self.slots.append(slot)
            return slot

    # --- faulting ---------------------------------------------------------------------------
    def fault(self, slot):
        """Map ``slot``'s pages (evicting lower-priority pages if allowed) and pin them.

        Returns a Fault: ``ok`` with the slot's signature and whether it ``changed`` since this
        slot's previous successful fault (changed = contents must be copied in again); or
        OFFLOADED when the pages cannot be had within the budget and priority rules.
        """
        with self.lock:
            self._check_slot(slot)
            c = self.counters
            c.faults += 1
            slot.faults += 1
            pins = self.pins
            if slot.gen == self.unmap_gen:
                # Nothing in this VBAR was unmapped since the slot's last fault: all still valid.
                for p in range(slot.p0, slot.p1 + 1):
                    if pins[p] == 0:
                        self.pinned_pages += 1
                    pins[p] += 1
                slot.pins += 1
                c.hits += 1
                return slot.result
            return self._fault_slow(slot)

    def _fault_slow(self, slot):
        c, pool, ps = self.counters, self.pool, self.page_size
        missing = [p for p in range(slot.p0, slot.p1 + 1) if not self.mapped[p]]
        need = len(missing) * ps
        if need:
            free = pool._free_bytes()
            if need > free:
                if slot.p1 >= self.watermark:
                    c.watermark_fails += 1
                    return self._offload(slot)
                if not pool._evict_for(self, slot.p1, need - free):
                    return self._offload(slot)
            if not pool._map_pages(self, missing):
                return self._offload(slot)
        sig = tuple(self.serial[slot.p0:slot.p1 + 1])
        changed = sig != slot.signature
        if changed:
            c.misses += 1
            slot.signature = sig
            slot.result = Fault(True, sig, False)
        else:
            c.hits += 1
        slot.gen = self.unmap_gen
        for p in range(slot.p0, slot.p1 + 1):
            if self.pins[p] == 0:
                self.pinned_pages += 1
            self.pins[p] += 1
        slot.pins += 1
        return Fault(True, sig, True) if changed else slot.result

    def _offload(self, slot):
        self.counters.offloaded += 1
        slot.offloads += 1
        return OFFLOADED

    def unpin(self, slot):
        """Drop the pin of one earlier ``fault(slot)`` (raises NotPinned if it has none)."""
        with self.lock:
            self._check_slot(slot)
            if slot.pins <= 0:
                raise NotPinned(
                    f"VBAR '{self.name}': unpin of {slot!r}, which is not pinned by a fault of it"
                    + (" (it is held: release() drops a hold)" if slot.held else ""))
            slot.pins -= 1
            self._unpin_pages(slot)

    def _unpin_pages(self, slot):
        pins = self.pins
        for p in range(slot.p0, slot.p1 + 1):
            pins[p] -= 1
            if pins[p] == 0:
                self.pinned_pages -= 1
        pool = self.pool
        if pool.mapped_bytes > pool.budget():
            pool.make_room(0)   # the budget shrank while these pages were pinned

    def hold(self, slot):
        """Fault ``slot`` and keep it pinned until ``release``: it is never evicted meanwhile.

        The hold owns its own pin, apart from any fault's: ``unpin`` never drops it."""
        with self.lock:
            self._check_slot(slot)
            if slot.held:
                raise AlreadyHeld(f"VBAR '{self.name}': {slot!r} is already held; release() it "
                                  f"first (a slot has one hold at most)")
            r = self.fault(slot)
            if not r.ok:
                raise BudgetExceeded(
                    f"VBAR '{self.name}': cannot keep '{slot.name}' ({slot.nbytes / 2**20:.1f} MiB) "
                    f"resident: the budget of {self.pool.budget() / 2**20:.0f} MiB has "
                    f"{self.pool._free_bytes() / 2**20:.0f} MiB free and not enough evictable; "
                    f"pin fewer blocks or raise the budget")
            slot.pins -= 1       # the fault's pin on the pages becomes the hold's
            slot.held = True
            return r

    def release(self, slot):
        """End ``slot``'s hold (raises NotHeld if it is not held)."""
        with self.lock:
            self._check_slot(slot)
            if not slot.held:
                raise NotHeld(f"VBAR '{self.name}': release of {slot!r} which is not held")
            slot.held = False
            self._unpin_pages(slot)

    def count(self, name, n=1):
        """Add ``n`` to a counter reported by callers (``prefetch_hits``, ``prefetch_wasted``),
        under the pool lock like every other counter update."""
        if name not in ("prefetch_hits", "prefetch_wasted"):
            raise BadCall(f"VBAR '{self.name}': {name!r} is not a caller-reported counter; "
                          f"use prefetch_hits or prefetch_wasted")
        with self.lock:
            setattr(self.counters, name, getattr(self.counters, name) + n)

    def tensor(self, slot, dtype, shape):
        """A zero-copy tensor over the slot. Valid only while the slot is pinned."""
        import torch

        with self.lock:
            self._check_slot(slot)
            if slot.pins <= 0 and not slot.held:
                raise NotPinned(f"VBAR '{self.name}': {slot!r} is not pinned; fault() it first")
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            if nbytes > slot.nbytes:
                raise BadCall(f"VBAR '{self.name}': view of {nbytes} bytes ({dtype}, {tuple(shape)}) "
                              f"exceeds {slot!r}")
            return self.pool.backend.tensor(slot.addr, nbytes, dtype, tuple(shape))

    # --- priority & eviction ----------------------------------------------------------------
    def prioritize(self):
        """Move to the top of the pool and lift the watermark: this model runs next."""
        with self.lock:
            self._check_open()
            self.pool._move(self, top=True)
            self.watermark = self.npages

    def place_below(self, other):
        """Sit right below ``other`` in the pool (same pool), watermark lifted: for a companion
        VBAR whose pages ``other`` may evict but which may never evict ``other``'s."""
        with self.lock:
            self._check_open()
            other._check_open()
            if other.pool is not self.pool:
                raise BadCall(f"VBAR '{self.name}': '{other.name}' belongs to another pool")
            self.pool._move(self, top=False, below=other)
            self.watermark = self.npages

    def deprioritize(self):
        with self.lock:
            self._check_open()
            self.pool._move(self, top=False)

    def free_memory(self, nbytes):
        """Evict unpinned pages, top address first, until ``nbytes`` are freed. Returns bytes freed."""
        with self.lock:
            self._check_open()
            return self._evict_down(nbytes, floor=0)

    def _evict_down(self, nbytes, floor):
        """Evict unpinned pages >= ``floor`` from the top down; stop once ``nbytes`` are freed."""
        freed = 0
        for p in range(self.npages - 1, floor - 1, -1):
            if freed >= nbytes:
                break
            if self.mapped[p] and self.pins[p] == 0:
                self._unmap_page(p)
                freed += self.page_size
        return freed

    def _evictable_above(self, floor):
        return sum(1 for p in range(floor, self.npages) if self.mapped[p] and self.pins[p] == 0)

    def _unmap_page(self, p):
        self.pool._unmap(self, p)
        self.mapped[p] = 0
        self.mapped_pages -= 1
        self.unmap_gen += 1
        self.counters.evictions += 1
        self.counters.bytes_unmapped += self.page_size
        if p < self.watermark:
            self.watermark = p

    # --- visibility -------------------------------------------------------------------------
    def residency(self):
        """Per used page: (mapped, pinned)."""
        with self.lock:
            used = -(-self.top // self.page_size)
            return [(bool(self.mapped[p]), self.pins[p] > 0) for p in range(used)]

    def slot_states(self):
        """Per slot, in priority order: (name, nbytes, state) with state held/resident/streamed."""
        with self.lock:
            out = []
            for s in self.slots:
                if s.held:
                    state = "held"
                elif all(self.mapped[p] for p in range(s.p0, s.p1 + 1)):
                    state = "resident"
                else:
                    state = "streamed"
                out.append((s.name, s.nbytes, state))
            return out

    def stats(self):
        with self.lock:
            ps = self.page_size
            d = {
                "name": self.name,
                "reserved_bytes": self.size,
                "allocated_bytes": self.top,
                "resident_bytes": self.mapped_pages * ps,
                "pinned_bytes": self.pinned_pages * ps,
                "held_bytes": sum(s.nbytes for s in self.slots if s.held),
                "peak_resident_bytes": self.peak_mapped_pages * ps,
                "watermark_bytes": min(self.watermark * ps, self.top),
                "page_size": ps,
                "slots": len(self.slots),
                "closed": self.closed,
            }
            d.update(self.counters.as_dict())
            return d

    # --- lifetime ---------------------------------------------------------------------------
    def close(self):
        """Unmap every page and release the range. Idempotent."""
        with self.lock:
            if self.closed:
                return
            for p in range(self.npages):
                if self.mapped[p]:
                    self.pool._unmap(self, p)
                    self.mapped[p] = 0
                    self.counters.bytes_unmapped += self.page_size
            self.mapped_pages = 0
            self.pinned_pages = 0
            self.pins = [0] * self.npages
            for s in self.slots:
                s.pins, s.held = 0, False
            self.unmap_gen += 1
            self.closed = True
            self.pool._forget(self)
            self.pool.backend.release(self.base, self.size)

    def _check_open(self):
        if self.closed:
            raise ClosedError(f"VBAR '{self.name}' is closed")

    def _check_slot(self, slot):
        if self.closed:
            raise ClosedError(f"VBAR '{self.name}' is closed")
        if not isinstance(slot, Slot) or slot.vbar is not self:
            raise WrongVBAR(f"VBAR '{self.name}': {slot!r} is not a slot of this VBAR")

    def __repr__(self):
        return f"<VBAR '{self.name}' {self.size >> 20} MiB reserved, {self.mapped_pages} pages mapped>"

