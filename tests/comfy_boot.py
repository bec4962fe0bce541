"""Start-up shared by the scripts that run inside ComfyUI's interpreter (comfy_*_check.py):
ComfyUI importable from its checkout with CPU flags, and this repository as ``vbar_loaders``
(the package name ComfyUI would give it from custom_nodes)."""
import os
import sys
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def boot(comfy_dir):
    sys.path.insert(0, comfy_dir)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    pkg = types.ModuleType("vbar_loaders")
    pkg.__path__ = [REPO]
    sys.modules["vbar_loaders"] = pkg
