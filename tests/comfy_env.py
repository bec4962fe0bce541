"""Locate a real ComfyUI for integration tests; skip cleanly when there is none.

COMFYUI_PATH: a ComfyUI checkout (required). COMFY_PYTHON: its interpreter (default
<COMFYUI_PATH>/../venv/bin/python). COMFY_HARNESS: the harness folder (default ../shared/
comfy_harness beside this repository). COMFY_HARNESS_MODELS: the tiny models (written if absent).
COMFY_ARGS: extra ComfyUI flags.
"""
import hashlib
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def comfy_paths():
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        pytest.skip("COMFYUI_PATH not set: no real ComfyUI to test against")
    if not os.path.isfile(os.path.join(comfy, "main.py")):
        pytest.fail(f"COMFYUI_PATH={comfy} has no main.py")
    harness = os.environ.get("COMFY_HARNESS") or str(ROOT.parent / "shared" / "comfy_harness")
    if not os.path.isfile(os.path.join(harness, "harness.py")):
        pytest.skip(f"comfy harness not found at {harness} (set COMFY_HARNESS)")
    python = os.environ.get("COMFY_PYTHON") or os.path.join(os.path.dirname(os.path.abspath(comfy)),
                                                            "venv", "bin", "python")
    models = os.environ.get("COMFY_HARNESS_MODELS") or os.path.join(
        os.path.dirname(os.path.abspath(comfy)), "models")
    return comfy, harness, python, models


def ensure_models(harness, python, models, comfy):
    need = ["checkpoints/tiny_sd15.safetensors", "diffusion_models/tiny_flux.safetensors",
            "vae/tiny_flux_ae.safetensors"]
    if all(os.path.isfile(os.path.join(models, n)) for n in need):
        return
    env = dict(os.environ, COMFYUI_DIR=comfy, COMFY_HARNESS_MODELS=models)
    subprocess.run([python, os.path.join(harness, "tiny_models.py")], check=True, env=env,
                   cwd=harness, timeout=600)


def start_server(harness, comfy, python, models, extra_nodes=(), **kw):
    """``extra_nodes``: test-only custom node folders loaded beside the pack (tests/comfy_nodes)."""
    sys.path.insert(0, harness)
    from harness import ComfyServer

    class Server(ComfyServer):
        def command(self, extra_paths):
            return drop_unknown_flags(super().command(extra_paths), self.comfy_dir)

    # COMFY_ARGS: extra ComfyUI flags for every server of the suite (e.g. --cache-classic)
    kw["extra_args"] = shlex.split(os.environ.get("COMFY_ARGS", "")) + list(kw.get("extra_args", ()))
    srv = Server(comfy, custom_nodes=[str(ROOT), *map(str, extra_nodes)], models_dir=models,
                 python=python, **kw)
    srv.harness_dir = harness   # where its workflows are (see load_wf)
    srv.start()
    failures = [f for f in srv.import_failures() if ROOT.name in str(f) or str(ROOT) in str(f)]
    if failures:
        srv.stop()
        raise AssertionError(f"custom node import failed: {failures}\n{srv.log_tail(80)}")
    return srv


# Flags the harness always passes that older ComfyUIs do not know (argparse would exit), with
# how many values each takes: --database-url came with ComfyUI's database (after 0.3.40).
_OPTIONAL_FLAGS = {"--database-url": 1}


def drop_unknown_flags(cmd, comfy_dir):
    """``cmd`` without the optional flags this ComfyUI's comfy/cli_args.py does not define."""
    with open(os.path.join(comfy_dir, "comfy", "cli_args.py"), encoding="utf-8") as f:
        known = f.read()
    out, i = [], 0
    while i < len(cmd):
        n = _OPTIONAL_FLAGS.get(cmd[i])
        if n is not None and f'"{cmd[i]}"' not in known:
            i += 1 + n
            continue
        out.append(cmd[i])
        i += 1
    return out


def add_budget(wf, model, budget_gb, node="91"):
    """Put VBAR Set Budget after ``model`` (an API-format link); returns the new model link."""
    wf[node] = {"class_type": "VBARSetBudget", "inputs": {
        "model": model, "budget_gb": budget_gb, "headroom_gb": 0.0}}
    return [node, 0]


def run_settled(srv, wf, **kw):
    """Run ``wf`` from a fresh cache with ComfyUI's unload done *before* it.

    ComfyUI applies POST /free after the next prompt it executes, so ``run(fresh_cache=True)``
    can unload the very models that prompt loaded, racing with a test that reads their
    residency afterwards. A trivial prompt (the monitor node, an output node that loads
    nothing) takes that unload first."""
    srv.free()
    flush = srv.run({"vbar_flush": {"class_type": "VBARVRAMMonitor", "inputs": {}}})
    assert flush.status == "success", flush.errors
    return srv.run(wf, **kw)


def free_until(srv, done, timeout=30, unload_models=True, free_memory=False):
    """POST /free every second until ``done()`` or ``timeout`` s; returns ``done()``.

    ComfyUI's worker reads /free's flags only when it wakes; a /free that lands while it is busy
    between prompts (its gc.collect() after a prompt, slow on a loaded box) is no wake-up, and
    0.33's worker then sleeps up to 1000 s before it looks (main.py prompt_worker). Posting
    again wakes it; a prompt would too, but on 0.33 it would also drop the earlier prompts'
    cached outputs."""
    import time

    deadline = time.time() + timeout
    while True:
        srv.free(unload_models=unload_models, free_memory=free_memory)
        if done() or time.time() > deadline:
            return done()
        time.sleep(1.0)


def image_digest(paths):
    """sha256 over the image data (IDAT chunks) of the PNGs at ``paths``, in the order given;
    the PNG's text chunk holds the prompt, which names the loader, so it is left out."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", path
        pos = 8
        while pos < len(data):
            n = int.from_bytes(data[pos:pos + 4], "big")
            if data[pos + 4:pos + 8] == b"IDAT":
                h.update(data[pos + 8:pos + 8 + n])
            pos += 12 + n
    return h.hexdigest()
