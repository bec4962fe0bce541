"""The tests import the pack as ``vbar_loaders``, installed from this checkout (``pip install -e .``,
as .ci/run does). Stop at once, saying so, when it is missing or another checkout's."""
import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def installed_root():
    """The folder ``import vbar_loaders`` would load, or None."""
    spec = importlib.util.find_spec("vbar_loaders")
    if spec is None or not spec.origin:
        return None
    return pathlib.Path(spec.origin).resolve().parent


def pytest_configure(config):
    found = installed_root()
    if found != ROOT:
        where = "finds no package" if found is None else f"loads another checkout, {found}"
        raise pytest.UsageError(
            f"`import vbar_loaders` {where}; the tests need this one ({ROOT}). Install it: "
            f"`{sys.executable} -m pip install -e {ROOT}` (.ci/run does it in its venv).")
