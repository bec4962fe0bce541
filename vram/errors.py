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


# Pin ownership. A pin belongs to whoever took it: a fault pins its slot until that slot's unpin,
# a hold until that slot's release. A call that does not match a pin it owns raises one of these
# and changes nothing (a pin taken by a neighbour sharing the page is not the caller's).
class WrongVBAR(BadCall):
    """The slot belongs to another VBAR (or is not a slot at all)."""


class NotPinned(BadCall):
    """unpin() (or tensor()) of a slot that has no fault pin of its own outstanding."""


class NotHeld(BadCall):
    """release() of a slot that is not held."""


class AlreadyHeld(BadCall):
    """hold() of a slot that is already held: one hold, one release."""
