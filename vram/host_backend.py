"""Host memory as a stand-in for VRAM: same rules, and touching an unmapped page really crashes.

Reservation is an anonymous ``mmap`` with ``PROT_NONE`` and ``MAP_NORESERVE``: address space only.
Mapping a page makes it read-write and pre-faults it so the physical cost is paid at map time, as
``cuMemCreate`` does.
Unmapping drops the physical pages (``MADV_DONTNEED``) and makes the range inaccessible again, so
the next mapping reads back zeros: stale contents can only be trusted through signatures.
"""
import ctypes
import ctypes.util
import errno
import mmap
import os

from .backend import Backend
from .errors import BackendError, BadCall, PhysicalOOM

_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0)
_MAP_ANON = getattr(mmap, "MAP_ANONYMOUS", getattr(mmap, "MAP_ANON", 0x20))
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; older kernels answer EINVAL and we skip it
_PROT_NONE = 0
_MAP_FAILED = ctypes.c_void_p(-1).value
_HUGE = 2 << 20
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)


def _libc():
    lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    lib.mmap.restype = ctypes.c_void_p
    lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                         ctypes.c_int, ctypes.c_long]
    for fn in (lib.munmap, lib.mprotect, lib.madvise):
        fn.restype = ctypes.c_int
    lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return lib


class HostBackend(Backend):
    name = "host"

    def __init__(self, page_size=None):
        self.granularity = mmap.PAGESIZE
        self.default_page_size = page_size or (2 << 20)   # finer than CUDA: simulated cards are small
        self._c = _libc()
        self._populate = True

    def capacity(self):
        return None

    def _check(self, rc, what, addr, nbytes):
        if rc != 0:
            err = ctypes.get_errno()
            if err == errno.ENOMEM:
                raise PhysicalOOM(f"host backend: {what} of {nbytes} bytes at {addr:#x}: out of memory")
            raise BackendError(f"host backend: {what} of {nbytes} bytes at {addr:#x} failed: "
                               f"{os.strerror(err)}")

    def reserve(self, nbytes):
        if nbytes <= 0 or nbytes % self.granularity:
            raise BadCall(f"reserve size {nbytes} must be a positive multiple of {self.granularity}")
        flags = mmap.MAP_PRIVATE | _MAP_ANON | _MAP_NORESERVE
        # Over-reserve by one huge page and trim, so the range starts 2 MiB-aligned: weights then
        # sit in huge pages where the kernel allows them (as device memory does), and speed does
        # not depend on where mmap happened to put the range.
        raw = self._c.mmap(None, nbytes + _HUGE, _PROT_NONE, flags, -1, 0)
        if raw is None or raw == _MAP_FAILED:
            err = ctypes.get_errno()
            raise BackendError(f"host backend: cannot reserve {nbytes} bytes of address space: "
                               f"{os.strerror(err)}")
        addr = -(-raw // _HUGE) * _HUGE
        if addr > raw:
            self._c.munmap(raw, addr - raw)
        tail = raw + nbytes + _HUGE - (addr + nbytes)
        if tail:
            self._c.munmap(addr + nbytes, tail)
        self._c.madvise(addr, nbytes, _MADV_HUGEPAGE)   # advisory: EINVAL without THP is fine
        return addr

    def release(self, base, nbytes):
        self._check(self._c.munmap(base, nbytes), "munmap", base, nbytes)

    def map(self, addr, nbytes):
        self._check(self._c.mprotect(addr, nbytes, mmap.PROT_READ | mmap.PROT_WRITE),
                    "mprotect(RW)", addr, nbytes)
        if self._populate and self._c.madvise(addr, nbytes, _MADV_POPULATE_WRITE) != 0:
            err = ctypes.get_errno()
            if err == errno.ENOMEM:
                self.unmap(addr, nbytes)
                raise PhysicalOOM(f"host backend: no memory to populate {nbytes} bytes")
            self._populate = False  # kernel too old: pages commit on first touch instead

    def unmap(self, addr, nbytes):
        self._check(self._c.madvise(addr, nbytes, _MADV_DONTNEED), "madvise(DONTNEED)", addr, nbytes)
        self._check(self._c.mprotect(addr, nbytes, _PROT_NONE), "mprotect(NONE)", addr, nbytes)

    def tensor(self, addr, nbytes, dtype, shape):
        import torch

        buf = (ctypes.c_uint8 * nbytes).from_address(addr)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)

    def device(self):
        import torch

        return torch.device("cpu")
