"""The pack as the Comfy Registry, pip and ComfyUI see it: metadata, dependencies, import."""
import ast
import json
import os
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
DEMO_CMD = ("python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -r requirements.txt -e . "
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
# ComfyUI loads a custom node by its folder name, which holds a hyphen here, then reads its
# exports (the node classes lazily: that read imports nodes.py).
spec = importlib.util.spec_from_file_location(
    "vbar-loaders", os.path.join(root, "__init__.py"), submodule_search_locations=[root])
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
try:
    spec.loader.exec_module(mod)
    exports = {k: getattr(mod, k, None)
               for k in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY")}
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
    "exports": {k: type(v).__name__ for k, v in exports.items()},
    "web_directory": exports["WEB_DIRECTORY"],
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


_BARE_IMPORT = r"""
import json, sys, threading
before = set(sys.modules)
import vbar_loaders
added = set(sys.modules) - before
new = sorted(m for m in added if m.split(".")[0] != "vbar_loaders")
print(json.dumps({"file": vbar_loaders.__file__, "pack": sorted(added - set(new)),
                  "threads": threading.active_count(), "new": new,
                  "entrypoint": hasattr(vbar_loaders, "comfy_entrypoint"),
                  "web": vbar_loaders.WEB_DIRECTORY}))
"""


def test_installed_pack_imports_without_comfyui_and_does_nothing():
    """`import vbar_loaders` (the editable install) is this checkout, and importing it loads no
    other module of the pack, no torch, no ComfyUI, and starts no thread."""
    p = subprocess.run([sys.executable, "-c", _BARE_IMPORT], capture_output=True, text=True,
                       timeout=60, cwd="/")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert pathlib.Path(res["file"]).resolve() == ROOT / "__init__.py"
    assert res["pack"] == ["vbar_loaders"], res["pack"]
    assert not any(m.split(".")[0] in COMFYUI_MODULES | {"torch"} for m in res["new"]), res["new"]
    assert res["threads"] == 1
    assert res["entrypoint"] is False      # ComfyUI probes it when NODE_CLASS_MAPPINGS is absent
    assert res["web"] == "./web" and (ROOT / "web").is_dir()


_COMFY_LOADS = r"""
import importlib.util, logging, sys
root = sys.argv[1]
spec = importlib.util.spec_from_file_location("pack_under_test", root + "/__init__.py",
                                              submodule_search_locations=[root])
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
spec.loader.exec_module(mod)
# As ComfyUI's load_custom_node (0.3.40 to 0.33) reads them: hasattr(), then getattr().
try:
    if hasattr(mod, "NODE_CLASS_MAPPINGS") and mod.NODE_CLASS_MAPPINGS is not None:
        print("NODES", sorted(mod.NODE_CLASS_MAPPINGS), sorted(mod.NODE_DISPLAY_NAME_MAPPINGS))
    else:
        print("SKIPPED: no NODE_CLASS_MAPPINGS")
except Exception as e:
    print("CANNOT IMPORT:", type(e).__name__, e)
"""


@pytest.mark.parametrize("nodes_py, want", [
    ("NODE_CLASS_MAPPINGS = {'A': int}\nNODE_DISPLAY_NAME_MAPPINGS = {'A': 'a'}\n",
     "NODES ['A'] ['A']"),
    ("import os\nos.no_such_function()\n",
     "CANNOT IMPORT: ImportError vbar-loaders: importing nodes.py failed: AttributeError("),
    ("import no_such_module_anywhere\n", "CANNOT IMPORT: ModuleNotFoundError"),
], ids=["ok", "attribute-error", "missing-module"])
def test_node_exports_are_lazy_and_an_error_in_nodes_py_reaches_comfyui(tmp_path, nodes_py, want):
    """The root __init__ with a stand-in nodes.py: ComfyUI gets the node mappings, and an error
    while importing nodes.py reaches its "Cannot import" message; hasattr() would swallow a bare
    AttributeError and report the pack as having no nodes."""
    (tmp_path / "__init__.py").write_text((ROOT / "__init__.py").read_text())
    (tmp_path / "routes.py").write_text("def register():\n    return False\n")
    (tmp_path / "nodes.py").write_text(nodes_py)
    p = subprocess.run([sys.executable, "-c", _COMFY_LOADS, str(tmp_path)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(want), p.stdout


def test_setuptools_packages_name_every_package_folder(pyproject):
    """`pip install -e .` maps vbar_loaders to the root; a sub-package left out of the list
    would be missing from a wheel."""
    st = pyproject["tool"]["setuptools"]
    assert st["package-dir"] == {"vbar_loaders": "."}
    skip = {"tests", "benchmarks", "workflows", "docs", "web", "build", "__pycache__"}
    folders = []
    for here, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".") and "egg" not in d]
        if "__init__.py" in files:
            folders.append(".".join(("vbar_loaders",) + pathlib.Path(here).relative_to(ROOT).parts))
    assert sorted(st["packages"]) == sorted(folders)
    assert pyproject["build-system"]["build-backend"] == "setuptools.build_meta"


# --- the Comfy Registry's rules ---------------------------------------------------------------
# What `comfy node validate` / `comfy node publish` check (comfy-cli's registry/config_parser.py
# and the publish command) and what docs.comfy.org/registry/specifications asks, written as tests:
# comfy-cli itself needs a ComfyUI workspace and prompts on first use, so it does not run here.
REQUIRES_PART = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")
OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")
ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                "GPU :: Apple Metal"}
REGISTRY_URL_KEYS = {"Homepage", "Documentation", "Repository", "Issues"}   # what comfy-cli reads
ICON_TYPES = {".png": b"\x89PNG\r\n\x1a\n", ".jpg": b"\xff\xd8\xff", ".jpeg": b"\xff\xd8\xff",
              ".gif": b"GIF8", ".svg": b"<"}


def registry_name_ok(name):
    # < 100 chars; letters, digits, '-', '_', '.'; no two special characters in a row; starts
    # with a letter.
    return len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", name)


def test_registry_name_rule_itself():
    assert registry_name_ok("vbar-loaders") and registry_name_ok("a.b_c")
    for bad in ("123-tool", "-x", "a--b", "a-", "a b", "x" * 100):
        assert not registry_name_ok(bad), bad


def test_registry_rules(pyproject):
    p, comfy = pyproject["project"], pyproject["tool"]["comfy"]
    assert isinstance(p["version"], str) and SEMVER.match(p["version"])
    assert registry_name_ok(p["name"]) and "comfyui" not in p["name"].lower()
    lic = p["license"]
    assert set(lic) <= {"file", "text"} and lic, "license = {file = ...} or {text = ...}"
    if "file" in lic:
        assert (ROOT / lic["file"]).is_file()
    assert set(p["urls"]) <= REGISTRY_URL_KEYS, f"comfy-cli reads only {REGISTRY_URL_KEYS}"
    for url in p["urls"].values():
        assert url.startswith("https://"), url
    for part in comfy["requires-comfyui"].split(","):
        assert REQUIRES_PART.match(part.strip()), comfy["requires-comfyui"]
    for c in p["classifiers"]:
        if c.startswith("Operating System :: "):
            assert c[len("Operating System :: "):].startswith(OS_PREFIXES), c
        if c.startswith("Environment ::"):
            assert c[len("Environment :: "):] in ACCELERATORS, c
    assert not any(d.startswith("comfyui-frontend-package") for d in p["dependencies"])
    assert comfy["PublisherId"].strip() and comfy["DisplayName"].strip()
    assert isinstance(comfy["includes"], list)


def png_size(data):
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_icon_is_a_raw_url_of_a_file_in_this_repository(pyproject):
    icon = pyproject["tool"]["comfy"]["Icon"]
    repo = pyproject["project"]["urls"]["Repository"]
    owner_repo = re.fullmatch(r"https://github\.com/([^/]+/[^/]+?)/?", repo).group(1)
    m = re.fullmatch(r"https://raw\.githubusercontent\.com/([^/]+/[^/]+)/main/(.+)", icon)
    assert m, f"Icon must be a URL (the registry fetches it): {icon!r}"
    assert m.group(1) == owner_repo, "Icon must come from the Repository URL's repository"
    path = ROOT / m.group(2)
    assert path.is_file(), f"{m.group(2)} is not in the repository"
    data = path.read_bytes()
    ext = path.suffix.lower()
    assert ext in ICON_TYPES and data.startswith(ICON_TYPES[ext]), "SVG, PNG, JPG or GIF"
    if ext == ".png":
        w, h = png_size(data)
        assert 0 < w <= 800 and 0 < h <= 400, f"icon {w}x{h}: at most 800x400"


def shipped_python_files():
    """Every .py file of the repository as ruff would see it (hidden and cache folders skipped)."""
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if not any(part.startswith(".") or part == "__pycache__" for part in parts[:-1]):
            yield path


def test_no_exec_eval_or_semicolon_statements():
    """The publish checks (ruff S102, S307, E702): no builtin exec()/eval(), one statement a line."""
    import io
    import tokenize

    offenders = []
    for path in shipped_python_files():
        src = path.read_text()
        rel = path.relative_to(ROOT)
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id in ("exec", "eval"):
                offenders.append(f"{rel}:{node.lineno} calls {node.func.id}()")
        depth = 0
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.OP and tok.string in "([{":
                depth += 1
            elif tok.type == tokenize.OP and tok.string in ")]}":
                depth -= 1
            elif tok.type == tokenize.OP and tok.string == ";" and depth == 0:
                offenders.append(f"{rel}:{tok.start[0]} has two statements on one line")
    assert not offenders, "\n".join(offenders)


# --- publishing -------------------------------------------------------------------------------
WORKFLOW = ROOT / ".github" / "workflows" / "publish.yml"
VERSION_SCRIPT = ROOT / ".github" / "scripts" / "version_changed.py"


def test_publish_workflow_uses_the_registry_action_with_a_secret():
    wf = WORKFLOW.read_text()
    assert re.search(r"^on:\n  push:\n    branches: \[main\]\n    paths: \[\"pyproject\.toml\"\]$",
                     wf, re.M), "publish on pushes to main that touch pyproject.toml"
    assert re.search(r"^\s+uses: Comfy-Org/publish-node-action@v1$", wf, re.M)
    tokens = re.findall(r"personal_access_token:\s*(.+)", wf)
    assert tokens == ["${{ secrets.REGISTRY_ACCESS_TOKEN }}"], tokens
    assert "if: steps.version.outputs.changed == 'true'" in wf
    assert "python3 .github/scripts/version_changed.py" in wf
    assert ".github/" in (ROOT / ".comfyignore").read_text().split()


def run_version_script(repo, event, before):
    p = subprocess.run([sys.executable, str(VERSION_SCRIPT), event, before], cwd=repo,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return dict(line.split("=", 1) for line in p.stdout.split())


def test_version_gate(tmp_path):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid"]

    def commit(version, description="d"):
        (tmp_path / "pyproject.toml").write_text(
            f'[project]\nname = "x"\nversion = "{version}"\ndescription = "{description}"\n')
        subprocess.run(git + ["add", "-A"], cwd=tmp_path, check=True, capture_output=True)
        subprocess.run(git + ["commit", "-qm", version], cwd=tmp_path, check=True,
                       capture_output=True)
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    first = commit("0.1.0")
    assert run_version_script(tmp_path, "push", "0" * 40) == {"changed": "true", "version": "0.1.0"}
    second = commit("0.1.0", description="only the description")
    assert run_version_script(tmp_path, "push", first)["changed"] == "false"
    commit("0.2.0")
    assert run_version_script(tmp_path, "push", second) == {"changed": "true", "version": "0.2.0"}
    assert run_version_script(tmp_path, "push", "f" * 40)["changed"] == "true"   # unknown commit
    commit("0.2.0", description="again")
    assert run_version_script(tmp_path, "workflow_dispatch", "")["changed"] == "true"
