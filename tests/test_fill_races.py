"""One owner at a time fills a weight's slot, whichever thread asks: the interleavings forced.

The prefetch worker and the thread running the model both fill slots. These tests stop the
worker in the middle of a fill (the source check that precedes every copy blocks on an Event)
and make the model thread act on the same weight meanwhile: the prepared weight is discarded
(the graph went elsewhere) and then used at once, plain or with a cached LoRA patch. The slot
must be filled once at a time, never overwritten while a use holds it as valid, and every
counter update must happen under the pool lock. No sleeps: the worker waits for an Event the
model thread sets only if it wrongly starts a fill of its own; where the code is right, the
model thread waits for the worker instead and the worker's wait runs out (WAIT seconds).
"""
import threading

import pytest
import torch

from vbar_loaders.loaders.runtime.weight_store import WeightStore
from vbar_loaders.vram import Pool
from vbar_loaders.vram.host_backend import HostBackend
from vbar_loaders.vram.stats import Counters

PAGE = 64 << 10
WAIT = 2.0          # how long the stopped worker waits for a fill that must not happen


class Gate:
    """A source check that stops the prefetch worker inside its fill of ``key`` once armed."""

    def __init__(self, key):
        self.key = key
        self.armed = False
        self.worker_inside = threading.Event()
        self.let_go = threading.Event()
        self.blocked = False          # the worker is stopped inside its fill right now
        self.reads = []               # (thread kind, key), one per fill of a slot or stream
        self.overlaps = 0             # fills of `key` by the model thread while the worker's ran

    def __call__(self, key):
        worker = threading.current_thread().name.startswith("vbar-prefetch")
        self.reads.append(("worker" if worker else "model", key))
        if not self.armed or key != self.key:
            return
        if worker:
            self.blocked = True
            self.worker_inside.set()
            self.let_go.wait(WAIT)
            self.blocked = False
        elif self.blocked:
            self.overlaps += 1

    def fills(self, key):
        return [who for who, k in self.reads if k == key]


def scenario():
    torch.manual_seed(0)
    gate = Gate("x")
    pool = Pool(HostBackend(), budget=64 * PAGE)
    store = WeightStore("m", pool, page_size=PAGE, source_check=gate)
    h = {k: store.add(k, torch.randn(128, 256)) for k in ("a", "x", "b")}   # 2 pages each
    store.build()
    store.enable_prefetch(depth=1)
    cpu = torch.device("cpu")
    for k in ("a", "x", "b"):                 # learn the order: x follows a
        with store.use(h[k], cpu, torch.float32):
            pass
    store.drop_prefetched()
    store.free_memory()                       # x must be copied in again by whoever fills it
    return gate, pool, store, h, cpu


@pytest.mark.parametrize("patched", [False, True], ids=["plain", "lora-cached"])
def test_discarded_prefetch_then_immediate_use_fills_once_at_a_time(patched):
    gate, pool, store, h, cpu = scenario()
    x = h["x"]
    patches = [lambda w: w + 1.0] if patched else None
    key = "lora-1" if patched else None
    want = x.source + 1.0 if patched else x.source
    gate.reads.clear()
    gate.armed = True
    with store.use(h["a"], cpu, torch.float32):   # schedules x: the worker stops inside its fill
        assert gate.worker_inside.wait(10), "the worker never started preparing x"
    item = store.prefetcher.pending[x]
    with store.use(h["b"], cpu, torch.float32):   # the graph went elsewhere: x is discarded
        pass
    with store.use(x, cpu, torch.float32, patches, key) as w:   # ... and used right away
        assert torch.equal(w, want)
    with store.use(x, cpu, torch.float32, patches, key) as w:   # a hit: the slot is valid as is
        gate.let_go.set()                     # whatever the worker still had to do, it does now
        assert item.done.wait(10)
        assert torch.equal(w, want), "the slot was overwritten while a use held it as valid"
    assert gate.overlaps == 0, "two threads filled x's slot at once"
    # One fill by the worker; the model thread fills again only to apply the patch over it.
    assert gate.fills("x") == ["worker"] + (["model"] if patched else [])
    with store.use(x, cpu, torch.float32, patches, key) as w:
        assert torch.equal(w, want)
    store.close()
    assert pool.stats()["pinned_bytes"] == 0
    pool.close()


class _LockedCounters(Counters):
    """Counters that note every update made without the pool lock held by the updating thread."""

    __slots__ = ("_lock", "unlocked")

    def __setattr__(self, name, value):
        lock = getattr(self, "_lock", None)
        if lock is not None and name in Counters.__slots__ and not lock._is_owned():
            self.unlocked.append(name)
        object.__setattr__(self, name, value)


def test_every_counter_update_holds_the_pool_lock():
    gate, pool, store, h, cpu = scenario()
    c = _LockedCounters()
    c.unlocked = []
    for name, value in store.vbar.counters.as_dict().items():
        setattr(c, name, value)
    c._lock = pool.lock
    store.vbar.counters = c
    for _ in range(5):
        for k in ("a", "x", "b", "x"):        # out of order too: prefetches hit and are wasted
            with store.use(h[k], cpu, torch.float32):
                pass
    st = store.vbar.stats()
    assert st["prefetch_hits"] > 0 and st["prefetch_wasted"] > 0
    assert c.unlocked == []
    store.close()
    pool.close()
