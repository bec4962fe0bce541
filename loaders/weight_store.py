"""Per-model weight residency: each weight's bytes get a VBAR slot and are faulted in at use.

A weight's *source* stays where the loader put it (a zero-copy view into the model file on the
host). ``use()`` faults the slot: an unchanged signature means the device copy is still valid and
nothing is copied; a changed one means copy the source in first; an offloaded fault streams the
source through a temporary. Quantized weights keep their packed bytes in the slot and ``decode``
them on the device at every use.
"""
import contextlib
import threading

import torch

SMALL_BYTES = 64 << 10   # below this a weight simply lives on the device: paging it costs more


class WeightHandle:
    __slots__ = ("key", "source", "decode", "shape", "slot", "sig", "content", "view", "small",
                 "nbytes", "uses", "streams", "store_dtype", "held")

    def __init__(self, key, source, decode, shape, store_dtype):
        self.key = key
        self.source = source          # host tensor: the stored bytes (packed for quantized)
        self.decode = decode          # None, or fn(stored_on_device, dtype) -> logical weight
        self.shape = tuple(shape)     # logical shape
        # What the device copy holds: the model's weight dtype, as ComfyUI would convert at load.
        self.store_dtype = store_dtype if decode is None and store_dtype is not None else source.dtype
        self.nbytes = source.numel() * torch.empty((), dtype=self.store_dtype).element_size()
        self.slot = None
        self.sig = None               # signature under which `view` holds valid contents
        self.content = None           # what the slot holds: None = the source, else patch key
        self.view = None
        self.small = {}               # device -> resident copy, for tiny tensors
        self.uses = 0
        self.streams = 0
        self.held = False             # pinned resident for the model's lifetime (block pinning)


class WeightStore:
    """The weights of one model in one VBAR, in the order they were added (= priority)."""

    def __init__(self, name, pool, page_size=None, small_bytes=SMALL_BYTES, copy_streams=False,
                 source_check=None):
        self.name = name
        # Called before any read of the sources (never on a hit): a file truncated or replaced
        # under its mapping must give a clear error, not SIGBUS on the next page touched.
        self.source_check = source_check
        self.prefetcher = None
        # On the host backend a streamed weight can be read in place from the file mapping; a
        # benchmark that simulates a GPU sets this to pay for the transfer a device would make.
        self.copy_streams = copy_streams
        self.pool = pool              # None: no device allocator, every use streams
        self.page_size = page_size
        self.small_bytes = small_bytes
        self.handles = []
        self.by_key = {}
        self.vbar = None
        self.lock = threading.Lock()
        self.device = pool.backend.device() if pool is not None else None

    def add(self, key, source, decode=None, shape=None, store_dtype=None, hold=False):
        if self.vbar is not None:
            raise RuntimeError(f"weight store '{self.name}' is built; add weights before build()")
        if not isinstance(source, torch.Tensor):
            raise TypeError(f"weight '{key}': source must be a tensor, got {type(source).__name__}")
        h = WeightHandle(key, source, decode, shape if shape is not None else source.shape, store_dtype)
        h.held = hold
        self.handles.append(h)
        self.by_key[key] = h
        return h

    def build(self):
        """Reserve the VBAR and give every large weight a slot: held weights first (highest
        priority, never evicted), then the rest in the order added.

        Raises vram.BudgetExceeded, naming the MB needed, if the held weights do not fit."""
        if self.vbar is not None:
            return self
        held = [h for h in self.handles if h.held]
        if self.pool is None:
            if held:
                raise RuntimeError(f"{self.name}: cannot keep blocks resident without a VBAR "
                                   f"allocator for this device (see the log for why)")
            return self
        big = [h for h in self.handles if h.nbytes > self.small_bytes or h.held]
        big = [h for h in big if h.held] + [h for h in big if not h.held]
        total = sum(h.nbytes + 512 for h in big)
        if not total:
            return self
        self.vbar = self.pool.create_vbar(self.name, total + (1 << 20), page_size=self.page_size)
        for h in big:
            h.slot = self.vbar.alloc(h.nbytes, name=h.key)
        need = sum(h.nbytes for h in held)
        try:
            for h in held:
                self.vbar.hold(h.slot)
        except Exception as e:
            self.close()
            from ..vram import BudgetExceeded

            raise BudgetExceeded(
                f"{self.name}: the pinned blocks need {need / 2**20:.0f} MiB resident but the VRAM "
                f"budget is {self.pool.budget() / 2**20:.0f} MiB ({e}). Pin fewer blocks or raise "
                f"the budget") from e
        return self

    def held_bytes(self):
        return sum(h.nbytes for h in self.handles if h.held)

    # --- the hot path ---------------------------------------------------------------------
    @contextlib.contextmanager
    def use(self, h, device, dtype, patches=None, patch_key=None):
        """Yield the weight on ``device`` in ``dtype``, valid until the block exits.

        ``patches``: functions applied to a private copy (LoRA and other ComfyUI patches). For a
        resident, unquantized weight whose dtype matches, the patched result is kept in the slot
        under ``patch_key`` and reused until the key or the signature changes.
        """
        h.uses += 1
        device = torch.device(device)
        ready = self.prefetcher.arrive(h) if self.prefetcher is not None else None
        slot = h.slot
        vbar = self.vbar
        if ready is not None and ready.fault is not None:
            r = ready.fault          # pinned by the prefetch: this use owns that pin now
        elif slot is None or device != self.device or vbar.closed:
            yield self._stream(h, device, dtype, patches, temp=ready and ready.temp)
            return
        else:
            r = vbar.fault(slot)
            if not r.ok:
                h.streams += 1
                yield self._stream(h, device, dtype, patches, count=False, temp=ready and ready.temp)
                return
        try:
            view = self.view_of(h)
            cacheable = patches and h.decode is None and dtype == h.store_dtype and patch_key is not None
            want = patch_key if cacheable else None
            if h.sig != r.signature or h.content != want:
                h.sig = None
                if self.source_check is not None:
                    self.source_check(h.key)
                view.copy_(h.source, non_blocking=True)
                h.content = None
                if cacheable:
                    patched = _apply(patches, view.to(dtype, copy=True))
                    view.copy_(patched)
                    h.content = want
                h.sig = r.signature
            w = h.decode(view, dtype) if h.decode is not None else view.to(dtype)
            if patches and not cacheable:
                w = _apply(patches, w if w.data_ptr() != view.data_ptr() else w.clone())
            yield w
        finally:
            vbar.unpin(slot)

    def view_of(self, h):
        """The slot as a tensor, made once. Never an inference tensor: ComfyUI samples under
        inference mode, but copies into the slot also happen outside it (prefetch thread, other
        callers), and an inference tensor may only be written inside inference mode."""
        if h.view is None:
            with torch.inference_mode(False):
                h.view = self.vbar.tensor(h.slot, h.store_dtype, h.source.shape)
        return h.view

    def _stream(self, h, device, dtype, patches, count=True, temp=None):
        if count and h.slot is not None:
            h.streams += 1
        if temp is not None:           # transferred ahead of time by the prefetcher
            w = h.decode(temp, dtype) if h.decode is not None else temp.to(h.store_dtype).to(dtype)
            if patches:
                w = _apply(patches, w if w.data_ptr() != temp.data_ptr() else w.clone())
            return w
        small = h.slot is None and h.nbytes <= self.small_bytes and not patches
        if small:
            w = h.small.get((device, dtype))
            if w is not None:          # the hot path for biases and norms: no source read
                return w
        if self.source_check is not None:
            self.source_check(h.key)
        if small:
            w = self._materialize(h, device, dtype, copy=False)
            if w.data_ptr() == h.source.data_ptr():
                w = w.clone()          # never keep a view of the file: it may change under us
            h.small[(device, dtype)] = w
            return w
        w = self._materialize(h, device, dtype, copy=bool(patches), transfer=self.copy_streams)
        return _apply(patches, w) if patches else w

    @staticmethod
    def _materialize(h, device, dtype, copy, transfer=False):
        src = h.source.to(device, non_blocking=True, copy=transfer)
        if h.decode is not None:
            return h.decode(src, dtype)
        src = src.to(h.store_dtype)   # round through the stored dtype, exactly as a resident copy
        if copy and src.data_ptr() == h.source.data_ptr() and src.dtype == dtype:
            return src.clone()   # patches write in place: never into the file's mapping
        return src.to(dtype)

    # --- management -----------------------------------------------------------------------
    def enable_prefetch(self, depth=1):
        """Prepare the next ``depth`` weights while the current layer computes (0 = off)."""
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None
        if depth > 0 and self.pool is not None:
            from .prefetch import Prefetcher

            self.prefetcher = Prefetcher(self, depth)
        return self

    def drop_prefetched(self):
        if self.prefetcher is not None:
            self.prefetcher.drop()

    def prefetch_stats(self):
        p = self.prefetcher
        return {"prefetch_hits": p.hits if p else 0, "prefetch_wasted": p.wasted if p else 0}

    def resident_bytes(self):
        return 0 if self.vbar is None or self.vbar.closed else self.vbar.stats()["resident_bytes"]

    def close(self):
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None
        if self.vbar is not None:
            self.vbar.close()
        for h in self.handles:
            h.view = None
            h.sig = None
            h.small.clear()


def _apply(patches, w):
    for f in patches:
        w = f(w)
    return w
