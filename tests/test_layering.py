"""The house rules, checked from the code's own imports.

- ComfyUI (``comfy``, ``folder_paths``, ``server``, ...) is imported only by the ComfyUI surface
  (``nodes.py``, ``monitor.py``, ``routes.py``) and by the one integration package,
  ``loaders/comfyui/``. Everything else runs, and is tested, without a ComfyUI.
- Imports point down: ``vram/`` knows nothing above it, ``loaders/`` nothing of the surface, and
  the format and runtime packages of ``loaders/`` nothing of ``loaders/comfyui/``.
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMFYUI_TOP = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "comfy_aimdo", "folder_paths",
               "nodes", "server", "execution", "node_helpers", "latent_preview", "comfyui_version",
               "app"}
SURFACE = {"nodes.py", "monitor.py", "routes.py", "__init__.py"}
PACK_DIRS = ("vram", "loaders")


def pack_files():
    for d in PACK_DIRS:
        yield from sorted((ROOT / d).rglob("*.py"))
    for name in sorted(SURFACE):
        yield ROOT / name


def imports(path):
    """(absolute top-level names, resolved pack-relative module paths) imported anywhere in path."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    absolute, internal = [], []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            absolute += [(a.name.split(".")[0], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                absolute.append((node.module.split(".")[0], node.lineno))
            else:
                base = package[:len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
                internal.append(("/".join(target), node.lineno))
    return absolute, internal


def test_only_the_surface_and_loaders_comfyui_import_comfyui():
    offenders = []
    for path in pack_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel in SURFACE or rel.startswith("loaders/comfyui/"):
            continue
        for top, line in imports(path)[0]:
            if top in COMFYUI_TOP:
                offenders.append(f"{rel}:{line} imports {top}")
    assert not offenders, ("ComfyUI is imported outside nodes.py/monitor.py/routes.py and "
                           "loaders/comfyui/:\n" + "\n".join(offenders))


def test_imports_point_down():
    below = {"vram": ("vram",), "loaders": ("vram", "loaders")}
    offenders = []
    for path in pack_files():
        rel = path.relative_to(ROOT).as_posix()
        layer = rel.split("/")[0]
        if layer not in below:
            continue
        for target, line in imports(path)[1]:
            up = not target.startswith(below[layer]) or (
                target.startswith("loaders/comfyui") and not rel.startswith("loaders/comfyui/"))
            if up:
                offenders.append(f"{rel}:{line} imports {target or 'the pack root'}")
    assert not offenders, "imports that point up a layer:\n" + "\n".join(offenders)


def test_the_checker_sees_imports():
    """The rules above hold because the scan finds imports, not because it finds none."""
    absolute, internal = imports(ROOT / "loaders" / "comfyui" / "loading.py")
    assert any(top == "comfy" for top, _ in absolute)
    assert any(t.startswith("vram") for t, _ in internal)
    assert any(t == "loaders/runtime/weight_store" for t, _ in internal)
