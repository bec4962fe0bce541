"""Pins belong to whoever took them, checked against an independent model of the README rules.

Random sequences of faults, unpins, holds, releases and priority changes over VBARs whose slots
share pages, mixed with calls that do not match a pin the caller owns (unpin without a fault of
that slot, unpin of a held slot, release of a slot not held, a second hold, any call with another
VBAR's slot, a view of a slot not pinned by itself). The model is written from the README's
allocator section, not from the code: which pages are mapped, which fault succeeds, which pages
it evicts (lower-priority VBARs first, then its own pages above the slot, each top address down;
never a pinned page; nothing above the watermark once the budget is full), and which slots are
held. Every wrong call must raise a BadCall and leave every observable of the allocator as it
was. Runs on the host backend and the CUDA backend over the fake driver.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vbar_loaders.vram import (AlreadyHeld, BadCall, BudgetExceeded, NotHeld, NotPinned, Pool,
                               WrongVBAR)
from vram_backends import make_backend, page_size_for

EXAMPLES = int(os.environ.get("VBAR_STATEFUL_EXAMPLES", "150"))


class ModelVBAR:
    """What the README says a VBAR is: pages mapped or not, a watermark, slots with pins."""

    def __init__(self, name, npages):
        self.name, self.npages = name, npages
        self.mapped = set()
        self.version = {}          # page -> times it was mapped (a new mapping = new contents)
        self.watermark = npages
        self.fault_pins = {}       # slot -> faults not yet unpinned
        self.held = set()

    def page_pins(self, p, slots):
        return sum(self.fault_pins.get(s, 0) + (s in self.held) for s in slots
                   if s.p0 <= p <= s.p1)


class PinMachine(RuleBasedStateMachine):
    backend_kind = "host"

    @initialize(budget_pages=st.integers(1, 6),
                layout=st.lists(st.lists(st.sampled_from([1, 2, 3, 4, 6, 9]), min_size=2, max_size=7),
                                min_size=2, max_size=3))
    def setup(self, budget_pages, layout):
        backend = make_backend(self.backend_kind)
        self.ps = ps = page_size_for(backend)
        self.budget_pages = budget_pages
        self.pool = Pool(backend, budget=budget_pages * ps)
        self.vbars = []            # real VBARs, highest priority first (the model's order)
        self.model = {}            # VBAR -> ModelVBAR
        self.slots = []
        self.last_seen = {}        # slot -> (page versions, signature) at its last good fault
        for i, thirds in enumerate(layout):
            # Slot sizes in thirds of a page: several slots share a page, some span pages.
            sizes = [t * ps // 3 - 512 for t in thirds]
            v = self.pool.create_vbar(f"v{i}", sum(sizes) + 512 * len(sizes) + ps, page_size=ps)
            self.vbars.insert(0, v)
            self.model[v] = ModelVBAR(v.name, v.npages)
            for n in sizes:
                self.slots.append(v.alloc(n, name=f"v{i}.{len(v.slots)}"))

    def teardown(self):
        if hasattr(self, "pool"):
            self.pool.close()

    # --- the model ---------------------------------------------------------------------------
    def m(self, s):
        return self.model[s.vbar]

    def _pinned(self, v, p):
        return self.model[v].page_pins(p, v.slots) > 0

    def _model_fault(self, s):
        """(ok, pages evicted) by the README's rules; applies them to the model."""
        v, mv = s.vbar, self.m(s)
        missing = [p for p in range(s.p0, s.p1 + 1) if p not in mv.mapped]
        if missing:
            free = self.budget_pages - sum(len(x.mapped) for x in self.model.values())
            if len(missing) > free:
                if s.p1 >= mv.watermark:
                    return False, []          # above the watermark: never evicts
                short = len(missing) - free
                lower = list(reversed(self.vbars[self.vbars.index(v) + 1:]))
                cands = [(w, p) for w in lower for p in sorted(self.model[w].mapped, reverse=True)
                         if not self._pinned(w, p)]
                cands += [(v, p) for p in sorted(mv.mapped, reverse=True)
                          if p > s.p1 and not self._pinned(v, p)]
                if len(cands) < short:
                    return False, []          # cannot be had: nothing evicted, nothing mapped
                for w, p in cands[:short]:
                    self.model[w].mapped.discard(p)
                    self.model[w].watermark = min(self.model[w].watermark, p)
                evicted = cands[:short]
            else:
                evicted = []
            for p in missing:
                mv.mapped.add(p)
                mv.version[p] = mv.version.get(p, 0) + 1
        else:
            evicted = []
        mv.fault_pins[s] = mv.fault_pins.get(s, 0) + 1
        return True, evicted

    def _state(self):
        """Everything a wrong call could disturb."""
        out = [self.pool.mapped_bytes, [v.name for v in self.pool.vbars]]
        for v in self.vbars:
            out.append((bytes(v.mapped), list(v.pins), list(v.serial), v.watermark, v.unmap_gen,
                        v.pinned_pages, v.counters.as_dict(), v.slot_states(), v.stats()))
            out.append([(s.held, s.faults, s.offloads, s.signature, s.gen) for s in v.slots])
        return out

    def _wrong(self, call, error):
        before = self._state()
        with pytest.raises(error):
            call()
        assert self._state() == before, "a call that raised changed the allocator"

    # --- rules -------------------------------------------------------------------------------
    @rule(i=st.integers(0, 100))
    def fault(self, i):
        s = self.slots[i % len(self.slots)]
        v = s.vbar
        was_mapped = {w: set(self.model[w].mapped) for w in self.vbars}
        want_ok, evicted = self._model_fault(s)
        r = v.fault(s)
        assert r.ok == want_ok, (s, r)
        for w in self.vbars:
            got = {p for p in range(w.npages) if w.mapped[p]}
            assert got == self.model[w].mapped, (w.name, got, self.model[w].mapped, evicted)
            assert w.watermark == self.model[w].watermark
            for p in was_mapped[w] - got:      # never a pinned page, never a higher priority one
                assert not self._pinned(w, p)
                assert self.vbars.index(w) > self.vbars.index(v) or (w is v and p > s.p1)
        if r.ok:
            versions = tuple(self.m(s).version[p] for p in range(s.p0, s.p1 + 1))
            if s in self.last_seen:
                old_versions, old_sig = self.last_seen[s]
                assert (r.signature != old_sig) == (versions != old_versions)
            self.last_seen[s] = (versions, r.signature)
            assert v.tensor(s, torch.uint8, (s.nbytes,)).numel() == s.nbytes

    fault_again = fault   # faults drive everything else: give them more of the steps

    @precondition(lambda self: any(mv.fault_pins for mv in self.model.values()))
    @rule(i=st.integers(0, 100))
    def unpin(self, i):
        pinned = [s for s in self.slots if self.m(s).fault_pins.get(s)]
        s = pinned[i % len(pinned)]
        s.vbar.unpin(s)
        mv = self.m(s)
        mv.fault_pins[s] -= 1
        if not mv.fault_pins[s]:
            del mv.fault_pins[s]

    @rule(i=st.integers(0, 100))
    def hold(self, i):
        s = self.slots[i % len(self.slots)]
        mv = self.m(s)
        if s in mv.held:
            self._wrong(lambda: s.vbar.hold(s), AlreadyHeld)
            return
        ok, _ = self._model_fault(s)
        if ok:
            mv.fault_pins[s] -= 1             # the fault's pin becomes the hold's
            if not mv.fault_pins[s]:
                del mv.fault_pins[s]
            mv.held.add(s)
            s.vbar.hold(s)
        else:
            with pytest.raises(BudgetExceeded):
                s.vbar.hold(s)

    @precondition(lambda self: any(mv.held for mv in self.model.values()))
    @rule(i=st.integers(0, 100))
    def release(self, i):
        held = [s for s in self.slots if s in self.m(s).held]
        s = held[i % len(held)]
        s.vbar.release(s)
        self.m(s).held.discard(s)

    @rule(i=st.integers(0, 100))
    def prioritize(self, i):
        v = self.vbars[i % len(self.vbars)]
        v.prioritize()
        self.vbars.remove(v)
        self.vbars.insert(0, v)
        self.model[v].watermark = v.npages

    @rule(i=st.integers(0, 100), pages=st.integers(0, 4))
    def free_memory(self, i, pages):
        v = self.vbars[i % len(self.vbars)]
        mv = self.model[v]
        gone = [p for p in sorted(mv.mapped, reverse=True) if not self._pinned(v, p)][:pages]
        for p in gone:
            mv.mapped.discard(p)
            mv.watermark = min(mv.watermark, p)
        assert v.free_memory(pages * self.ps) == len(gone) * self.ps

    # --- calls that do not match a pin the caller owns ------------------------------------------
    @rule(i=st.integers(0, 100))
    def unpin_without_own_fault(self, i):
        s = self.slots[i % len(self.slots)]
        if not self.m(s).fault_pins.get(s):   # held, or a neighbour on its page pinned: not ours
            self._wrong(lambda: s.vbar.unpin(s), NotPinned)
            if s not in self.m(s).held:       # a view needs a pin of the slot's own
                self._wrong(lambda: s.vbar.tensor(s, torch.uint8, (1,)), NotPinned)

    @rule(i=st.integers(0, 100))
    def release_not_held(self, i):
        s = self.slots[i % len(self.slots)]
        if s not in self.m(s).held:
            self._wrong(lambda: s.vbar.release(s), NotHeld)

    @rule(i=st.integers(0, 100), j=st.integers(0, 100),
          op=st.sampled_from(["fault", "unpin", "hold", "release", "tensor"]))
    def call_with_another_vbars_slot(self, i, j, op):
        s = self.slots[i % len(self.slots)]
        others = [v for v in self.vbars if v is not s.vbar]
        v = others[j % len(others)]
        call = {"tensor": lambda: v.tensor(s, torch.uint8, (1,))}.get(op, lambda: getattr(v, op)(s))
        self._wrong(call, WrongVBAR)

    # --- invariants --------------------------------------------------------------------------
    @invariant()
    def pins_are_owned(self):
        for v in getattr(self, "vbars", []):
            mv = self.model[v]
            for s in v.slots:
                assert s.held == (s in mv.held), s
            for p in range(v.npages):
                assert v.pins[p] == mv.page_pins(p, v.slots), (v.name, p)
                if v.pins[p]:
                    assert v.mapped[p], "a pinned page is not mapped"
            assert v.pinned_pages == sum(1 for p in range(v.npages) if v.pins[p])

    @invariant()
    def pages_match(self):
        for v in getattr(self, "vbars", []):
            assert {p for p in range(v.npages) if v.mapped[p]} == self.model[v].mapped, v.name
            assert v.watermark == self.model[v].watermark, v.name

    @invariant()
    def slot_states_match(self):
        for v in getattr(self, "vbars", []):
            mv = self.model[v]
            want = ["held" if s in mv.held else
                    "resident" if all(p in mv.mapped for p in range(s.p0, s.p1 + 1)) else "streamed"
                    for s in v.slots]
            assert [st for _, _, st in v.slot_states()] == want

    @invariant()
    def within_budget(self):
        if hasattr(self, "pool"):
            assert self.pool.mapped_bytes == sum(len(m.mapped) for m in self.model.values()) * self.ps
            assert self.pool.mapped_bytes <= self.budget_pages * self.ps


class FakeCudaPinMachine(PinMachine):
    backend_kind = "fake-cuda"


_settings = settings(max_examples=EXAMPLES, stateful_step_count=60, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
PinMachine.TestCase.settings = _settings
FakeCudaPinMachine.TestCase.settings = _settings
TestPinsHost = PinMachine.TestCase
TestPinsFakeCuda = FakeCudaPinMachine.TestCase


# --- the three misuses the issue reported, as plain examples ----------------------------------------
@pytest.fixture(params=["host", "fake-cuda", "cuda"])   # cuda: skipped without a device
def two(request):
    backend = make_backend(request.param)
    ps = page_size_for(backend)
    pool = Pool(backend, budget=2 * ps)
    low = pool.create_vbar("low", 4 * ps, page_size=ps)
    high = pool.create_vbar("high", 4 * ps, page_size=ps)
    yield pool, ps, low, high
    pool.close()


def test_release_of_another_vbars_slot_keeps_the_hold(two):
    pool, ps, low, high = two
    a = low.alloc(ps // 2, "a")
    low.hold(a)
    with pytest.raises(WrongVBAR):
        high.release(a)
    assert a.held and low.pins[a.p0] == 1
    low.release(a)
    assert low.pins[a.p0] == 0 and pool.stats()["pinned_bytes"] == 0


def test_unpin_cannot_drop_a_hold(two):
    pool, ps, low, high = two
    h = low.alloc(ps // 2, "h")
    low.hold(h)
    with pytest.raises(NotPinned, match="release"):
        low.unpin(h)
    x = high.alloc(2 * ps, "x")                  # needs the whole budget: must not take the hold
    assert not high.fault(x).ok
    assert low.mapped[h.p0] and [st for _, _, st in low.slot_states()] == ["held"]


def test_a_neighbours_pin_on_a_shared_page_is_not_yours(two):
    pool, ps, low, high = two
    a, b = low.alloc(ps // 4, "a"), low.alloc(ps // 4, "b")
    assert a.p0 == b.p0
    low.fault(a)
    with pytest.raises(NotPinned):
        low.unpin(b)
    with pytest.raises(NotPinned):
        low.tensor(b, torch.uint8, (1,))
    assert low.pins[a.p0] == 1
    x = high.alloc(2 * ps, "x")
    assert not high.fault(x).ok                  # a's page is still pinned
    low.unpin(a)
    assert high.fault(x).ok


def test_one_hold_one_release(two):
    pool, ps, low, high = two
    a = low.alloc(ps // 2, "a")
    low.hold(a)
    with pytest.raises(AlreadyHeld):
        low.hold(a)
    low.release(a)
    with pytest.raises(NotHeld):
        low.release(a)
    assert low.pins[a.p0] == 0
    assert issubclass(NotHeld, BadCall) and issubclass(WrongVBAR, BadCall)
