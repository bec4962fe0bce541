"""Start-up shared by the scripts that run inside ComfyUI's interpreter (comfy_*_check.py):
ComfyUI importable from its checkout with CPU flags, and the checkout these scripts sit in
loaded by its folder as ``vbar_loaders``, the way ComfyUI loads a custom node. So a script tests
this checkout whatever is installed in ComfyUI's venv (the servers of the tests load it by folder
too); no install is needed there."""
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_pack(repo=REPO, name="vbar_loaders"):
    """Import ``repo`` as the package ``name`` (its ``__init__`` imports nothing of ComfyUI)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(repo, "__init__.py"),
                                                  submodule_search_locations=[repo])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[name] = pack
    spec.loader.exec_module(pack)
    return pack


def check(name, cond, detail=""):
    """One named check of a script: prints 'CHECK name ok' (the test reads these), or raises."""
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    print(f"CHECK {name} ok", flush=True)


def interrupt_at(k, forward):
    """A load-progress callback that records every step in ``.steps``, forwards it to
    ``forward``, and asks ComfyUI to interrupt at the k-th, as POST /interrupt does: the pack's
    loaders must then stop there and leave nothing behind."""
    import comfy.model_management as mm

    def progress(done, total):
        progress.steps.append((done, total))
        if len(progress.steps) == k:
            mm.interrupt_current_processing(True)
        forward(done, total)

    progress.steps = []
    return progress


def boot(comfy_dir):
    sys.path.insert(0, comfy_dir)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    load_pack()
