"""vbar-loaders: run big diffusion models on small GPUs by faulting weights into VRAM on demand.

The package ``vbar_loaders`` (``pip install -e .``) and the ComfyUI custom node are this one
folder. Importing it imports nothing else, so scripts and tests reach ``vbar_loaders.vram`` and
``vbar_loaders.loaders`` without ComfyUI. The node exports are made on first read (PEP 562):
ComfyUI's first read of ``NODE_CLASS_MAPPINGS`` or ``NODE_DISPLAY_NAME_MAPPINGS`` imports
``nodes.py`` (the node classes; ComfyUI's modules are imported when ComfyUI calls them) and,
inside a running ComfyUI, adds the GET /vbar/stats route and starts the live panel's daemon
thread (routes.py). No CUDA is initialised and no model code is loaded.
"""
WEB_DIRECTORY = "./web"

_NODE_EXPORTS = ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS")

__all__ = [*_NODE_EXPORTS, "WEB_DIRECTORY"]


def __getattr__(name):
    if name not in _NODE_EXPORTS:
        # ComfyUI probes other names (comfy_entrypoint): they must read as absent.
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from . import nodes
        from .routes import register
    except AttributeError as e:
        # ComfyUI reads the exports with hasattr(), which would swallow an AttributeError raised
        # while importing nodes.py (say, a ComfyUI function that moved) and report the pack as
        # having no nodes; an ImportError reaches its "Cannot import ... module" message.
        raise ImportError(f"vbar-loaders: importing nodes.py failed: {e!r}") from e
    register()
    globals().update({n: getattr(nodes, n) for n in _NODE_EXPORTS})
    return globals()[name]
