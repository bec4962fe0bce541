"""Real ComfyUI (COMFYUI_PATH): the VBAR NF4 Diffusion Model Loader on the harness's tiny Flux.

Tiny NF4 files (v2: fp32 absmax; v1: double-quantized absmax) are written by quantizing the
harness's bf16 tiny_flux with nf4_state_dict_entries; the reference for each is ComfyUI's stock
UNETLoader on a bf16 safetensors file of its dequantized weights. On CPU both compute in fp32
from the same bf16 values (we expand to the weights' original bf16, then cast, as ComfyUI casts
the reference's bf16 weights), so the images must be byte-identical.
"""
import copy
import json
import os
import subprocess

import pytest
import torch

from vbar_loaders.loaders.runtime.blocks import flux_block_bytes

from comfy_env import (ROOT, add_budget, comfy_paths, ensure_models, free_until, run_settled,
                       start_server)
from test_comfyui_checkpoint import BUDGETS_GB, digest, load_wf, sd15, write_lora

pytestmark = pytest.mark.comfyui

TAG = "vbar-nf4-test-1"          # bump when the way the files are made changes
LAYOUTS = ("v2", "v1")
NF4 = "vbar_test_tiny_flux_nf4_{}.safetensors"
DEQUANT = "vbar_test_tiny_flux_nf4_{}_dequantized.safetensors"
STEPS = 2                        # every CPU step expands all 545 M weights: keep the runs short


@pytest.fixture(scope="module")
def server():
    comfy, harness, python, models = comfy_paths()
    ensure_models(harness, python, models, comfy)
    write_nf4_files(models)
    write_nf4_checkpoint(models)
    write_sd15_nf4_checkpoint(models)
    write_lora(models)
    srv = start_server(harness, comfy, python, models)
    yield srv
    srv.stop()


def _fresh(path):
    from vbar_loaders.loaders.files.safetensors_file import SafetensorsFile

    if not os.path.isfile(path):
        return False
    with SafetensorsFile(path, verify=False) as f:
        return (f.metadata or {}).get("vbar_test") == TAG


def write_nf4_files(models):
    """Quantize every Linear (2-D) weight of tiny_flux; write the NF4 file and its dequantized
    bf16 twin. Kept between runs (tagged), ~1.3 GB per layout."""
    from safetensors.torch import save_file

    from vbar_loaders.loaders.nf4.codec import dequantize_nf4, nf4_state_dict_entries, parse_quant_state
    from vbar_loaders.loaders.files.safetensors_file import SafetensorsFile

    folder = os.path.join(models, "diffusion_models")
    for layout in LAYOUTS:
        nf4_path, deq_path = (os.path.join(folder, n.format(layout)) for n in (NF4, DEQUANT))
        if _fresh(nf4_path) and _fresh(deq_path):
            continue
        src = SafetensorsFile(os.path.join(folder, "tiny_flux.safetensors"))
        nf4, deq = {}, {}
        for k in src.keys():
            t = src.get_tensor(k)
            if k.endswith(".weight") and t.ndim == 2:
                prefix = k[: -len(".weight")]
                entries = nf4_state_dict_entries(prefix, t, compress_statistics=(layout == "v1"))
                nf4.update(entries)
                deq[k] = dequantize_nf4(parse_quant_state(entries, prefix, nf4_path), torch.bfloat16)
            else:
                nf4[k] = deq[k] = t.clone()
        meta = {"vbar_test": TAG}
        save_file(deq, deq_path, metadata=meta)
        save_file(nf4, nf4_path, metadata=meta)


CKPT = "vbar_test_tiny_flux_nf4_v2_ckpt.safetensors"
SD15_NF4 = "vbar_test_tiny_sd15_nf4_ckpt.safetensors"
SD15_DEQUANT = "vbar_test_tiny_sd15_nf4_ckpt_dequantized.safetensors"


def write_sd15_nf4_checkpoint(models):
    """tiny_sd15 with its UNet's Linear weights in NF4 (v2) and its CLIP-L and VAE as they are
    (float16): an NF4 checkpoint with a text encoder, which the harness's Flux cannot have (no
    tiny T5). Plus its dequantized twin, the stock reference. Written atomically, kept (tagged)."""
    from safetensors.torch import save_file

    from vbar_loaders.loaders.nf4.codec import dequantize_nf4, nf4_state_dict_entries, parse_quant_state
    from vbar_loaders.loaders.files.safetensors_file import SafetensorsFile

    folder = os.path.join(models, "checkpoints")
    paths = [os.path.join(folder, n) for n in (SD15_NF4, SD15_DEQUANT)]
    if all(_fresh(p) for p in paths):
        return
    src = SafetensorsFile(os.path.join(folder, "tiny_sd15.safetensors"))
    nf4, deq = {}, {}
    for k in src.keys():
        t = src.get_tensor(k)
        if k.startswith("model.diffusion_model.") and k.endswith(".weight") and t.ndim == 2:
            prefix = k[: -len(".weight")]
            entries = nf4_state_dict_entries(prefix, t)
            nf4.update(entries)
            deq[k] = dequantize_nf4(parse_quant_state(entries, prefix, paths[0]), t.dtype)
        else:
            nf4[k] = deq[k] = t.clone()
    for path, sd in zip(paths, (nf4, deq)):
        tmp = f"{path}.{os.getpid()}.tmp"
        save_file(sd, tmp, metadata={"vbar_test": TAG})
        os.replace(tmp, path)


def write_nf4_checkpoint(models):
    """A Flux NF4 checkpoint as the popular files lay it out (model.diffusion_model.*, vae.*),
    without text encoders (the harness has no tiny T5)."""
    from safetensors.torch import save_file

    from vbar_loaders.loaders.files.safetensors_file import SafetensorsFile

    path = os.path.join(models, "checkpoints", CKPT)
    if _fresh(path):
        return
    unet = SafetensorsFile(os.path.join(models, "diffusion_models", NF4.format("v2")))
    vae = SafetensorsFile(os.path.join(models, "vae", "tiny_flux_ae.safetensors"))
    sd = {"model.diffusion_model." + k: unet.get_tensor(k).clone() for k in unet.keys()}
    sd.update({"vae." + k: vae.get_tensor(k).clone() for k in vae.keys()})
    save_file(sd, path, metadata={"vbar_test": TAG})


def flux(srv, unet, nf4=True, double=0, single=0, quantize_on_load=True, budget=None):
    wf = load_wf(srv, "flux_tiny_api.json")
    wf["5"]["inputs"]["steps"] = STEPS
    if nf4:
        wf["1"] = {"class_type": "VBARNF4DiffusionModelLoader", "inputs": {
            "unet_name": unet, "double_blocks_cuda_size": double, "single_blocks_cuda_size": single,
            "quantize_on_load": quantize_on_load}}
    else:
        wf["1"]["inputs"]["unet_name"] = unet
    if budget is not None:
        wf["5"]["inputs"]["model"] = add_budget(wf, ["1", 0], budget)
    return wf


def vbar_stats(srv, name):
    return [v for v in srv.get("/vbar/stats")["pools"]["cpu"]["vbars"] if v["name"] == name]


@pytest.fixture(scope="module")
def stock(server):
    """Image digests of ComfyUI's own UNETLoader on the dequantized files (and on tiny_flux)."""
    out = {}
    for layout in LAYOUTS:
        out[layout] = digest(run_settled(server, flux(server, DEQUANT.format(layout), nf4=False)))
    out["bf16"] = digest(run_settled(server, flux(server, "tiny_flux.safetensors", nf4=False)))
    assert len(set(out.values())) == 3   # three different weight sets: three different images
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nf4_file_matches_stock_on_dequantized_weights(server, stock, layout):
    name = NF4.format(layout)
    counts = [(0, 0), (1, 0), (1, 1)] if layout == "v2" else [(1, 1)]
    for double, single in counts:
        r = run_settled(server, flux(server, name, double=double, single=single))
        assert digest(r) == stock[layout], f"{layout} pinned {double}+{single}: differs from stock"
        # The model that just ran is the highest-priority VBAR of that name; an older one still
        # alive (ComfyUI frees lazily) holds nothing: its pins were released by the new load.
        vbars = vbar_stats(server, name)
        assert vbars and all(v["held_bytes"] == 0 for v in vbars[1:])
        # v2 blocks are exactly the tooltip's NF4 size (but fp32 biases on CPU); v1 has 8-bit absmax.
        b = flux_block_bytes()
        want = double * b["double"]["nf4"] + single * b["single"]["nf4"]
        assert 0.9 * want <= vbars[0]["held_bytes"] <= 1.01 * want, (double, single, vbars[0])


def test_quantize_on_load_equals_the_v2_file(server, stock):
    r = run_settled(server, flux(server, "tiny_flux.safetensors", double=1, single=1))
    assert digest(r) == stock["v2"]
    # Off: the bf16 weights as they are, still with pinned blocks.
    r = server.run(flux(server, "tiny_flux.safetensors", double=1, single=0, quantize_on_load=False),
                   fresh_cache=True)
    assert digest(r) == stock["bf16"]


def test_counts_above_the_model_are_rejected_before_the_run(server):
    r = run_settled(server, flux(server, NF4.format("v2"), double=2, single=0))
    assert r.status == "rejected", r.errors
    text = " ".join(r.errors)
    assert "has 1 double and 1 single blocks" in text and "got 2 and 0" in text, text


def test_rerun_with_other_counts_under_a_tight_budget(server):
    """Re-running the node with other counts while ComfyUI still caches the previous MODEL: the
    previous pins are released, so a budget that fits one set of pins is enough."""
    name = NF4.format("v2")

    def run(double, single, budget=0.4, **kw):
        wf = flux(server, name, double=double, single=single, budget=budget)
        wf["5"]["inputs"]["steps"] = 1          # images are compared elsewhere; this is about pins
        r = server.run(wf, **kw)
        assert r.ok, r.errors
        return [v["held_bytes"] for v in vbar_stats(server, name)]

    # 0.4 GB: pins of 1 double + 1 single (~259 MiB) fit once, not twice.
    run(1, 1, fresh_cache=True)
    b = flux_block_bytes()
    for double, single in ((1, 0), (0, 1), (1, 1)):        # no /free: the old MODEL stays cached
        held = run(double, single)
        want = double * b["double"]["nf4"] + single * b["single"]["nf4"]
        assert 0.99 * want <= held[0] <= 1.01 * want and not any(held[1:]), held
    run(0, 0, budget=64.0, fresh_cache=True)               # leave the budget open


def test_pins_follow_comfyui_unloading_and_loading_the_model(server):
    name = NF4.format("v2")
    wf = flux(server, name, double=1, single=0)
    wf["5"]["inputs"]["steps"] = 1
    assert run_settled(server, wf).status == "success"
    # ComfyUI may apply that /free only after the run it raced with: run once more so the
    # MODEL is surely in its cache.
    wf["5"]["inputs"]["seed"] = 44
    assert server.run(wf).status == "success"
    assert vbar_stats(server, name)[0]["held_bytes"] > 0
    # ComfyUI unloads the model; the MODEL output stays cached.
    free_until(server, lambda: vbar_stats(server, name)[0]["held_bytes"] == 0)
    assert vbar_stats(server, name)[0]["held_bytes"] == 0, [
        {k: v for k, v in e.items() if not isinstance(v, (list, dict))} for e in vbar_stats(server, name)]
    wf["5"]["inputs"]["seed"] = 43                         # the cached MODEL samples again
    r = server.run(wf)
    assert r.status == "success" and "1" in r.cached_nodes, (r.errors, r.cached_nodes)
    assert vbar_stats(server, name)[0]["held_bytes"] > 0


LORA = "vbar_test_flux_lora.safetensors"


def write_flux_lora(models):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    lora = {}
    for layer, (out_f, in_f) in {"double_blocks_0_img_attn_qkv": (9216, 3072),
                                 "single_blocks_0_linear2": (3072, 15360)}.items():
        lora[f"lora_unet_{layer}.lora_up.weight"] = torch.randn(out_f, 4, generator=g) * 0.05
        lora[f"lora_unet_{layer}.lora_down.weight"] = torch.randn(4, in_f, generator=g) * 0.05
    os.makedirs(os.path.join(models, "loras"), exist_ok=True)
    save_file(lora, os.path.join(models, "loras", LORA))


def test_lora_on_nf4_matches_stock(server):
    """LoRA patches apply to the expanded weight, pinned (double 0) or streamed (single 0)."""
    write_flux_lora(os.environ.get("COMFY_HARNESS_MODELS") or comfy_paths()[3])

    def with_lora(wf):
        wf = copy.deepcopy(wf)
        wf["90"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["1", 0], "lora_name": LORA, "strength_model": 1.0}}
        wf["5"]["inputs"]["model"] = ["90", 0]
        return wf

    stock = digest(server.run(with_lora(flux(server, DEQUANT.format("v2"), nf4=False)), fresh_cache=True))
    plain = digest(run_settled(server, flux(server, DEQUANT.format("v2"), nf4=False)))
    assert stock != plain                                  # the LoRA does change the image
    got = digest(server.run(with_lora(flux(server, NF4.format("v2"), double=1, single=0)),
                            fresh_cache=True))
    assert got == stock


def test_nf4_checkpoint_loader_matches_stock(server, stock):
    wf = flux(server, CKPT, double=1, single=1)
    wf["1"] = {"class_type": "VBARNF4CheckpointLoader", "inputs": {
        "ckpt_name": CKPT, "double_blocks_cuda_size": 1, "single_blocks_cuda_size": 1}}
    wf["7"]["inputs"]["vae"] = ["1", 2]                    # the checkpoint's own VAE
    del wf["6"]
    assert digest(run_settled(server, wf)) == stock["v2"]
    assert vbar_stats(server, CKPT)[0]["held_bytes"] > 0
    wf["1"]["inputs"]["single_blocks_cuda_size"] = 3
    r = server.run(wf)
    assert r.status == "rejected" and "has 1 double and 1 single blocks" in " ".join(r.errors)


def test_quantize_on_load_reports_progress_and_stops_on_interrupt():
    """In ComfyUI's interpreter: the interrupt flag set from the progress callback at step 3
    stops quantize-on-load there (no timing involved); nothing is left reserved or pinned, the
    owner's previous model keeps its pins; an uninterrupted load drives ComfyUI's progress bar
    from 0 to the total. See comfy_nf4_interrupt_check.py."""
    comfy, harness, python, models = comfy_paths()
    ensure_models(harness, python, models, comfy)
    write_nf4_files(models)
    env = dict(os.environ, PYTHONPATH=os.path.join(harness, "torchvision_stub"),
               COMFY_HARNESS_MODELS=models)
    r = subprocess.run([python, str(ROOT / "tests" / "comfy_nf4_interrupt_check.py"), comfy, models],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["steps_before_interrupt"] == 3 and out["total_parameters"] > 500e6, out


def test_nf4_checkpoint_clip_with_text_encoder_lora_matches_stock(server):
    """The NF4 checkpoint loader's CLIP (and its NF4 UNet) with a LoRA on both (text-encoder
    layers at strength_clip 0.6): the stock checkpoint loader's image on the dequantized twin,
    at every budget."""
    def wf(vbar, budget=None):
        w = sd15(server, False, budget, lora=True)
        if vbar:
            w["1"] = {"class_type": "VBARNF4CheckpointLoader", "inputs": {
                "ckpt_name": SD15_NF4, "double_blocks_cuda_size": 0, "single_blocks_cuda_size": 0}}
        else:
            w["1"]["inputs"]["ckpt_name"] = SD15_DEQUANT
        return w

    stock = digest(run_settled(server, wf(False)))
    for name, gb in BUDGETS_GB.items():
        got = digest(run_settled(server, wf(True, gb)))
        assert got == stock, f"budget {name}: image differs from the stock loader"
    run_settled(server, wf(True, 64.0))           # leave the budget open
