"""Make the pack importable as ``vbar_loaders`` without running its ``__init__``.

The pack's root directory is a ComfyUI custom node (its name may hold a hyphen), so tests
address its sub-packages through an alias package whose search path is the repository root.
"""
import pathlib
import sys
import types

ROOT = pathlib.Path(__file__).resolve().parent.parent

if "vbar_loaders" not in sys.modules:
    pkg = types.ModuleType("vbar_loaders")
    pkg.__path__ = [str(ROOT)]
    pkg.__file__ = str(ROOT / "__init__.py")
    sys.modules["vbar_loaders"] = pkg
