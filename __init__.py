"""vbar-loaders: run big diffusion models on small GPUs by faulting weights into VRAM on demand.

Importing registers the nodes and nothing else: no CUDA initialisation, no model code.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .routes import register as _register_routes

_register_routes()

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
