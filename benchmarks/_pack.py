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
