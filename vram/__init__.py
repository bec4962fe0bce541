"""VBAR allocator: per-model virtual ranges whose pages are mapped on demand within a budget.

Knows nothing of ComfyUI. Importing it touches no device; backends load on first use.
"""
import logging
import os
import threading

from .errors import (AlreadyHeld, BackendError, BadCall, BudgetExceeded, ClosedError, NotHeld,
                     NotPinned, PhysicalOOM, VramError, WrongVBAR)
from .pool import Pool
from .vbar import OFFLOADED, VBAR, Fault, Slot

__all__ = ["Pool", "VBAR", "Slot", "Fault", "OFFLOADED", "VramError", "BadCall", "ClosedError",
           "BackendError", "PhysicalOOM", "BudgetExceeded", "WrongVBAR", "NotPinned", "NotHeld",
           "AlreadyHeld", "make_backend", "get_pool", "pools", "parse_bytes"]

log = logging.getLogger("vbar")
_pools = {}
_pools_lock = threading.Lock()
# Devices whose CUDA backend failed to start, with why: a model load asks for the pool several
# times (once per model part), and retrying a driver that said no only repeats the warning.
_failed = {}


def parse_bytes(text, allow_zero=False):
    """'6G', '512MiB', '1.5GB', '1073741824' -> bytes. Raises BadCall naming the value."""
    s = str(text).strip().upper().replace("IB", "").replace("B", "")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if s and s[-1] in units:
            n = int(float(s[:-1]) * units[s[-1]])
        else:
            n = int(float(s))
    except ValueError:
        raise BadCall(f"cannot read {text!r} as a size: use e.g. 6G, 512M or a number of bytes")
    if n < 0 or (n == 0 and not allow_zero):
        raise BadCall(f"size {text!r} must be {'>= 0' if allow_zero else 'positive'}")
    return n


def make_backend(kind, device_index=0, page_size=None):
    """'host' or 'cuda'. CUDA returns None (reason logged) when cuda-python/driver are unusable."""
    if kind == "host":
        from .host_backend import HostBackend

        return HostBackend(page_size=page_size)
    if kind == "cuda":
        from . import cuda_backend

        return cuda_backend.load(device_index)
    raise BadCall(f"unknown VBAR backend {kind!r}: use 'host' or 'cuda'")


def get_pool(device="cpu", budget=None, headroom=None):
    """The process-wide pool for a torch device ('cpu' -> host backend, 'cuda:N' -> CUDA).

    The first call for a device makes its pool, and only that call reads the environment: the
    limit is ``budget``, else ``VBAR_BUDGET`` (e.g. '6G'), else the card's memory (CUDA) or
    8 GiB (host: a simulated card); the headroom is ``headroom``, else ``VBAR_HEADROOM``, else 0.
    Later calls return that pool, changing its budget only when given one.
    Returns None if the device's backend is unavailable (the caller streams everything). That
    is decided once per device and process: the reason is logged the first time, and later
    calls return None at once.
    """
    key = str(device)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            if key in _failed:
                return None
            if key.startswith("cuda"):
                index = int(key.split(":")[1]) if ":" in key else 0
                backend = make_backend("cuda", index)
                if backend is None:
                    _failed[key] = True
                    log.info("VBAR: %s stays without a VBAR pool until restart (reason above)", key)
                    return None
            else:
                backend = make_backend("host")
            env_budget = os.environ.get("VBAR_BUDGET")
            env_head = os.environ.get("VBAR_HEADROOM")
            b = budget or (parse_bytes(env_budget) if env_budget else None)
            if b is None and backend.capacity() is None:
                b = 8 << 30
            h = headroom if headroom is not None else (
                parse_bytes(env_head, allow_zero=True) if env_head else 0)
            pool = _pools[key] = Pool(backend, budget=b, headroom=h)
        elif budget is not None or headroom is not None:
            pool.set_budget(budget if budget is not None else pool.limit, headroom)
        return pool


def pools():
    """``{device: Pool}`` for every pool ``get_pool`` made in this process (a copy: safe to
    iterate while another thread makes a pool). A closed pool stays listed; ``pool.closed``
    says so."""
    with _pools_lock:
        return dict(_pools)
