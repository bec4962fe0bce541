"""Real ComfyUI (COMFYUI_PATH): the memory manager sees true numbers and can take memory back."""
import os
import subprocess

import pytest

from comfy_env import ROOT, comfy_paths, ensure_models

pytestmark = pytest.mark.comfyui


def test_memory_manager_view_of_vbar_models():
    comfy, harness, python, models = comfy_paths()
    ensure_models(harness, python, models, comfy)
    env = dict(os.environ, COMFY_HARNESS_MODELS=models,
               PYTHONPATH=os.path.join(harness, "torchvision_stub"))
    out = subprocess.run([python, str(ROOT / "tests" / "comfy_inprocess_checks.py"), comfy, str(ROOT)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0 and "ALL OK" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
