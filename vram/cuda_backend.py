"""CUDA driver virtual memory management (cuda-python), kept thin: one call per operation.

Nothing here runs at import. ``load()`` imports cuda-python and checks the driver; it returns
None with a logged reason when either is missing or too old, so the pack degrades instead of
failing to import.
"""
import logging

from .backend import Backend
from .errors import BackendError, PhysicalOOM

log = logging.getLogger("vbar.cuda")


def _driver():
    try:
        from cuda.bindings import driver  # cuda-python >= 12.6
    except ImportError:
        from cuda import cuda as driver  # older cuda-python
    return driver


def load(device_index=0):
    """A CudaBackend for ``device_index``, or None (with the reason logged) when unavailable."""
    try:
        drv = _driver()
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        log.warning("VBAR: cuda-python not importable (%s); install it with "
                    "`pip install cuda-python` (use cuda-python<13 for drivers older than 580). "
                    "Layers will stream weights instead of keeping them resident.", e)
        return None
    try:
        return CudaBackend(drv, device_index)
    except BackendError as e:
        log.warning("VBAR: CUDA virtual memory unavailable (%s); layers will stream weights.", e)
        return None


class CudaBackend(Backend):
    name = "cuda"
    coalesce = False   # a physical allocation is unmapped whole, so map page by page

    def __init__(self, drv, device_index):
        self.drv = drv
        self.index = device_index
        self._call(drv.cuInit, 0)
        self.dev = self._call(drv.cuDeviceGet, device_index)
        supported = self._call(
            drv.cuDeviceGetAttribute,
            drv.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, self.dev)
        if not supported:
            raise BackendError(f"device {device_index} does not support virtual memory management")
        self._ensure_context()
        prop = drv.CUmemAllocationProp()
        prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device_index
        if hasattr(prop, "requestedHandleTypes"):
            prop.requestedHandleTypes = drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_NONE
        if hasattr(prop, "win32HandleMetaData"):
            prop.win32HandleMetaData = 0
        self.prop = prop
        access = drv.CUmemAccessDesc()
        access.location.type = prop.location.type
        access.location.id = device_index
        access.flags = drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self.access = access
        self.granularity = int(self._call(
            drv.cuMemGetAllocationGranularity, prop,
            drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED))
        self.default_page_size = max(32 << 20, self.granularity)
        self._handles = {}   # page address -> physical allocation handle
        self._total = None

    def _call(self, fn, *args):
        out = fn(*args)
        err, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
        if err != self.drv.CUresult.CUDA_SUCCESS:
            name = getattr(err, "name", str(err))
            if name == "CUDA_ERROR_OUT_OF_MEMORY":
                raise PhysicalOOM(f"{fn.__name__}: out of device memory")
            raise BackendError(f"{fn.__name__} failed: {name}")
        return rest[0] if len(rest) == 1 else (rest or None)

    def _ensure_context(self):
        # torch and we must share the device's primary context, and the calling thread needs it
        # current (prefetch threads start without one).
        ctx = self._call(self.drv.cuCtxGetCurrent)
        if not ctx or int(ctx) == 0:
            primary = self._call(self.drv.cuDevicePrimaryCtxRetain, self.dev)
            self._call(self.drv.cuCtxSetCurrent, primary)

    def capacity(self):
        if self._total is None:
            self._ensure_context()
            _, self._total = self._call(self.drv.cuMemGetInfo)
        return int(self._total)

    def used_by_others(self, ours):
        self._ensure_context()
        free, total = self._call(self.drv.cuMemGetInfo)
        return max(0, int(total) - int(free) - ours)

    def reserve(self, nbytes):
        self._ensure_context()
        return int(self._call(self.drv.cuMemAddressReserve, nbytes, self.granularity, 0, 0))

    def release(self, base, nbytes):
        self._call(self.drv.cuMemAddressFree, base, nbytes)

    def map(self, addr, nbytes):
        self._ensure_context()
        handle = self._call(self.drv.cuMemCreate, nbytes, self.prop, 0)
        try:
            self._call(self.drv.cuMemMap, addr, nbytes, 0, handle, 0)
        except Exception:
            self._call(self.drv.cuMemRelease, handle)
            raise
        try:
            self._call(self.drv.cuMemSetAccess, addr, nbytes, [self.access], 1)
        except Exception:
            self._call(self.drv.cuMemUnmap, addr, nbytes)
            self._call(self.drv.cuMemRelease, handle)
            raise
        self._handles[addr] = (handle, nbytes)

    def synchronize(self):
        import torch

        torch.cuda.synchronize(self.index)

    def unmap(self, addr, nbytes):
        # Kernels queued on any stream may still read the page: wait for them before it goes.
        self.synchronize()
        end = addr + nbytes
        for a in [a for a in self._handles if addr <= a < end]:
            handle, size = self._handles.pop(a)
            self._call(self.drv.cuMemUnmap, a, size)
            self._call(self.drv.cuMemRelease, handle)

    def tensor(self, addr, nbytes, dtype, shape):
        import torch

        raw = torch.as_tensor(_CudaArray(addr, nbytes), device=self.device())
        return raw.view(dtype).view(shape)

    def device(self):
        import torch

        return torch.device("cuda", self.index)


class _CudaArray:
    """Just enough of ``__cuda_array_interface__`` for torch to wrap a device pointer."""

    def __init__(self, addr, nbytes):
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (addr, False), "version": 3,
            "strides": None,
        }
