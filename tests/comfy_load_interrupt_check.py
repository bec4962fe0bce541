"""Run inside ComfyUI's interpreter (see test_comfyui_load_progress.py): the loads that take over
a second on a CPU (VBAR checkpoint, NF4 checkpoint, GGUF text encoder) report through ComfyUI's
progress bar and stop on ComfyUI's interrupt, leaving nothing reserved, pinned, mapped or
hooked. The interrupt is raised from the progress callback at step K (the first step, one
inside ComfyUI's build, one in the middle, the last before the VBARs are made), so nothing
depends on how fast the machine is.

Usage: python comfy_load_interrupt_check.py COMFYUI_DIR PINNED CASE=PATH [CASE=PATH ...]
(CASE: checkpoint, nf4_checkpoint, gguf_clip; PINNED: a float Flux diffusion model, loaded with
a pinned block by the NF4 loader's owner, whose pins an interrupted load must not take).
Prints one 'CHECK name ok' line per check and a
last JSON line {case: {"steps": N, "interrupted_at": [K, ...]}}; any failure raises."""
import gc
import json
import os
import sys

comfy_dir, pinned = sys.argv[1:3]
cases = dict(a.split("=", 1) for a in sys.argv[3:])
from comfy_boot import boot, interrupt_at  # noqa: E402  (this script's folder is on sys.path)

boot(comfy_dir)

import torch  # noqa: E402

import comfy.model_management as mm  # noqa: E402
import comfy.utils  # noqa: E402

from vbar_loaders.loaders.comfyui.gguf import load_text_encoders  # noqa: E402
from vbar_loaders.loaders.comfyui.loading import load_checkpoint, load_diffusion_model  # noqa: E402
from vbar_loaders.loaders.comfyui.nf4 import load_nf4_checkpoint  # noqa: E402
from vbar_loaders.loaders.comfyui.progress import comfy_progress  # noqa: E402
from vbar_loaders.vram import get_pool, report  # noqa: E402

OWNER = ("VBARNF4CheckpointLoader", "load-interrupt-check")
LOADERS = {"checkpoint": lambda p, progress=None: load_checkpoint(p, progress=progress),
           "nf4_checkpoint": lambda p, progress=None: load_nf4_checkpoint(p, owner=OWNER,
                                                                          progress=progress),
           "gguf_clip": lambda p, progress=None: load_text_encoders([p], progress=progress)}
hooks = torch.nn.modules.module._global_module_registration_hooks


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    print(f"CHECK {name} ok", flush=True)


def held_state():
    """What the pools hold, from the public snapshot API (report.collect)."""
    out = {}
    for dev, st in report.collect()["pools"].items():
        out[dev] = {k: st[k] for k in ("reserved_bytes", "pinned_bytes", "resident_bytes")}
        out[dev]["vbars"] = sorted((v["name"], v["reserved_bytes"], v["held_bytes"])
                                   for v in st["vbars"])
    return out


def opened(path):
    """Mappings and descriptors of this process on ``path``."""
    real = os.path.realpath(path)
    with open("/proc/self/maps") as f:
        maps = [line for line in f if line.rstrip().endswith(real)]
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == real:
                fds.append(fd)
        except OSError:
            pass
    return maps + fds


get_pool("cpu", budget=8 << 30)
hooked = []
comfy.utils.set_progress_bar_global_hook(
    lambda value, total, preview=None, node_id=None: hooked.append((value, total)))
summary = {}
for case, path in cases.items():
    load = LOADERS[case]
    # A full load first: how many steps there are; the bar runs from 0 to the end.
    hooked.clear()
    steps = []
    default = comfy_progress()

    def recording(done, total):
        steps.append((done, total))
        default(done, total)

    out = load(path, progress=recording)
    n = len(steps)
    check(f"{case}: {n} steps, from 0 to the total", n > 10 and steps[0][0] == 0
          and steps[-1][0] == steps[-1][1] and all(a[0] <= b[0] for a, b in zip(steps, steps[1:])),
          steps[:3] + steps[-3:])
    check(f"{case}: ComfyUI's bar went from 0 to the total", hooked and hooked[0][0] == 0
          and hooked[-1][0] == hooked[-1][1] == steps[-1][1], hooked[:2] + hooked[-2:])
    check(f"{case}: the bar was sent at most ~200 times", len(hooked) <= 203, len(hooked))
    # Most of the work is inside ComfyUI's build: many steps come from it.
    check(f"{case}: the loaded model has VBARs", any(
        v[0].startswith(os.path.basename(path)) for st in held_state().values() for v in st["vbars"]))
    parts = [out[0].model, out[1].cond_stage_model, out[2].first_stage_model] \
        if isinstance(out, tuple) else [out.cond_stage_model]
    check(f"{case}: no load hook is left on the model's modules",
          not any(m._load_state_dict_post_hooks for part in parts for m in part.modules()))
    del out, parts
    previous = None
    if case == "nf4_checkpoint":
        # The owner's previous model, one block pinned: an interrupted load keeps its pins.
        previous = load_diffusion_model(pinned, first_blocks=1, owner=OWNER)
        held = held_state()["cpu"]["pinned_bytes"]
        check(f"{case}: the owner's previous model holds its pinned block", held > 0, held)
    gc.collect()
    before = held_state()
    check(f"{case}: the file is released once the model is gone", not opened(path), opened(path))
    n_hooks = len(hooks)

    stops = sorted({1, 2, n // 2, n - 1, n})
    for k in stops:
        interrupting = interrupt_at(k, default)
        seen = interrupting.steps
        try:
            load(path, progress=interrupting)
            interrupted = False
        except mm.InterruptProcessingException:
            interrupted = True
        check(f"{case}@{k}: the load raised InterruptProcessingException", interrupted)
        check(f"{case}@{k}: it stopped at the step the interrupt came", len(seen) == k, len(seen))
        check(f"{case}@{k}: the interrupt flag was consumed", not mm.processing_interrupted())
        gc.collect()
        check(f"{case}@{k}: nothing reserved, pinned or resident is left", held_state() == before,
              (before, held_state()))
        check(f"{case}@{k}: the file is neither mapped nor open", not opened(path), opened(path))
        check(f"{case}@{k}: no module hook is left registered", len(hooks) == n_hooks,
              (n_hooks, len(hooks)))
    if previous is not None:
        load(path)    # not interrupted: the owner's new load takes the previous model's pins
        check(f"{case}: a finished load releases the owner's previous pins",
              held_state()["cpu"]["pinned_bytes"] == 0, held_state())
        del previous
    if case == "gguf_clip":
        # the step before the last is the token table's dequantization, after the build
        check(f"{case}: the last stops came after the build, in the token tables",
              steps[n - 2][1] > steps[0][1], (steps[0], steps[n - 2]))
    summary[case] = {"steps": n, "interrupted_at": stops}
print(json.dumps(summary))
