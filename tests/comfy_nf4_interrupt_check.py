"""Run inside ComfyUI's interpreter (see test_comfyui_nf4.py): quantize on load reports through
ComfyUI's progress bar and stops on ComfyUI's interrupt, leaving nothing reserved, pinned or
half-built, and the same owner's previous model with its pins. The interrupt is raised from the
progress callback at step K, so the check does not depend on how fast the machine is.
Prints one 'CHECK name ok' line per check and a last JSON line; any failure raises."""
import json
import os
import sys

comfy_dir, models = sys.argv[1], sys.argv[2]
from comfy_boot import boot, check, interrupt_at  # noqa: E402  (this script's folder is on sys.path)

boot(comfy_dir)

import comfy.model_management as mm  # noqa: E402
import comfy.utils  # noqa: E402

from vbar_loaders.loaders.comfyui.nf4 import load_nf4_diffusion_model  # noqa: E402
from vbar_loaders.loaders.comfyui.progress import comfy_progress  # noqa: E402
from vbar_loaders.vram import get_pool  # noqa: E402

K = 3


def vbars(name):
    return [v for v in pool.stats()["vbars"] if v["name"] == name]


def pool_state():
    s = pool.stats()
    return {k: s[k] for k in ("reserved_bytes", "pinned_bytes", "resident_bytes")}


pool = get_pool("cpu", budget=8 << 30)
hooked = []
comfy.utils.set_progress_bar_global_hook(
    lambda value, total, preview=None, node_id=None: hooked.append((value, total)))
folder = os.path.join(models, "diffusion_models")
owner = ("VBARNF4DiffusionModelLoader", "interrupt-check")
nf4_name = "vbar_test_tiny_flux_nf4_v2.safetensors"
float_name = "tiny_flux.safetensors"

# The owner's previous model: an NF4 file, one double block pinned.
previous = load_nf4_diffusion_model(os.path.join(folder, nf4_name), 1, 0, owner=owner)
held = vbars(nf4_name)[0]["held_bytes"]
check("the previous model holds its pinned block", held > 0, held)
before = pool_state()

progress = interrupt_at(K, comfy_progress())
steps = progress.steps

try:
    load_nf4_diffusion_model(os.path.join(folder, float_name), 1, 1, quantize_on_load=True,
                             owner=owner, progress=progress)
    interrupted = False
except mm.InterruptProcessingException:
    interrupted = True
check("the load raised ComfyUI's InterruptProcessingException", interrupted)
check("it stopped at the step the interrupt came", len(steps) == K, steps)
check("the interrupt flag was consumed", not mm.processing_interrupted())
check("no VBAR was made for the interrupted model", not vbars(float_name), vbars(float_name))
after = pool_state()
check("nothing reserved, pinned or resident beyond the previous model", after == before,
      (before, after))
check("the previous model keeps its pins", vbars(nf4_name)[0]["held_bytes"] == held)

# The same load, not interrupted, through the default callback: ComfyUI's progress bar.
hooked.clear()
model = load_nf4_diffusion_model(os.path.join(folder, float_name), 1, 1, quantize_on_load=True,
                                 owner=owner)
total = steps[0][1]
check("the progress bar started at 0 and ended at the total",
      hooked and hooked[0] == (0, total) and hooked[-1] == (total, total), hooked[:2] + hooked[-2:])
check("the new model holds its pins", vbars(float_name)[0]["held_bytes"] > 0)
check("the previous model's pins were released by the new load",
      vbars(nf4_name)[0]["held_bytes"] == 0)
print(json.dumps({"steps_before_interrupt": len(steps), "progress_updates": len(hooked),
                  "total_parameters": total}))
