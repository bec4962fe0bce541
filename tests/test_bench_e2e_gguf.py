"""benchmarks/bench_e2e_gguf.py in its quick mode, against a real ComfyUI (COMFYUI_PATH) and a
ComfyUI-GGUF checkout (COMFYUI_GGUF: a path; never part of this repository). About 2 minutes."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_bench_e2e_gguf_quick(tmp_path):
    from comfy_env import comfy_paths

    comfy, harness, python, base = comfy_paths()      # skips without COMFYUI_PATH
    gguf_src = os.environ.get("COMFYUI_GGUF")
    if not gguf_src or not os.path.isfile(os.path.join(gguf_src, "nodes.py")):
        pytest.skip("COMFYUI_GGUF not set to a ComfyUI-GGUF checkout")
    out = tmp_path / "e2e.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_e2e_gguf.py"),
                        "--comfyui-gguf", gguf_src, "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, COMFYUI_PATH=comfy, COMFY_PYTHON=python,
                                COMFY_HARNESS=harness, COMFY_HARNESS_MODELS=base))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(x["family"], x["budget"]) for x in rows] == [("wan", "unlimited"), ("wan", "1/10 model")]
    for x in rows:
        assert x["comfyui_gguf_s"] > 0 and x["pack_s"] > 0
        assert abs(x["ratio"] - x["pack_s"] / x["comfyui_gguf_s"]) < 1e-9
    assert "pack/ComfyUI-GGUF" in r.stdout
