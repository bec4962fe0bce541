"""Per-model weight residency: each weight's bytes get a VBAR slot and are faulted in at use.

A weight's *source* stays where the loader put it (a zero-copy view into the model file on the
host). ``use()`` faults the slot: an unchanged signature means the device copy is still valid and
nothing is copied; a changed one means copy the source in first; an offloaded fault streams the
source through a temporary. Quantized weights keep their packed bytes in the slot and ``decode``
them on the device at every use; with patches (LoRA), their patched result is kept in a
companion "patched" VBAR while the budget has room for it (see ``_use_patched``).

A slot is filled by ``fill`` only, from the thread running the model or the prefetch worker,
one at a time per weight (the handle's lock): a filler marks the slot invalid, copies, and
marks it valid under the signature it holds pinned. A use whose signature and contents match
reads without the lock: while its pages stay pinned the signature cannot change, and a
prefetch fills only a slot whose signature differs, so nothing writes under a valid use.
"""
import contextlib
import math
import threading

import torch

SMALL_BYTES = 64 << 10   # below this a weight simply lives on the device: paging it costs more
ANY = object()           # fill(): any contents valid under the signature will do (prefetch)


class WeightHandle:
    __slots__ = ("key", "source", "decode", "shape", "slot", "sig", "content", "view", "small",
                 "nbytes", "uses", "streams", "store_dtype", "held", "patched", "lock", "event")

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
        self.patched = {}             # dtype -> _Patched, or None where it cannot be had
        self.lock = threading.Lock()  # held by whoever fills the slot (WeightStore.fill)
        self.event = None             # CUDA: the side-stream copy that last filled the slot


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
        self.patch_vbar = None        # patched results of quantized weights, made on first need
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
        try:
            for h in held:
                self.vbar.hold(h.slot)
        except Exception as e:
            self.close()
            raise self.pins_do_not_fit(e) from e
        return self

    def held_bytes(self):
        return sum(h.nbytes for h in self.handles if h.held)

    def pins_do_not_fit(self, error):
        """The vram.BudgetExceeded to raise when the held weights cannot all be resident (at
        build, or when runtime/blocks.py restores the pins), naming the MiB."""
        from ...vram import BudgetExceeded

        return BudgetExceeded(
            f"{self.name}: the pinned blocks need {self.held_bytes() / 2**20:.0f} MiB resident but "
            f"the VRAM budget is {self.pool.budget() / 2**20:.0f} MiB ({error}). Pin fewer blocks "
            f"or raise the budget")

    # --- the hot path ---------------------------------------------------------------------
    def use(self, h, device, dtype, patches=None, patch_key=None):
        """A context manager giving the weight on ``device`` in ``dtype``, valid until it exits.

        ``patches``: functions applied to a private copy (LoRA and other ComfyUI patches). For a
        resident, unquantized weight whose dtype matches, the patched result is kept in the slot
        under ``patch_key`` and reused until the key or the signature changes; a quantized
        weight's patched result is kept in the patch VBAR the same way (``_use_patched``).
        """
        h.uses += 1
        device = torch.device(device)
        ready = self.prefetcher.arrive(h) if self.prefetcher is not None else None
        if (patches and h.decode is not None and patch_key is not None and h.slot is not None
                and device == self.device):
            return self._use_patched(h, device, dtype, patches, patch_key, ready)
        return self._use(h, device, dtype, patches, patch_key, ready)

    @contextlib.contextmanager
    def _use(self, h, device, dtype, patches, patch_key, ready):
        slot = h.slot
        vbar = self.vbar
        if ready is not None and ready.fault is not None:
            r = ready.fault          # pinned by the prefetch: this use owns that pin now
        elif slot is None or device != self.device or vbar.closed:
            yield self._stream(h, device, dtype, patches, temp=ready and ready.temp)
            self._recycle(ready)
            return
        else:
            r = vbar.fault(slot)
            if not r.ok:
                h.streams += 1
                yield self._stream(h, device, dtype, patches, count=False, temp=ready and ready.temp)
                self._recycle(ready)
                return
        try:
            cacheable = patches and h.decode is None and dtype == h.store_dtype and patch_key is not None
            want = patch_key if cacheable else None
            if h.sig != r.signature or h.content != want:
                self.fill(h, r.signature, want, patches, dtype)
            if h.event is not None:
                self._await_fill(h)
            view = h.view
            if h.decode is not None:
                w = _decoded(h, view, dtype, patches)
            else:
                w = view.to(dtype)
                if patches and not cacheable:
                    w = _apply(patches, w if w.data_ptr() != view.data_ptr() else w.clone())
            yield w
        finally:
            vbar.unpin(slot)

    @contextlib.contextmanager
    def _use_patched(self, h, device, dtype, patches, patch_key, ready):
        """A quantized weight with patches: dequantizing and re-applying a LoRA at every use is
        the cost that caching saves, but the patched result is full precision (2-8x the
        quantized bytes), so it lives in a companion VBAR *below* the model's own: it uses
        budget the quantized bytes leave free, is evicted first when they need room, and never
        evicts them. Where it cannot be had, the patches are applied per use as before."""
        c = self._patched_slot(h, dtype)
        r = c.vbar.fault(c.slot) if c is not None else None
        if r is None or not r.ok:
            with self._use(h, device, dtype, patches, patch_key, ready) as w:
                yield w
            return
        try:
            if c.view is None:
                with torch.inference_mode(False):   # see view_of
                    c.view = c.vbar.tensor(c.slot, dtype, h.shape)
            if c.valid != (r.signature, patch_key):
                c.valid = None
                with self._use(h, device, dtype, patches, patch_key, ready) as w:
                    c.view.copy_(w)
                c.valid = (r.signature, patch_key)
            elif ready is not None:       # prefetched, and not needed after all
                if ready.fault is not None:
                    self.vbar.unpin(h.slot)
                self._recycle(ready)
            yield c.view
        finally:
            c.vbar.unpin(c.slot)

    def fill(self, h, signature, want=None, patches=None, dtype=None, copy=None):
        """Make ``h``'s slot hold ``want`` under ``signature``: the one way a slot is filled.

        The caller holds a pin on the slot (its fault gave ``signature``). ``want``: None for
        the source's bytes, a patch key for the source with ``patches`` applied in ``dtype``
        (the LoRA cache), or ANY: whatever is valid under ``signature`` (the prefetcher, which
        must never overwrite a patched result). ``copy(dst, src)`` replaces the plain copy and
        may return a CUDA event the copy completes at (the prefetcher's side stream). One
        filler at a time per weight; another waits, then finds the slot filled.
        """
        with h.lock:
            if h.sig == signature and (want is ANY or h.content == want):
                return
            h.sig = None                  # invalid while written
            if self.source_check is not None:
                self.source_check(h.key)
            view = self.view_of(h)
            if copy is None:
                self._await_fill_locked(h)   # our stream writes after the side stream's copy
                view.copy_(h.source, non_blocking=True)
            else:
                h.event = copy(view, h.source)
            h.content = None
            if want is not None and want is not ANY:
                self._await_fill_locked(h)
                view.copy_(_apply(patches, view.to(dtype, copy=True)))
                h.content = want
            h.sig = signature

    def _await_fill(self, h):
        with h.lock:
            self._await_fill_locked(h)

    def _await_fill_locked(self, h):
        # Order the current stream after the side-stream copy that filled the slot (CUDA only;
        # once waited for, the current stream stays ordered after it).
        ev = h.event
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)
            h.event = None

    def _patched_slot(self, h, dtype):
        c = h.patched.get(dtype, False)
        if c is False:
            c = h.patched[dtype] = self._new_patched(h, dtype)
        return c

    def _new_patched(self, h, dtype):
        from ...vram import BadCall

        v = self.patch_vbar
        if v is None:
            if self.vbar is None or self.vbar.closed:
                return None
            # Room for every quantized weight in float32 (or two half-precision sets); a slot is
            # only made for a weight that gets patched, and reserving costs address space only.
            size = sum(4 * math.prod(x.shape) for x in self.handles if x.decode is not None)
            v = self.patch_vbar = self.pool.create_vbar(f"{self.name} (patched)", size + (1 << 20),
                                                        page_size=self.page_size)
            v.place_below(self.vbar)
        try:
            slot = v.alloc(math.prod(h.shape) * torch.empty((), dtype=dtype).element_size(),
                           name=f"{h.key} ({str(dtype).replace('torch.', '')}, patched)")
        except BadCall:
            return None
        return _Patched(v, slot)

    def _recycle(self, ready):
        # Our layers use a weight only inside ``use``: once it exits, a streamed temporary is free.
        if ready is not None and ready.temp is not None and self.prefetcher is not None:
            self.prefetcher.recycle(ready)

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
            if h.decode is not None:
                return _decoded(h, temp, dtype, patches)
            w = temp.to(h.store_dtype).to(dtype)
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
        if patches and h.decode is not None:
            src = h.source.to(device, non_blocking=True, copy=self.copy_streams)
            return _decoded(h, src, dtype, patches)
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

    def vbars(self):
        """The open VBARs of this store: the model's own, then its patch VBAR if it has one."""
        return [v for v in (self.vbar, self.patch_vbar) if v is not None and not v.closed]

    def prioritize(self):
        """This model runs next: its VBAR to the top, its patched results right below."""
        if self.vbar is None or self.vbar.closed:
            return
        self.vbar.prioritize()
        if self.patch_vbar is not None and not self.patch_vbar.closed:
            self.patch_vbar.place_below(self.vbar)

    def free_memory(self, nbytes=None):
        """Evict up to ``nbytes`` (None: everything unpinned), patched results first."""
        freed = 0
        for v in reversed(self.vbars()):
            if nbytes is not None and freed >= nbytes:
                break
            freed += v.free_memory(v.size if nbytes is None else nbytes - freed)
        return freed

    def resident_bytes(self):
        return sum(v.stats()["resident_bytes"] for v in self.vbars())

    def close(self):
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None
        for v in self.vbars():
            v.close()
        for h in self.handles:
            h.view = None
            h.sig = None
            h.small.clear()
            h.patched.clear()


class _Patched:
    __slots__ = ("vbar", "slot", "view", "valid")

    def __init__(self, vbar, slot):
        self.vbar, self.slot, self.view = vbar, slot, None
        self.valid = None             # (slot signature, patch key) the view holds, or None


def _decoded(h, raw, dtype, patches):
    """A quantized weight decoded, with its patches. A decoder with a ``patched`` method applies
    them itself (a format whose loader bakes patches into the stored form, as ComfyUI does)."""
    patched = getattr(h.decode, "patched", None) if patches else None
    if patched is not None:
        return patched(raw, dtype, patches)
    w = h.decode(raw, dtype)
    if patches:
        w = _apply(patches, w if w.data_ptr() != raw.data_ptr() else w.clone())
    return w


def _apply(patches, w):
    for f in patches:
        w = f(w)
    return w
