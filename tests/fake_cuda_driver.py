"""A stand-in for cuda-python's driver module, backed by host memory.

It implements the calls the CUDA backend makes, with cuda-python's calling convention (every
call returns a tuple whose first item is a CUresult) and the driver's rules that matter to us:
sizes and addresses aligned to the granularity, a mapping unmapped whole, handles released once,
device memory that runs out (CUDA_ERROR_OUT_OF_MEMORY). Pages are real mmap memory, so the
conformance suite can read and write through the backend. It checks the wrapper's logic; it says
nothing about a real GPU.
"""
import enum


from vbar_loaders.vram.host_backend import HostBackend


class CUresult(enum.Enum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_OUT_OF_MEMORY = 2


class CUdevice_attribute(enum.Enum):
    CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 102


class CUmemAllocationType(enum.Enum):
    CU_MEM_ALLOCATION_TYPE_PINNED = 1


class CUmemAllocationHandleType(enum.Enum):
    CU_MEM_HANDLE_TYPE_NONE = 0


class CUmemLocationType(enum.Enum):
    CU_MEM_LOCATION_TYPE_DEVICE = 1


class CUmemAccess_flags(enum.Enum):
    CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3


class CUmemAllocationGranularity_flags(enum.Enum):
    CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0
    CU_MEM_ALLOC_GRANULARITY_RECOMMENDED = 1


class _Location:
    type = None
    id = None


class CUmemAllocationProp:
    def __init__(self):
        self.type = None
        self.location = _Location()
        self.requestedHandleTypes = None
        self.win32HandleMetaData = None


class CUmemAccessDesc:
    def __init__(self):
        self.location = _Location()
        self.flags = None


class FakeDriver:
    GRANULARITY = 2 << 20

    CUresult = CUresult
    CUdevice_attribute = CUdevice_attribute
    CUmemAllocationType = CUmemAllocationType
    CUmemAllocationHandleType = CUmemAllocationHandleType
    CUmemLocationType = CUmemLocationType
    CUmemAccess_flags = CUmemAccess_flags
    CUmemAllocationGranularity_flags = CUmemAllocationGranularity_flags
    CUmemAllocationProp = CUmemAllocationProp
    CUmemAccessDesc = CUmemAccessDesc

    def __init__(self, total=256 << 20, used_by_others=0):
        self.host = HostBackend()
        self.total = total
        self.others = used_by_others
        self.initialised = False
        self.ctx = 0
        self.reserved = {}      # base -> size
        self.handles = {}       # handle -> size (created, not released)
        self.mapped = {}        # addr -> (handle, size)
        self.access = set()
        self.next_handle = 1

    def _ok(self, *rest):
        return (CUresult.CUDA_SUCCESS, *rest)

    def _bad(self, what):
        raise AssertionError(f"fake driver: invalid call: {what}")

    def cuInit(self, flags):
        self.initialised = True
        return self._ok()

    def cuDeviceGet(self, ordinal):
        return self._ok(ordinal)

    def cuDeviceGetAttribute(self, attr, dev):
        return self._ok(1)

    def cuCtxGetCurrent(self):
        return self._ok(self.ctx)

    def cuDevicePrimaryCtxRetain(self, dev):
        return self._ok(1000 + dev)

    def cuCtxSetCurrent(self, ctx):
        self.ctx = ctx
        return self._ok()

    def _need_ctx(self):
        if not self.initialised or not self.ctx:
            self._bad("no current context")

    def cuMemGetAllocationGranularity(self, prop, flags):
        if prop.location.type is not CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE:
            self._bad("allocation location is not the device")
        return self._ok(self.GRANULARITY)

    def cuMemGetInfo(self):
        self._need_ctx()
        used = self.others + sum(self.handles.values())
        return self._ok(self.total - used, self.total)

    def cuMemAddressReserve(self, size, alignment, addr, flags):
        self._need_ctx()
        if size % self.GRANULARITY:
            return (CUresult.CUDA_ERROR_INVALID_VALUE, 0)
        base = self.host.reserve(size)
        self.reserved[base] = size
        return self._ok(base)

    def cuMemAddressFree(self, ptr, size):
        if self.reserved.get(ptr) != size:
            self._bad(f"free of {ptr:#x}/{size} not a reservation")
        if any(ptr <= a < ptr + size for a in self.mapped):
            self._bad("address range freed while pages are still mapped")
        self.host.release(ptr, size)
        del self.reserved[ptr]
        return self._ok()

    def cuMemCreate(self, size, prop, flags):
        self._need_ctx()
        if size % self.GRANULARITY:
            return (CUresult.CUDA_ERROR_INVALID_VALUE, None)
        if self.others + sum(self.handles.values()) + size > self.total:
            return (CUresult.CUDA_ERROR_OUT_OF_MEMORY, None)
        h = self.next_handle
        self.next_handle += 1
        self.handles[h] = size
        return self._ok(h)

    def cuMemRelease(self, handle):
        if handle not in self.handles or any(m[0] == handle for m in self.mapped.values()):
            self._bad("release of an unknown or still-mapped handle")
        del self.handles[handle]
        return self._ok()

    def cuMemMap(self, ptr, size, offset, handle, flags):
        if self.handles.get(handle) != size or offset != 0 or ptr % self.GRANULARITY:
            self._bad("map size/offset/alignment")
        if not any(b <= ptr and ptr + size <= b + s for b, s in self.reserved.items()):
            self._bad("map outside a reservation")
        self.mapped[ptr] = (handle, size)
        return self._ok()

    def cuMemSetAccess(self, ptr, size, descs, count):
        if ptr not in self.mapped or count != len(descs) or \
                descs[0].flags is not CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE:
            self._bad("set access")
        self.host.map(ptr, size)       # memory becomes usable only now, as on the device
        self.access.add(ptr)
        return self._ok()

    def cuMemUnmap(self, ptr, size):
        if self.mapped.get(ptr, (None, None))[1] != size:
            self._bad("unmap must cover a whole mapping")
        del self.mapped[ptr]
        self.access.discard(ptr)
        self.host.unmap(ptr, size)
        return self._ok()


def fake_cuda_backend(**kw):
    """A CudaBackend over FakeDriver whose tensors are host views and whose sync is a no-op."""
    import torch

    from vbar_loaders.vram.cuda_backend import CudaBackend

    class FakeCudaBackend(CudaBackend):
        name = "cuda"

        def synchronize(self):
            self.syncs = getattr(self, "syncs", 0) + 1

        def tensor(self, addr, nbytes, dtype, shape):
            return self.drv.host.tensor(addr, nbytes, dtype, shape)

        def device(self):
            return torch.device("cpu")

    return FakeCudaBackend(FakeDriver(**kw), 0)



