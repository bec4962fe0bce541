"""ComfyUI side of the VBAR VRAM Monitor node: collects a report, draws the residency map,
saves the preview like PreviewImage does. The numbers and layout come from vram/report.py.

Imports nothing heavy at module level: nodes.py needs ``ANY`` when ComfyUI loads the pack.
"""
import random
import threading

from .vram import report


class AnyType(str):
    """A socket type that matches every other type.

    ComfyUI validates a link with ``not received_type != input_type`` (comfy_execution/
    validation.py), so a str whose ``!=`` is always False accepts anything, in both directions;
    the frontend treats "*" as a wildcard for drawing links.
    """

    def __ne__(self, other):
        return False

    __hash__ = str.__hash__


ANY = AnyType("*")

_previous = {}          # key -> the snapshot the monitor saw last, for 'bytes moved since'
_previous_lock = threading.Lock()


def take_report(pools=None, key="node"):
    """(snapshot, text) of ``pools`` (default: every pool, ``vram.pools()``). The text's
    'moved in'/'streamed' count since the previous call with the same ``key``; that previous
    snapshot is replaced by this one."""
    snap = report.collect(pools)
    with _previous_lock:
        prev = _previous.get(key)
        _previous[key] = snap
    return snap, report.text_report(snap, prev)


def _font(size):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)   # Pillow >= 10.1: a scalable built-in font
    except TypeError:
        return ImageFont.load_default()


def draw_map(snap):
    """The residency map with its labels as uint8 (H, W, 3). Labels need Pillow (ComfyUI
    requires it); without it the bars and legend swatches are still there."""
    import numpy as np

    img, labels = report.residency_map(snap)
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return img
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    font = _font(12)
    for x, y, text, rgb, align in labels:
        if align == "right":
            x -= draw.textlength(text, font=font)
        draw.text((x, y + 1), text, fill=tuple(rgb), font=font)
    return np.asarray(pil).copy()


def to_image_tensor(img):
    """uint8 (H, W, 3) -> ComfyUI IMAGE: float32 [1, H, W, 3] in 0..1."""
    import torch

    return torch.from_numpy(img).to(torch.float32).div_(255.0).unsqueeze(0)


def save_preview(img, prefix="vbar_monitor"):
    """Write the map to ComfyUI's temp folder; the ``ui.images`` entry that shows it, or None
    when ComfyUI (folder_paths) is not there."""
    try:
        import folder_paths
        from PIL import Image
    except ImportError:
        return None
    import os

    temp = folder_paths.get_temp_directory()
    letters = "abcdefghijklmnopqrstuvwxyz"
    name = prefix + "_temp_" + "".join(random.choice(letters) for _ in range(5))
    h, w = img.shape[:2]
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(name, temp, w, h)
    file = f"{filename}_{counter:05}_.png"
    Image.fromarray(img).save(os.path.join(folder, file), compress_level=1)
    return {"filename": file, "subfolder": subfolder, "type": "temp"}


def run_monitor(passthrough=None, pools=None, save=True, key="node"):
    """What the node returns: the UI payload and (passthrough, text, image). ``key`` keeps one
    'previous snapshot' per monitor node."""
    snap, text = take_report(pools, key)
    img = draw_map(snap)
    ui = {"text": [text]}
    preview = save_preview(img) if save else None
    if preview is not None:
        ui["images"] = [preview]
    return {"ui": ui, "result": (passthrough, text, to_image_tensor(img))}
