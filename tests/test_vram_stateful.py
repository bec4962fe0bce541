"""Random sequences of allocator calls; every rule is checked after every step."""
import os

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vbar_loaders.vram import Pool
from vbar_loaders.vram.host_backend import HostBackend

PS = 16384
EXAMPLES = int(os.environ.get("VBAR_STATEFUL_EXAMPLES", "300"))


class AllocatorMachine(RuleBasedStateMachine):
    @initialize(budget_pages=st.integers(1, 8),
                layout=st.lists(st.lists(st.integers(1, 3 * PS), min_size=1, max_size=6),
                                min_size=1, max_size=3))
    def setup(self, budget_pages, layout):
        self.pool = Pool(HostBackend(), budget=budget_pages * PS)
        self.vbars = []           # live VBARs
        self.slots = []           # (vbar, slot)
        self.pinned = {}          # slot -> pin count we hold
        self.version = {}         # (vbar id, page) -> times we saw it unmapped
        self.last_sig = {}        # slot -> (our page versions, allocator signature)
        self.data = {}            # slot -> (signature, byte value) written while resident
        self.before = self._snapshot()
        for sizes in layout:   # start with models in place so most steps exercise faults
            self.create(sum(-(-n // PS) + 1 for n in sizes))
            for n in sizes:
                self.slots.append((self.vbars[0], self.vbars[0].alloc(n)))

    def teardown(self):
        if hasattr(self, "pool"):
            self.pool.close()
            assert self.pool.mapped_bytes == 0

    # --- helpers ---------------------------------------------------------------------------
    def _snapshot(self):
        return {id(v): [m for m, _ in v.residency()] + [False] * v.npages for v in self.vbars}

    def _observe(self):
        """Count the pages that went from mapped to unmapped since the last step."""
        after = self._snapshot()
        gone = []
        for v in self.vbars:
            b, a = self.before.get(id(v), []), after[id(v)]
            for p in range(min(len(b), len(a))):
                if b[p] and not a[p]:
                    self.version[(id(v), p)] = self.version.get((id(v), p), 0) + 1
                    gone.append((v, p))
        self.before = after
        return gone

    def _versions(self, v, s):
        return tuple(self.version.get((id(v), p), 0) for p in range(s.p0, s.p1 + 1))

    def _pinned_bytes(self):
        return sum(v.pinned_pages * v.page_size for v in self.vbars)

    # --- rules -----------------------------------------------------------------------------
    @precondition(lambda self: len(self.vbars) < 4)
    @rule(pages=st.integers(1, 12))
    def create(self, pages):
        v = self.pool.create_vbar(f"v{len(self.vbars)}", pages * PS, page_size=PS)
        self.vbars.insert(0, v)   # the newest VBAR gets the top priority
        self.before[id(v)] = [False] * (2 * v.npages)

    @precondition(lambda self: self.vbars)
    @rule(i=st.integers(0, 3), size=st.integers(1, 3 * PS))
    def alloc(self, i, size):
        v = self.vbars[i % len(self.vbars)]
        if v.top + size + 512 <= v.size:
            self.slots.append((v, v.alloc(size)))

    @precondition(lambda self: self.slots)
    @rule(i=st.integers(0, 100), value=st.integers(1, 255))
    def fault_and_write(self, i, value):
        v, s = self.slots[i % len(self.slots)]
        prio = self.vbars.index(v)
        watermark_before = v.watermark
        r = v.fault(s)
        gone = self._observe()
        if not r.ok:
            assert not gone or s.p1 < watermark_before, "a watermark fail evicted pages"
            return
        for gv, gp in gone:   # only lower priority VBARs, or own pages above the slot
            assert self.vbars.index(gv) > prio or (gv is v and gp > s.p1), (gv.name, gp)
        if s.p1 >= watermark_before:
            assert not gone, "a fault above the watermark evicted"
        assert all(v.mapped[p] for p in range(s.p0, s.p1 + 1))
        self.pinned[s] = self.pinned.get(s, 0) + 1
        versions = self._versions(v, s)
        if s in self.last_sig:
            old_versions, old_sig = self.last_sig[s]
            assert (r.signature != old_sig) == (versions != old_versions)
            assert r.changed == (r.signature != old_sig)
        self.last_sig[s] = (versions, r.signature)
        if s in self.data and self.data[s][0] == r.signature:
            got = v.tensor(s, torch.uint8, (s.nbytes,))
            assert bool((got == self.data[s][1]).all()), "resident data changed"
        v.tensor(s, torch.uint8, (s.nbytes,)).fill_(value)
        self.data[s] = (r.signature, value)

    @precondition(lambda self: self.slots)
    @rule(i=st.integers(0, 100), value=st.integers(1, 255))
    def fault_write_unpin(self, i, value):
        v, s = self.slots[i % len(self.slots)]
        held = self.pinned.get(s, 0)
        self.fault_and_write(i, value)
        if self.pinned.get(s, 0) > held:
            self.unpin(list(self.pinned).index(s))

    # Faults are what the rules are about: give them more of the steps.
    fault_write_unpin_again = fault_write_unpin

    @precondition(lambda self: self.pinned)
    @rule(i=st.integers(0, 100))
    def unpin(self, i):
        s = list(self.pinned)[i % len(self.pinned)]
        over = self.pool.mapped_bytes > self.pool.budget()
        s.vbar.unpin(s)
        gone = self._observe()
        assert not gone or over, "unpin evicted while within budget"
        self.pinned[s] -= 1
        if not self.pinned[s]:
            del self.pinned[s]

    @precondition(lambda self: self.vbars)
    @rule(i=st.integers(0, 3))
    def prioritize(self, i):
        v = self.vbars[i % len(self.vbars)]
        v.prioritize()
        self.vbars.remove(v)
        self.vbars.insert(0, v)
        assert v.watermark == v.npages

    @precondition(lambda self: self.vbars)
    @rule(i=st.integers(0, 3))
    def deprioritize(self, i):
        v = self.vbars[i % len(self.vbars)]
        v.deprioritize()
        self.vbars.remove(v)
        self.vbars.append(v)

    @precondition(lambda self: self.vbars)
    @rule(i=st.integers(0, 3), pages=st.integers(0, 6))
    def free_memory(self, i, pages):
        v = self.vbars[i % len(self.vbars)]
        freed = v.free_memory(pages * PS)
        gone = self._observe()
        assert freed == len(gone) * PS and all(g is v for g, _ in gone)

    @rule(pages=st.integers(0, 8))
    def make_room(self, pages):
        free_before = self.pool._free_bytes()
        freed = self.pool.make_room(pages * PS)
        gone = self._observe()
        assert freed == len(gone) * PS
        assert freed == 0 or free_before < pages * PS

    @rule(pages=st.integers(1, 8))
    def set_budget(self, pages):
        self.pool.set_budget(pages * PS)
        self._observe()

    @precondition(lambda self: len(self.vbars) > 1)
    @rule(i=st.integers(0, 3))
    def close(self, i):
        v = self.vbars.pop(i % len(self.vbars))
        reserved = self.pool.stats()["reserved_bytes"]
        v.close()
        assert self.pool.stats()["reserved_bytes"] == reserved - v.size
        self.slots = [(w, s) for w, s in self.slots if w is not v]
        self.pinned = {s: n for s, n in self.pinned.items() if s.vbar is not v}
        self.before.pop(id(v), None)

    # --- invariants ------------------------------------------------------------------------
    @invariant()
    def within_budget(self):
        if hasattr(self, "pool"):
            assert self.pool.mapped_bytes <= max(self.pool.budget(), self._pinned_bytes())
            assert self.pool.mapped_bytes == sum(v.mapped_pages * PS for v in self.vbars)

    @invariant()
    def pinned_pages_stay_mapped(self):
        for s, n in getattr(self, "pinned", {}).items():
            v = s.vbar
            assert all(v.mapped[p] and v.pins[p] >= n for p in range(s.p0, s.p1 + 1))

    @invariant()
    def priority_order_matches(self):
        if hasattr(self, "pool"):
            assert self.pool.vbars == self.vbars

    @invariant()
    def counters_add_up(self):
        for v in getattr(self, "vbars", []):
            c = v.counters
            assert c.hits + c.misses + c.offloaded == c.faults


AllocatorMachine.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=80, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestAllocator = AllocatorMachine.TestCase
