"""Real ComfyUI (COMFYUI_PATH): the pack against the installed ComfyUI's own classes and
functions, in-process (see comfy_compat_checks.py and comfy_dynamic_checks.py)."""
import os
import subprocess

import pytest

from comfy_env import ROOT, comfy_paths, ensure_models

pytestmark = pytest.mark.comfyui


def run_checks(script):
    comfy, harness, python, models = comfy_paths()
    ensure_models(harness, python, models, comfy)
    env = dict(os.environ, COMFY_HARNESS_MODELS=models,
               PYTHONPATH=os.path.join(harness, "torchvision_stub"))
    out = subprocess.run([python, str(ROOT / "tests" / script), comfy, str(ROOT)],
                         capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0 and "ALL OK" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_overrides_ops_and_partial_unload_against_installed_comfyui():
    out = run_checks("comfy_compat_checks.py")
    assert "CHECK every override takes every parameter of ComfyUI's method ok" in out
    assert "CHECK free_memory shrinks the VBAR model by what was asked ok" in out


def test_dynamic_vram_by_design():
    out = run_checks("comfy_dynamic_checks.py")
    assert "CHECK" in out
