"""Import the pack as ``vbar_loaders`` from a script, as tests/conftest.py does for the tests.

The repository root is a ComfyUI custom node whose ``__init__`` imports ComfyUI, and its folder
name may hold a hyphen; an alias package whose search path is the root reaches ``vram`` and
``loaders`` without running that ``__init__``::

    import _pack  # noqa: F401  (from a script in benchmarks/)
    from vbar_loaders.vram import Pool
"""
import pathlib
import sys
import types

ROOT = pathlib.Path(__file__).resolve().parent.parent
NAME = "vbar_loaders"


def install(root=ROOT, name=NAME):
    """Register the alias package (idempotent) and return it."""
    pkg = sys.modules.get(name)
    if pkg is None:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(root)]
        pkg.__file__ = str(pathlib.Path(root) / "__init__.py")
        sys.modules[name] = pkg
    return pkg


install()


def keep_freed_memory():
    """Make glibc's malloc keep freed memory in the process (no mmap per large block, no trim),
    as CUDA's caching allocator does on a GPU. Otherwise every fresh large temporary on the host
    is page-faulted in, a cost the device being simulated does not have. Returns whether it
    took effect (glibc only)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))
