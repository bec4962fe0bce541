"""The pack as the Comfy Registry, pip and ComfyUI see it: metadata, dependencies, import."""
import json
import pathlib
import re
import subprocess
import sys

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The README's quick start; .ci/run runs TEST_CMD itself, so the three cannot drift apart.
DEMO_CMD = ("python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -r requirements.txt "
            "&& .venv/bin/python demo.py")
CI_CMD = "bash .ci/run"
TEST_CMD = "python -m pytest -q tests"

TORCH_LIKE = {"torch", "torchvision", "torchaudio", "pytorch", "triton"}
SEMVER = re.compile(r"^\d+\.\d+\.\d+$")


@pytest.fixture(scope="module")
def pyproject():
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def requirement_lines():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def dist_name(req):
    return re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1).lower().replace("_", "-")


def test_requirements_txt_equals_project_dependencies(pyproject):
    assert requirement_lines() == pyproject["project"]["dependencies"]


def test_dependencies_parse_and_never_pull_torch(pyproject):
    from packaging.requirements import Requirement

    deps = pyproject["project"]["dependencies"]
    names = set()
    for d in deps:
        r = Requirement(d)   # raises on a malformed specifier or marker
        names.add(r.name.lower())
    assert names == {"numpy", "gguf", "cuda-python"}
    assert not names & TORCH_LIKE
    assert not any(n.startswith("nvidia-") for n in names), names
    # safetensors is parsed by loaders/files/safetensors_file.py; it is a test dependency only
    assert "safetensors" not in names
    cuda = Requirement(next(d for d in deps if dist_name(d) == "cuda-python"))
    assert cuda.marker is not None
    assert cuda.marker.evaluate({"sys_platform": "linux"})
    assert cuda.marker.evaluate({"sys_platform": "win32"})
    assert not cuda.marker.evaluate({"sys_platform": "darwin"})


def test_ci_installs_torch_only_pinned():
    # A bare `torch` (or a range 2.13.0 does not satisfy) pulls a multi-GB CUDA build.
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r'^TORCH_VERSION=2\.13\.0$', ci, re.M)
    assert 'TORCH_SPEC="torch==$TORCH_VERSION"' in ci
    pip_lines = [ln for ln in ci.splitlines() if "PIP[@]" in ln]
    assert pip_lines and all('-c "$CONSTRAINTS"' in ln for ln in pip_lines), pip_lines
    assert not re.search(r"pip[^\n]*\btorch\b(?!==)", ci), "bare torch in a pip line"


def test_registry_fields(pyproject):
    p = pyproject["project"]
    assert p["name"] == "vbar-loaders"
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", p["name"]) and len(p["name"]) < 100
    assert "comfyui" not in p["name"].lower()
    assert SEMVER.match(p["version"]), p["version"]
    assert p["description"].strip()
    assert p["license"] == {"file": "LICENSE"}
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert p["requires-python"] == ">=3.10"
    assert p["urls"]["Repository"].startswith("https://github.com/")
    comfy = pyproject["tool"]["comfy"]
    assert comfy["PublisherId"] == "vbar-loaders"
    assert comfy["DisplayName"] == "VBAR Loaders"
    assert "Icon" in comfy
    spec = comfy["requires-comfyui"]
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(>=|<=|==|!=|~=|>|<)\s*(\S+)\s*", part)
        assert m and SEMVER.match(m.group(2)), f"requires-comfyui {spec!r}: want e.g. '>=0.3.40'"


def test_pytest_config(pyproject):
    """pytest's config lives in tests/ (its rootdir there, whatever the clone's folder is named)."""
    assert "pytest" not in pyproject.get("tool", {}), "keep pytest's config in tests/pytest.ini"
    import configparser

    ini = configparser.ConfigParser()
    ini.read(ROOT / "tests" / "pytest.ini")
    markers = [m for m in ini["pytest"]["markers"].splitlines() if m.strip()]
    assert any(m.split(":")[0].strip() == "comfyui" for m in markers)


def test_comfyignore_keeps_development_files_out():
    patterns = {ln.strip() for ln in (ROOT / ".comfyignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")}
    assert {"tests/", "benchmarks/", ".ci/"} <= patterns


def test_readme_quick_start_matches_ci():
    readme = (ROOT / "README.md").read_text()
    assert DEMO_CMD in readme, "README's quick start must show the demo command"
    assert CI_CMD in readme, "README's quick start must show the test command"
    assert TEST_CMD in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in ci
    assert any(ln.strip() == TEST_CMD for ln in ci.splitlines()), \
        f".ci/run must run the README's command `{TEST_CMD}` as it stands"


# --- the root __init__ as ComfyUI imports it -------------------------------------------------
_IMPORT_PROBE = r"""
import importlib.util, json, os, sys, traceback
root = sys.argv[1]
if os.environ.get("COMFYUI_PATH"):
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
import torch
init_calls = []
def _spy(name):
    orig = getattr(torch.cuda, name)
    def spy(*a, **k):
        init_calls.append([f"{fs.filename}:{fs.lineno}" for fs in traceback.extract_stack()[:-1]])
        return orig(*a, **k)
    setattr(torch.cuda, name, spy)
for _n in ("_lazy_init", "init"):
    _spy(_n)
# torch itself imports cuda.bindings when cuda-python is installed (torch/cuda/_utils.py), and
# ComfyUI imports torch before any custom node: only what the pack adds counts, and an import
# statement of the pack's own is caught even when the module is already loaded.
before = set(sys.modules)
import builtins, importlib
cuda_imports = []
def _note(name, depth):
    if name == "cuda" or name.startswith("cuda."):
        f = sys._getframe(depth)
        cuda_imports.append(f"{f.f_code.co_filename}:{f.f_lineno} imports {name}")
_orig_import, _orig_import_module = builtins.__import__, importlib.import_module
def _import(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0:
        _note(name, 2)
    return _orig_import(name, globals, locals, fromlist, level)
def _import_module(name, package=None):
    _note(name, 2)
    return _orig_import_module(name, package)
builtins.__import__, importlib.import_module = _import, _import_module
# ComfyUI loads a custom node by its folder name, which holds a hyphen here.
spec = importlib.util.spec_from_file_location(
    "vbar-loaders", os.path.join(root, "__init__.py"), submodule_search_locations=[root])
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
try:
    spec.loader.exec_module(mod)
except ModuleNotFoundError as e:
    print(json.dumps({"missing": e.name, "error": repr(e)}))
    sys.exit(0)
finally:
    builtins.__import__, importlib.import_module = _orig_import, _orig_import_module
ours = [c for c in init_calls if any(f.startswith(root + os.sep) for f in c)]
print(json.dumps({
    "cuda_modules": sorted(m for m in set(sys.modules) - before
                           if m == "cuda" or m.startswith("cuda.")),
    "cuda_imports_from_pack": [c for c in cuda_imports if c.startswith(root + os.sep)],
    "cuda_initialized": torch.cuda.is_initialized(),
    "init_calls_from_pack": ours,
    "exports": {k: type(getattr(mod, k, None)).__name__
                for k in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY")},
    "web_directory": getattr(mod, "WEB_DIRECTORY", None),
}))
"""

# Top-level modules that exist only inside a ComfyUI checkout.
COMFYUI_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes",
                   "server", "execution", "node_helpers", "latent_preview", "comfyui_version", "app",
                   "utils"}


def test_root_import_touches_no_gpu():
    init = ROOT / "__init__.py"
    if not init.is_file():
        pytest.skip("the pack's root __init__.py does not exist yet (it will export "
                    "NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, WEB_DIRECTORY)")
    p = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, str(ROOT)], cwd=ROOT,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, f"importing the root __init__.py failed:\n{p.stdout}\n{p.stderr}"
    res = json.loads(p.stdout.strip().splitlines()[-1])
    if "missing" in res:
        top = (res["missing"] or "").split(".")[0]
        if top == "cuda":
            pytest.fail(f"importing the pack imports cuda-python ({res['error']}): load it lazily")
        if top in COMFYUI_MODULES:
            pytest.skip(f"root __init__.py imports ComfyUI's `{res['missing']}` at import time; "
                        f"set COMFYUI_PATH to a ComfyUI checkout to run this test")
        pytest.fail(f"root __init__.py needs a module that requirements.txt does not provide: "
                    f"{res['error']}")
    assert res["cuda_modules"] == [], \
        f"importing the pack imported cuda-python ({res['cuda_modules']}): load it lazily"
    assert res["cuda_imports_from_pack"] == [], \
        f"importing the pack imported cuda-python: {res['cuda_imports_from_pack']}: load it lazily"
    assert res["init_calls_from_pack"] == [], \
        f"importing the pack initialised CUDA: {res['init_calls_from_pack'][0][-6:]}"
    assert res["cuda_initialized"] is False
    assert res["exports"] == {"NODE_CLASS_MAPPINGS": "dict", "NODE_DISPLAY_NAME_MAPPINGS": "dict",
                              "WEB_DIRECTORY": "str"}, res["exports"]
    # WEB_DIRECTORY may name a folder git does not carry yet (empty): ComfyUI skips a missing one.
    assert res["web_directory"], res["web_directory"]
