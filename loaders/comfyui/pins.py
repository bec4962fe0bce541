"""Block pins over a model's life in ComfyUI, shared by the NF4, GGUF and diffusion loaders.

Pins follow the model: released when ComfyUI unloads it (ON_DETACH), held again when it loads
it (ON_LOAD), and released for good when the same node loads again, since ComfyUI keeps the
node's previous MODEL in its output cache meanwhile. Imports ComfyUI only inside functions.
"""
import logging
import os
import weakref

from ..errors import ModelFileError
from ..runtime.blocks import check_pins, release_pins, restore_pins

log = logging.getLogger("vbar")
_CALLBACK_KEY = "vbar_flux_block_pins"


def file_keys(path):
    """The tensor names of a .safetensors or .gguf file, from its header only."""
    if str(path).lower().endswith(".gguf"):
        from ..gguf.file import GGUFFile

        return GGUFFile(path).keys()
    from ..files.safetensors_file import SafetensorsFile

    with SafetensorsFile(path, verify=False) as f:
        return list(f.keys())


def validate_block_counts(path, double, single, first=0):
    """For a node's VALIDATE_INPUTS: True, or the message explaining the allowed counts."""
    try:
        check_pins(file_keys(path), double, single, first, what=os.path.basename(path))
    except (ValueError, ModelFileError) as e:
        return str(e)
    return True


def follow_pins(patcher, name, double, single, owner, first=0):
    """After ``wrap_model``: if blocks were pinned, tie their pins to ComfyUI's loads and
    unloads and to ``owner``'s next load."""
    from .patcher import stores_of

    store = stores_of(patcher)[-1]
    if not any(h.held for h in store.handles):
        return
    _follow_comfy(patcher, store)
    track_pins(store, owner)
    chosen = f"first {first} blocks" if first else f"{double} double / {single} single blocks"
    log.info("%s: %s pinned, %.0f MiB held", name, chosen, store.held_bytes() / 2**20)


def _follow_comfy(patcher, store):
    from comfy.patcher_extension import CallbacksMP

    def on_detach(p, unpatch_all):
        if unpatch_all:          # unloaded (not a clone taking over): let the pages go
            release_pins(store)

    def on_load(p, *args):
        restore_pins(store)

    patcher.add_callback_with_key(CallbacksMP.ON_DETACH, _CALLBACK_KEY, on_detach)
    patcher.add_callback_with_key(CallbacksMP.ON_LOAD, _CALLBACK_KEY, on_load)


_owned = {}   # owner token -> [weakref(WeightStore)] of its previous loads


def retire_pins(owner):
    """A new load by ``owner`` replaces its previous ones: release their pins for good.

    ComfyUI keeps a node's previous output alive (its cache) while the node runs again, so the
    old model's held pages would otherwise still count when the new one pins its blocks."""
    if owner is None:
        return
    for ref in _owned.pop(owner, []):
        store = ref()
        if store is not None:
            store.vbar_pins_retired = True
            release_pins(store)


def track_pins(store, owner):
    if owner is not None and any(h.held for h in store.handles):
        _owned.setdefault(owner, []).append(weakref.ref(store))
