"""Real ComfyUI (COMFYUI_PATH): VBAR loaders give byte-identical images to the stock loaders."""
import copy
import hashlib
import json
import os
import threading
import time

import pytest
import torch

from comfy_env import add_budget, comfy_paths, ensure_models, start_server

pytestmark = pytest.mark.comfyui

BUDGETS_GB = {"unlimited": 64.0, "half": 0.2, "tiny": 0.001}   # tiny < one page: all streams
LORA = "vbar_test_lora.safetensors"


@pytest.fixture(scope="module")
def server():
    comfy, harness, python, models = comfy_paths()
    ensure_models(harness, python, models, comfy)
    write_lora(models)
    srv = start_server(harness, comfy, python, models)
    yield srv
    srv.stop()


def write_lora(models):
    from safetensors.torch import save_file

    from vbar_loaders.loaders.files.safetensors_file import SafetensorsFile

    ckpt = SafetensorsFile(os.path.join(models, "checkpoints", "tiny_sd15.safetensors"))
    keys = [k for k in ckpt.keys() if k.endswith("attn1.to_q.weight")
            and k.startswith("model.diffusion_model.")][:2]
    g = torch.Generator().manual_seed(0)
    lora = {}
    for k in keys:
        out_f, in_f = ckpt.info(k)[1]
        name = "lora_unet_" + k[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
        lora[name + ".lora_up.weight"] = torch.randn(out_f, 4, generator=g) * 0.5
        lora[name + ".lora_down.weight"] = torch.randn(4, in_f, generator=g) * 0.5
    os.makedirs(os.path.join(models, "loras"), exist_ok=True)
    path = os.path.join(models, "loras", LORA)
    save_file(lora, f"{path}.{os.getpid()}.tmp")
    os.replace(f"{path}.{os.getpid()}.tmp", path)   # atomic: another test server may be reading it


def load_wf(srv, name):
    with open(os.path.join(srv.harness_dir, "workflows", name)) as f:
        return json.load(f)


def digest(result):
    """sha256 of the PNG's image data (IDAT chunks): the text chunk holds the prompt, whose node
    names differ between the stock and the VBAR workflow."""
    assert result.status == "success", result.errors
    assert len(result.files) == 1
    with open(result.files[0], "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    h, pos = hashlib.sha256(), 8
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        if data[pos + 4:pos + 8] == b"IDAT":
            h.update(data[pos + 8:pos + 8 + n])
        pos += 12 + n
    return h.hexdigest()


def with_lora(wf, model_ref, clip_ref):
    wf = copy.deepcopy(wf)
    wf["90"] = {"class_type": "LoraLoader", "inputs": {
        "model": model_ref, "clip": clip_ref, "lora_name": LORA,
        "strength_model": 1.0, "strength_clip": 1.0}}
    return wf


def sd15(srv, vbar, budget=None, lora=False):
    wf = load_wf(srv, "sd15_tiny_api.json")
    if vbar:
        wf["1"]["class_type"] = "VBARCheckpointLoader"
    model, clip = ["1", 0], ["1", 1]
    if lora:
        wf = with_lora(wf, model, clip)
        model, clip = ["90", 0], ["90", 1]
        wf["2"]["inputs"]["clip"] = wf["3"]["inputs"]["clip"] = clip
    if budget is not None:
        model = add_budget(wf, model, budget)
    wf["5"]["inputs"]["model"] = model
    return wf


def stats(srv):
    return srv.get("/vbar/stats")["pools"]["cpu"]


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_sd15_matches_stock_at_every_budget(server, lora):
    stock = digest(server.run(sd15(server, False, lora=lora), fresh_cache=True))
    for name, gb in BUDGETS_GB.items():
        got = digest(server.run(sd15(server, True, gb, lora=lora), fresh_cache=True))
        assert got == stock, f"budget {name}: image differs from ComfyUI's stock loader"


def classic_cache_flags(comfy):
    """ComfyUI 0.2x+ defaults to a RAM-pressure cache that drops earlier prompts' results, so a
    second prompt runs its loader again and gets a new model: nothing can stay resident across
    that, for the stock loader either. '--cache-classic' keeps outputs as 0.3.x did."""
    with open(os.path.join(comfy, "comfy", "cli_args.py")) as f:
        return ["--cache-classic"] if "--cache-classic" in f.read() else []


@pytest.fixture(scope="module")
def classic_server(server):
    comfy, harness, python, models = comfy_paths()
    flags = classic_cache_flags(comfy)
    if not flags or flags[0] in os.environ.get("COMFY_ARGS", ""):
        yield server                      # this server already keeps outputs
        return
    server.free()
    srv = start_server(harness, comfy, python, models, extra_args=flags)
    yield srv
    srv.stop()


def test_second_run_copies_nothing_for_resident_layers(classic_server):
    """Re-running a prompt whose loader ComfyUI kept: the resident layers are not copied again."""
    server = classic_server
    wf = sd15(server, True, BUDGETS_GB["unlimited"])
    assert server.run(wf, fresh_cache=True).status == "success"
    before = {v["name"]: v for v in stats(server)["vbars"]}
    wf["5"]["inputs"]["seed"] = 43        # only the sampler and decoder run again
    second = server.run(wf)
    assert second.status == "success"
    assert "1" not in second.node_seconds, "ComfyUI ran the loader again: its cache dropped it"
    after = {v["name"]: v for v in stats(server)["vbars"]}
    unet = "tiny_sd15.safetensors"
    b, a = before[unet], after[unet]
    detail = {k: (b[k], a[k]) for k in ("hits", "misses", "offloaded", "bytes_mapped", "evictions")}
    assert a["hits"] > b["hits"], detail
    assert a["misses"] == b["misses"] and a["bytes_mapped"] == b["bytes_mapped"], detail
    assert a["offloaded"] == b["offloaded"], detail


def flux(srv, vbar, budget=None):
    wf = load_wf(srv, "flux_tiny_api.json")
    if vbar:
        wf["1"]["class_type"] = "VBARDiffusionModelLoader"
    if budget is not None:
        wf["5"]["inputs"]["model"] = add_budget(wf, ["1", 0], budget)
    return wf


def test_flux_matches_stock_at_every_budget(server):
    stock = digest(server.run(flux(server, False), fresh_cache=True))
    for name, gb in (("unlimited", 64.0), ("half", 0.5), ("tiny", 0.001)):
        got = digest(server.run(flux(server, True, gb), fresh_cache=True))
        assert got == stock, f"budget {name}: image differs from ComfyUI's stock loader"
        if name == "tiny":
            assert stats(server)["offloaded"] > 0


def test_interrupt_mid_sampling_leaves_nothing_pinned(server):
    """Interrupting a prompt while layers stream and the prefetcher works ahead: no page stays
    pinned afterwards, and the next run gives the image an uninterrupted run gives."""
    want = digest(server.run(flux(server, True, 0.5), fresh_cache=True))
    server.free()
    wf = flux(server, True, 0.5)
    wf["5"]["inputs"]["steps"] = 60
    box = {}
    runner = threading.Thread(target=lambda: box.setdefault("result", server.run(wf)))
    runner.start()
    deadline = time.time() + 300
    while time.time() < deadline:          # until the model has run a few full steps
        pools = server.get("/vbar/stats")["pools"]
        flux_vbars = [v for v in pools.get("cpu", {}).get("vbars", [])
                      if v["name"] == "tiny_flux.safetensors"]
        if flux_vbars and flux_vbars[0]["faults"] > 150:
            break
        time.sleep(0.05)
    status, _ = server.post("/interrupt", {})
    assert status == 200
    runner.join(600)
    assert box["result"].status != "success", "the run ended before the interrupt: nothing tested"
    pool = stats(server)
    assert pool["pinned_bytes"] == 0, pool
    assert digest(server.run(flux(server, True, 0.5))) == want
