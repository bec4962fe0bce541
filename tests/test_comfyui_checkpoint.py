"""Real ComfyUI (COMFYUI_PATH): VBAR loaders give byte-identical images to the stock loaders."""
import copy
import json
import os
import threading
import time

import pytest
import torch

from comfy_env import add_budget, comfy_paths, ensure_models, image_digest, start_server

pytestmark = pytest.mark.comfyui

BUDGETS_GB = {"unlimited": 64.0, "half": 0.2, "tiny": 0.001}   # tiny < one page: all streams
LORA = "vbar_test_lora_unet_te.safetensors"
TE_LAYERS = [f"lora_te_text_model_encoder_layers_0_self_attn_{p}_proj" for p in ("q", "k", "v", "out")]
STRENGTH_CLIP = 0.6     # not 1.0: the patch must round exactly as ComfyUI's does


@pytest.fixture(scope="module")
def server():
    comfy, harness, python, models = comfy_paths()
    ensure_models(harness, python, models, comfy)
    write_lora(models)
    srv = start_server(harness, comfy, python, models)
    yield srv
    srv.stop()


def write_lora(models):
    """A kohya LoRA, rank 4: two UNet attention projections and the four attention projections
    of CLIP-L's first layer (the text-encoder part is what a CLIP's patching must get right).
    Written atomically: other test runs may read the shared models folder meanwhile."""
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
    for name in TE_LAYERS:                      # CLIP-L: width 768
        lora[name + ".lora_up.weight"] = torch.randn(768, 4, generator=g) * 0.5
        lora[name + ".lora_down.weight"] = torch.randn(4, 768, generator=g) * 0.5
    folder = os.path.join(models, "loras")
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{LORA}.{os.getpid()}.tmp")
    save_file(lora, tmp)
    os.replace(tmp, os.path.join(folder, LORA))


def load_wf(srv, name):
    with open(os.path.join(srv.harness_dir, "workflows", name)) as f:
        return json.load(f)


def digest(result):
    """sha256 of the PNG's image data (IDAT chunks): the text chunk holds the prompt, whose node
    names differ between the stock and the VBAR workflow."""
    assert result.status == "success", result.errors
    assert len(result.files) == 1
    return image_digest(result.files)


def with_lora(wf, model_ref, clip_ref, strength_model=1.0, strength_clip=STRENGTH_CLIP):
    wf = copy.deepcopy(wf)
    wf["90"] = {"class_type": "LoraLoader", "inputs": {
        "model": model_ref, "clip": clip_ref, "lora_name": LORA,
        "strength_model": strength_model, "strength_clip": strength_clip}}
    return wf


def sd15(srv, vbar, budget=None, lora=False, strength_clip=STRENGTH_CLIP):
    wf = load_wf(srv, "sd15_tiny_api.json")
    if vbar:
        wf["1"]["class_type"] = "VBARCheckpointLoader"
    model, clip = ["1", 0], ["1", 1]
    if budget is not None:
        # Before the LoRA, so that the text encoders (which need the LoRA's CLIP) run under it too.
        model = add_budget(wf, model, budget)
    if lora:
        wf = with_lora(wf, model, clip, strength_clip=strength_clip)
        model, clip = ["90", 0], ["90", 1]
        wf["2"]["inputs"]["clip"] = wf["3"]["inputs"]["clip"] = clip
    wf["5"]["inputs"]["model"] = model
    return wf


def stats(srv):
    return srv.get("/vbar/stats")["pools"]["cpu"]


def newest_vbars(srv):
    """{name: stats} of the VBAR each name had last: the highest-priority one (listed first).
    Models of earlier prompts that ComfyUI has not freed yet keep VBARs of the same name."""
    out = {}
    for v in stats(srv)["vbars"]:
        out.setdefault(v["name"], v)
    return out


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_sd15_matches_stock_at_every_budget(server, lora):
    """With the LoRA: UNet and text-encoder layers patched (strength_clip 0.6)."""
    stock = digest(server.run(sd15(server, False, lora=lora), fresh_cache=True))
    if lora:
        unet_only = digest(server.run(sd15(server, False, lora=True, strength_clip=0.0),
                                      fresh_cache=True))
        assert unet_only != stock, "the text-encoder part of the LoRA changes nothing: untested"
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
    before = newest_vbars(server)
    wf["5"]["inputs"]["seed"] = 43        # only the sampler and decoder run again
    second = server.run(wf)
    assert second.status == "success"
    assert "1" not in second.node_seconds, "ComfyUI ran the loader again: its cache dropped it"
    after = newest_vbars(server)
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
