"""The loads that take over a second on a CPU report through ComfyUI's progress bar and stop on
ComfyUI's interrupt, in ComfyUI's own interpreter (see comfy_load_interrupt_check.py).

Measured on the 2-core test machine, ComfyUI 0.33.0, files in the page cache: the VBAR
checkpoint loader on tiny SD1.5 1.4 s (1.0 s of it ComfyUI copying the VAE's weights), the NF4
checkpoint loader on its NF4 version 2.1 s, the GGUF CLIP loader on CLIP-L Q8_0 1.8 s (1.2 s
dequantizing the token table). The diffusion-model loaders (tiny Flux safetensors, GGUF, NF4
without quantize on load) take 0.02-0.1 s: they adopt the file's tensors without reading them.
"""
import json
import os
import subprocess

import pytest
from gguf import GGMLQuantizationType as QT

from comfy_env import ROOT, comfy_paths, ensure_models
from gguf_helpers import convert_safetensors
from test_comfyui_nf4 import SD15_NF4, write_sd15_nf4_checkpoint

pytestmark = pytest.mark.comfyui


def test_long_loads_report_progress_and_stop_on_interrupt(tmp_path):
    """Each load is interrupted from its progress callback at the first step, the second
    (inside ComfyUI's build), the middle, the one before the last and the last (after the
    build, before any VBAR is made): it stops at that step and leaves the pools, the owner's
    pinned blocks, the file (neither mapped nor open) and torch's hooks as they were. An
    uninterrupted load drives ComfyUI's progress bar from 0 to its total."""
    comfy, harness, python, models = comfy_paths()
    ensure_models(harness, python, models, comfy)
    write_sd15_nf4_checkpoint(models)
    clip = tmp_path / "tiny_clip_l_Q8_0.gguf"
    convert_safetensors(os.path.join(models, "text_encoders", "tiny_clip_l.safetensors"), clip,
                        QT.Q8_0, arch="clip")
    env = dict(os.environ, PYTHONPATH=os.path.join(harness, "torchvision_stub"),
               COMFY_HARNESS_MODELS=models)
    cases = {"checkpoint": os.path.join(models, "checkpoints", "tiny_sd15.safetensors"),
             "nf4_checkpoint": os.path.join(models, "checkpoints", SD15_NF4),
             "gguf_clip": str(clip)}
    r = subprocess.run([python, str(ROOT / "tests" / "comfy_load_interrupt_check.py"), comfy,
                        os.path.join(models, "diffusion_models", "tiny_flux.safetensors"),
                        *(f"{k}={v}" for k, v in cases.items())],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out) == set(cases)
    for case, got in out.items():
        assert got["steps"] > 50 and len(got["interrupted_at"]) == 5, (case, got)
