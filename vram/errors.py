"""Typed errors of the allocator. Anything not raised as one of these is a bug."""


class VramError(Exception):
    """Base of every allocator error."""


class BadCall(VramError, ValueError):
    """The caller asked for something that can never work (unknown slot, size <= 0, ...)."""


class ClosedError(VramError):
    """The VBAR or pool was closed; its memory and range are gone."""


class BackendError(VramError):
    """The backend (driver / kernel) refused an operation for a reason other than memory."""


class PhysicalOOM(VramError):
    """The backend had no physical memory left. The allocator turns this into an offload."""


class BudgetExceeded(VramError):
    """Memory that must stay resident (held slots) does not fit the budget."""
