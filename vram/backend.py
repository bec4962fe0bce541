"""The interface every backend provides. The allocator never touches memory itself.

A backend owns address-space reservations and physical pages. Sizes and addresses passed in are
always multiples of ``granularity``; the allocator guarantees that.
"""


class Backend:
    name = "abstract"
    granularity = 4096
    default_page_size = 32 << 20
    coalesce = True   # may map adjacent pages in one call and unmap them one by one later

    def capacity(self):
        """Total physical memory of the device in bytes, or None if unbounded (host)."""
        raise NotImplementedError

    def used_by_others(self, ours):
        """Bytes of the device taken by anything but our mapped pages (``ours`` bytes)."""
        return 0

    def reserve(self, nbytes):
        """Reserve ``nbytes`` of address space, costing no physical memory. Returns the base."""
        raise NotImplementedError

    def release(self, base, nbytes):
        raise NotImplementedError

    def map(self, addr, nbytes):
        """Back ``[addr, addr+nbytes)`` with physical memory. Raises PhysicalOOM when out."""
        raise NotImplementedError

    def unmap(self, addr, nbytes):
        """Return the physical memory; touching the range afterwards faults."""
        raise NotImplementedError

    def tensor(self, addr, nbytes, dtype, shape):
        """A torch tensor viewing mapped memory, zero-copy."""
        raise NotImplementedError

    def device(self):
        """The torch device tensors from this backend live on."""
        raise NotImplementedError

    def close(self):
        pass
