"""vbar-loaders: run big diffusion models on small GPUs by faulting weights into VRAM on demand.

Importing defines the nodes and, inside a running ComfyUI, adds the GET /vbar/stats route and
starts the live panel's daemon thread (routes.py). It initialises no CUDA and loads no model code.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .routes import register as _register_routes

_register_routes()

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
