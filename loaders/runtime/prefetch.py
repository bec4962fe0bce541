"""Prepare the next layers' weights while the current layer computes.

The order is learned, not assumed: every ``use`` records which weight followed which, and the
weights that followed the current one last time are prepared on a worker thread: faulted and
copied into their slot (resident ones), or copied into a temporary (streamed ones, only where a
transfer is real: CUDA, or a host store told to simulate one). A prepared weight keeps its pages
pinned until it is used; one that is not used next is released and counted as wasted, so graphs
that call layers out of order stay correct. A slot is filled through the store's ``fill``, the
same path and lock as the model thread's own fills. torch releases the GIL in copies and
matmuls, so the worker overlaps with compute. On CUDA the copies run on a side stream from pinned staging
buffers, ordered with events: no host synchronisation on the hot path.
"""
import queue
import threading

import torch

from .weight_store import ANY


class Prepared:
    __slots__ = ("h", "fault", "temp", "event", "done", "error")

    def __init__(self, h):
        self.h = h
        self.fault = None       # pinned Fault: slot contents valid under fault.signature
        self.temp = None        # a device copy of the source, for a weight that streams
        self.event = None       # CUDA: the copy into ``temp`` (a slot's fill event is the handle's)
        self.done = threading.Event()
        self.error = None


class Prefetcher:
    def __init__(self, store, depth=1):
        self.store = store
        self.depth = depth
        self.next_of = {}
        self.last = None
        self.pending = {}       # handle -> Prepared, scheduled and not yet consumed
        self.hits = 0
        self.wasted = 0
        self.cuda = store.device is not None and store.device.type == "cuda"
        self.side = torch.cuda.Stream(store.device) if self.cuda else None
        self._staging = {}
        self._spare = {}        # host only: (shape, dtype) -> temporaries free for reuse
        self.q = queue.SimpleQueue()
        self.closed = False
        self.worker = threading.Thread(target=self._run, name=f"vbar-prefetch-{store.name}",
                                       daemon=True)
        self.worker.start()

    # --- consumer side (the thread running the model) --------------------------------------
    def arrive(self, h):
        """Called as ``h`` is about to be used: schedule what follows it, hand over ``h``'s
        prepared item (waited for) or None."""
        if self.last is not None and self.last is not h:
            self.next_of[self.last] = h
        self.last = h
        item = self.pending.pop(h, None)
        upcoming = []
        n = h
        for _ in range(self.depth):
            n = self.next_of.get(n)
            if n is None or n is h or n in upcoming:
                break
            upcoming.append(n)
        for other in [o for o in self.pending if o not in upcoming]:
            self.wasted += 1
            self._count("prefetch_wasted")
            self.q.put(("release", self.pending.pop(other)))
        for n in upcoming:
            if n not in self.pending and self._worth_it(n):
                p = self.pending[n] = Prepared(n)
                self.q.put(("prepare", p))
        if item is None:
            return None
        item.done.wait()
        if item.error is not None:
            self._release(item)
            raise item.error
        if item.event is not None:
            stream = torch.cuda.current_stream(self.store.device)
            stream.wait_event(item.event)
            if item.temp is not None:
                # Allocated on the side stream, read on this one: the caching allocator must not
                # hand the block to the side stream again before this stream is done with it.
                item.temp.record_stream(stream)
        self.hits += 1
        self._count("prefetch_hits")
        return item

    def _count(self, name):
        vbar = self.store.vbar
        if vbar is not None and not vbar.closed:
            vbar.count(name)

    def _worth_it(self, h):
        if h.slot is not None:
            return True
        return (self.cuda or self.store.copy_streams) and h.nbytes > self.store.small_bytes

    def recycle(self, item):
        """The consumer is done with ``item.temp`` (host only: on CUDA the caching allocator
        reuses it, ordered by ``record_stream``). Keeping a few spares spares the worker a fresh
        allocation per stream, whose page faults compete with the compute."""
        temp, item.temp = item.temp, None
        if temp is None or self.cuda:
            return
        spares = self._spare.setdefault((temp.shape, temp.dtype), [])
        if len(spares) <= self.depth:
            spares.append(temp)

    def drop(self):
        """Release everything prepared and not yet used (its pages become evictable again)."""
        for p in list(self.pending.values()):
            p.done.wait()
            self._release(p)
        self.pending.clear()
        self.last = None
        self._spare.clear()

    def close(self):
        if self.closed:
            return
        self.closed = True
        for p in self.pending.values():
            self.q.put(("release", p))
        self.pending.clear()
        self.q.put(("stop", None))
        self.worker.join()

    # --- worker side -----------------------------------------------------------------------
    def _run(self):
        if self.cuda:
            torch.cuda.set_device(self.store.device)
        self._loop()

    def _loop(self):
        while True:
            op, p = self.q.get()
            if op == "stop":
                return
            if op == "release":
                p.done.wait()
                self._release(p)
                continue
            try:
                self._prepare(p)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
                p.error = e
            finally:
                p.done.set()

    def _prepare(self, p):
        store, h = self.store, p.h
        vbar = store.vbar
        if h.slot is not None and vbar is not None and not vbar.closed:
            r = vbar.fault(h.slot)
            if r.ok:
                p.fault = r       # pinned: the consumer's use takes over the pin, or _release drops it
                store.fill(h, r.signature, ANY, copy=self._copy)
                return
        if store.source_check is not None:
            store.source_check(h.key)
        if self.cuda or store.copy_streams:
            temp = self._temp(h.source)
            p.event = self._copy(temp, h.source)
            p.temp = temp

    def _temp(self, src):
        if self.cuda:
            with torch.cuda.stream(self.side):   # the stream that writes it (see arrive)
                return torch.empty(src.shape, dtype=src.dtype, device=self.store.device)
        spares = self._spare.get((src.shape, src.dtype))
        try:
            return spares.pop()
        except (AttributeError, IndexError):
            return torch.empty(src.shape, dtype=src.dtype, device=self.store.device)

    def _copy(self, dst, src):
        """Copy ``src`` into ``dst``; on CUDA asynchronously, returning the event it ends at."""
        if not self.cuda:
            dst.copy_(src)
            return None
        n = src.numel() * src.element_size()
        buf = self._stage(src, n)
        with torch.cuda.stream(self.side):
            dst.copy_(buf.view(src.dtype).view(src.shape), non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.side)
        self._staging[n] = (buf, event)
        return event

    def _stage(self, src, n):
        """A pinned host buffer (uint8, ``n`` bytes) holding ``src``: only pinned memory copies
        asynchronously. One buffer per size, reused once its last transfer has finished."""
        buf, ev = self._staging.pop(n, (None, None))
        if ev is not None:
            ev.synchronize()
        if buf is None:
            buf = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        buf.copy_(src.reshape(-1).view(torch.uint8))
        return buf

    def _release(self, p):
        if p.fault is not None and self.store.vbar is not None and not self.store.vbar.closed:
            self.store.vbar.unpin(p.h.slot)
        p.fault = None
        p.temp = None
