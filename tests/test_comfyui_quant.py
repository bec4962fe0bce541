"""Real ComfyUI (COMFYUI_PATH): quantized safetensors through the VBAR loaders.

Each case runs tests/comfy_quant_checks.py in ComfyUI's interpreter: files of every comfy_quant
format ComfyUI defines (0.33+) and of scaled fp8, written by ComfyUI's own quantizers for the
tiny Flux and SD1.5 shapes (mixed: most layers stay bf16), sampled by the stock and the VBAR
loaders at an unlimited and a tiny budget, with and without LoRA: the latents must be equal
bit for bit. On a ComfyUI without comfy_quant (0.3.x), such files must be refused by name.
"""
import os
import subprocess

import pytest

from comfy_env import ROOT, comfy_paths, ensure_models

pytestmark = pytest.mark.comfyui


@pytest.mark.parametrize("case", ["errors", "flux_mixed", "flux_native_fp8", "flux_scaled", "sd15_mixed",
                                  "sd15_scaled"])
def test_quantized_files_match_stock(case, tmp_path):
    comfy, harness, python, models = comfy_paths()
    ensure_models(harness, python, models, comfy)
    env = dict(os.environ, PYTHONPATH=os.path.join(harness, "torchvision_stub"))
    out = subprocess.run([python, str(ROOT / "tests" / "comfy_quant_checks.py"), comfy,
                          str(tmp_path), models, case],
                         capture_output=True, text=True, timeout=1500, env=env)
    assert out.returncode == 0 and "ALL OK" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
