"""Real ComfyUI (COMFYUI_PATH): the VBAR GGUF loaders give the same images as ComfyUI's stock
loaders fed the same weights dequantized by gguf-py (written as float32 safetensors).

The tiny Flux is converted to GGUF Q8_0 and Q4_K (1-D tensors F32, rows that do not fit a
Q4_K block Q8_0, as city96's converter does). On CPU the model computes in float32, and our
dequantization is bit-identical to gguf-py's in float32, so the PNGs must be byte-identical:
plain, with the weights streamed at a tiny budget, and with a LoRA on two Flux linears.
Text encoders: the tiny CLIP-L through the SD1.5 workflow, and (in-process, see
comfy_gguf_te_check.py) CLIP-L + a small llama.cpp-named T5 for Flux, GGUF and safetensors mixed.
"""
import json
import os
import subprocess

import pytest
import torch
from gguf import GGMLQuantizationType as QT

from vbar_loaders.loaders.runtime.blocks import flux_block_bytes

from comfy_env import ROOT, add_budget, comfy_paths, ensure_models, run_settled, start_server
from gguf_helpers import convert_safetensors, write_reference_safetensors
from test_comfyui_checkpoint import LORA as TE_LORA, STRENGTH_CLIP, digest, load_wf, stats, write_lora

pytestmark = pytest.mark.comfyui

FLUX = "diffusion_models/tiny_flux.safetensors"
SD15 = "checkpoints/tiny_sd15.safetensors"
CLIP_L = "text_encoders/tiny_clip_l.safetensors"
LORA = "vbar_test_gguf_flux_lora.safetensors"
LORA_TARGETS = {"double_blocks.0.img_attn.qkv": (3 * 3072, 3072),
                "single_blocks.0.linear1": (3 * 3072 + 4 * 3072, 3072)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A models folder: links to the harness's tiny models plus the GGUF files, their
    dequantized references and the LoRA."""
    comfy, harness, python, base = comfy_paths()
    ensure_models(harness, python, base, comfy)
    probe = subprocess.run([python, "-c", "import gguf"], capture_output=True)
    if probe.returncode:
        pytest.skip(f"the gguf package is not installed for {python} (pip install gguf)")
    d = tmp_path_factory.mktemp("gguf_models")
    for sub in ("checkpoints", "vae", "diffusion_models", "text_encoders", "loras"):
        os.makedirs(d / sub)
    for rel in ("checkpoints/tiny_sd15.safetensors", "vae/tiny_flux_ae.safetensors"):
        os.symlink(os.path.join(base, rel), d / rel)
    for qt in (QT.Q8_0, QT.Q4_K):
        gguf_path = d / "diffusion_models" / f"tiny_flux_{qt.name}.gguf"
        convert_safetensors(os.path.join(base, FLUX), gguf_path, qt, arch="flux")
        ref = d / "diffusion_models" / f"tiny_flux_{qt.name}_ref.safetensors"
        write_reference_safetensors(gguf_path, ref)
    sd1 = d / "diffusion_models" / "tiny_sd15_unet_Q8_0.gguf"
    convert_safetensors(os.path.join(base, SD15), sd1, QT.Q8_0, arch="sd1",
                        prefix="model.diffusion_model.", flatten_conv=True)
    write_reference_safetensors(sd1, d / "diffusion_models" / "tiny_sd15_unet_Q8_0_ref.safetensors")
    clip = d / "text_encoders" / "tiny_clip_l_Q8_0.gguf"
    convert_safetensors(os.path.join(base, CLIP_L), clip, QT.Q8_0, arch="clip")
    write_reference_safetensors(clip, d / "text_encoders" / "tiny_clip_l_Q8_0_ref.safetensors")
    write_flux_lora(d / "loras" / LORA)
    return d


def write_flux_lora(path):
    """ComfyUI's Flux LoRA key format, rank 4, on two linears (shape-checked by ComfyUI)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    lora = {}
    for key, (out_f, in_f) in LORA_TARGETS.items():
        lora[f"diffusion_model.{key}.lora_up.weight"] = torch.randn(out_f, 4, generator=g) * 0.05
        lora[f"diffusion_model.{key}.lora_down.weight"] = torch.randn(4, in_f, generator=g) * 0.05
    save_file(lora, str(path))


@pytest.fixture(scope="module")
def server(models):
    comfy, harness, python, _ = comfy_paths()
    srv = start_server(harness, comfy, python, str(models))
    yield srv
    srv.stop()


def flux(srv, unet, vbar, budget=None, lora=False, pins=None):
    wf = load_wf(srv, "flux_tiny_api.json")
    wf["5"]["inputs"]["steps"] = 2          # the comparison needs no more; halves the run time
    if vbar:
        wf["1"] = {"class_type": "VBARGGUFDiffusionModelLoader", "inputs": {
            "unet_name": unet, "dequant_dtype": "default", "patch_dtype": "default"}}
        if pins is not None:
            wf["1"]["inputs"].update(double_blocks_cuda_size=pins[0], single_blocks_cuda_size=pins[1])
    else:
        wf["1"]["inputs"]["unet_name"] = unet
    model = ["1", 0]
    if lora:
        wf["90"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": model, "lora_name": LORA, "strength_model": 1.0}}
        model = ["90", 0]
    if budget is not None:
        model = add_budget(wf, model, budget)
    wf["5"]["inputs"]["model"] = model
    return wf


def run(srv, wf):
    return digest(run_settled(srv, wf))


def test_nodes_list_only_gguf_files(server):
    info = server.object_info()
    unets = info["VBARGGUFDiffusionModelLoader"]["input"]["required"]["unet_name"][0]
    assert sorted(unets) == ["tiny_flux_Q4_K.gguf", "tiny_flux_Q8_0.gguf", "tiny_sd15_unet_Q8_0.gguf"]
    clips = info["VBARGGUFCLIPLoader"]["input"]["required"]["clip_name"][0]
    assert "tiny_clip_l_Q8_0.gguf" in clips and "tiny_clip_l_Q8_0_ref.safetensors" in clips
    stock_unets = info["UNETLoader"]["input"]["required"]["unet_name"][0]
    assert not any(n.endswith(".gguf") for n in stock_unets)
    dual = info["VBARGGUFDualCLIPLoader"]["input"]["required"]["type"][0]
    assert "flux" in dual and "sdxl" in dual
    for node, n in (("VBARGGUFTripleCLIPLoader", 3), ("VBARGGUFQuadrupleCLIPLoader", 4)):
        required = info[node]["input"]["required"]
        assert sorted(required) == [f"clip_name{i}" for i in range(1, n + 1)]
        assert all(required[k][0] == clips for k in required)


def test_flux_q8_0_matches_stock_plain_and_streamed(server):
    stock = run(server, flux(server, "tiny_flux_Q8_0_ref.safetensors", False))
    got = run(server, flux(server, "tiny_flux_Q8_0.gguf", True, budget=64.0))
    assert got == stock, "unlimited budget: image differs from the stock dequantized model"
    got = run(server, flux(server, "tiny_flux_Q8_0.gguf", True, budget=0.001))
    assert got == stock, "tiny budget: image differs from the stock dequantized model"
    s = stats(server)
    assert s["offloaded"] > 0
    vbar = next(v for v in s["vbars"] if v["name"] == "tiny_flux_Q8_0.gguf")
    # the VBAR is sized for the packed Q8_0 bytes (~0.55 GB), not the 2.2 GB of float32
    assert vbar["allocated_bytes"] < 700 << 20, vbar


def test_flux_q4_k_matches_stock(server):
    stock = run(server, flux(server, "tiny_flux_Q4_K_ref.safetensors", False))
    got = run(server, flux(server, "tiny_flux_Q4_K.gguf", True, budget=64.0))
    assert got == stock


def test_flux_lora_on_gguf_matches_stock(server):
    plain = run(server, flux(server, "tiny_flux_Q8_0_ref.safetensors", False))
    stock = run(server, flux(server, "tiny_flux_Q8_0_ref.safetensors", False, lora=True))
    assert stock != plain, "the LoRA has no visible effect: the test would prove nothing"
    got = run(server, flux(server, "tiny_flux_Q8_0.gguf", True, budget=64.0, lora=True))
    assert got == stock
    # the two patched weights were kept, dequantized and patched, in the model's patch VBAR
    patched = [v for v in stats(server)["vbars"] if v["name"] == "tiny_flux_Q8_0.gguf (patched)"]
    want = sum(o * i for o, i in LORA_TARGETS.values()) * 4      # float32 on CPU
    assert patched and 0.99 * want <= patched[0]["resident_bytes"] <= want + (8 << 20), patched


def test_flux_gguf_pinned_blocks_stay_resident_while_the_rest_streams(server):
    """1 double + 1 single block pinned (their Q8_0 bytes, ~489 MiB) under a budget that leaves
    ~25 MiB for everything else: the pins are held, the rest streams, the image is unchanged."""
    stock = run(server, flux(server, "tiny_flux_Q8_0_ref.safetensors", False))
    name = "tiny_flux_Q8_0.gguf"
    b = flux_block_bytes()
    offloaded = server.get("/vbar/stats")["pools"].get("cpu", {}).get("offloaded", 0)
    for double, single in ((1, 1), (0, 1)):
        got = run(server, flux(server, name, True, budget=0.54, pins=(double, single)))
        assert got == stock, f"pinned {double}+{single}: image differs from the stock model"
        vbars = [v for v in stats(server)["vbars"] if v["name"] == name]
        want = double * b["double"]["q8_0"] + single * b["single"]["q8_0"]
        assert 0.99 * want <= vbars[0]["held_bytes"] <= 1.01 * want, vbars[0]
        assert not any(v["held_bytes"] for v in vbars[1:]), "the previous load's pins were kept"
    assert stats(server)["offloaded"] > offloaded, "nothing streamed: the budget did not squeeze"
    r = server.run(flux(server, name, True, pins=(2, 0)), fresh_cache=True)
    assert r.status == "rejected", r.errors
    text = " ".join(r.errors)
    assert "has 1 double and 1 single blocks" in text and "got 2 and 0" in text, text
    run(server, flux(server, name, True, budget=64.0))       # leave the budget open


def test_sd15_unet_gguf_with_quantized_convs_matches_stock(server):
    """An SD1.5 UNet as GGUF (architecture sd1; conv kernels quantized through orig_shape
    records): the stock UNETLoader on the gguf-py-decoded weights gives the same image, at an
    unlimited and at a tiny budget."""
    def wf(unet, vbar, budget=None):
        w = load_wf(server, "sd15_tiny_api.json")
        w["80"] = ({"class_type": "VBARGGUFDiffusionModelLoader", "inputs": {
            "unet_name": unet, "dequant_dtype": "default", "patch_dtype": "default"}} if vbar else
            {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}})
        model = ["80", 0]
        if budget is not None:
            model = add_budget(w, model, budget)
        w["5"]["inputs"]["model"] = model
        return w

    stock = run(server, wf("tiny_sd15_unet_Q8_0_ref.safetensors", False))
    assert stock != run(server, load_wf(server, "sd15_tiny_api.json")), (
        "the Q8_0 UNet gives the float image: quantization did not happen")
    for budget in (64.0, 0.001):
        assert run(server, wf("tiny_sd15_unet_Q8_0.gguf", True, budget)) == stock, budget


def sd15_with_clip(srv, loader, clip_name):
    wf = load_wf(srv, "sd15_tiny_api.json")
    wf["80"] = {"class_type": loader, "inputs": {"clip_name": clip_name, "type": "stable_diffusion"}}
    wf["2"]["inputs"]["clip"] = wf["3"]["inputs"]["clip"] = ["80", 0]
    return wf


def test_clip_l_gguf_matches_stock(server):
    stock = run(server, sd15_with_clip(server, "CLIPLoader", "tiny_clip_l_Q8_0_ref.safetensors"))
    got = run(server, sd15_with_clip(server, "VBARGGUFCLIPLoader", "tiny_clip_l_Q8_0.gguf"))
    assert got == stock


def test_clip_l_gguf_with_text_encoder_lora_matches_stock(server, models):
    """A kohya LoRA with CLIP-L attention layers (strength_clip 0.6) on the GGUF CLIP: the
    image of the stock CLIPLoader on the dequantized weights with the same LoRA, at an
    unlimited, a partial and a tiny budget."""
    write_lora(str(models))

    def wf(loader, clip_name, budget=None):
        w = sd15_with_clip(server, loader, clip_name)
        model = ["1", 0]
        if budget is not None:       # before the LoRA: the text encoder runs under it
            model = add_budget(w, model, budget)
        w["90"] = {"class_type": "LoraLoader", "inputs": {
            "model": model, "clip": ["80", 0], "lora_name": TE_LORA,
            "strength_model": 1.0, "strength_clip": STRENGTH_CLIP}}
        w["2"]["inputs"]["clip"] = w["3"]["inputs"]["clip"] = ["90", 1]
        w["5"]["inputs"]["model"] = ["90", 0]
        return w

    ref = "tiny_clip_l_Q8_0_ref.safetensors"
    stock = run(server, wf("CLIPLoader", ref))
    no_te = wf("CLIPLoader", ref)
    no_te["90"]["inputs"]["strength_clip"] = 0.0
    assert run(server, no_te) != stock, "the text-encoder LoRA changes nothing: untested"
    for budget in (64.0, 0.05, 0.001):
        got = run(server, wf("VBARGGUFCLIPLoader", "tiny_clip_l_Q8_0.gguf", budget))
        assert got == stock, f"budget {budget} GB: image differs from the stock loader"


def test_text_encoders_in_process(models, tmp_path):
    """CLIP-L alone, and CLIP-L + llama.cpp-named T5 for Flux (both GGUF, then the CLIP as
    safetensors): conditioning identical to ComfyUI's stock loading of the dequantized weights."""
    comfy, harness, python, base = comfy_paths()
    env = dict(os.environ, PYTHONPATH=os.path.join(harness, "torchvision_stub"))
    r = subprocess.run([python, str(ROOT / "tests" / "comfy_gguf_te_check.py"), comfy,
                        str(tmp_path), os.path.join(base, CLIP_L)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["t5_cond_scale"] > 0.1
    for case in ("clip_l_gguf", "flux_dual_gguf", "flux_mixed_safetensors_gguf"):
        assert out[case] == 0.0, out


def test_llm_text_encoders_in_process(models, tmp_path):
    """Qwen2.5-VL text weights (qwen2vl) through the loader as type qwen_image, and Llama /
    Gemma 2 in ComfyUI's own modules: identical to the original weights, so llama.cpp's Q/K
    permutation and Gemma's norm offset are undone and every name lands. And the sentencepiece
    models rebuilt from GGUF metadata tokenize in ComfyUI's Wan and Lumina 2 tokenizers as the
    originals do."""
    pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    from spm_helpers import CASES, to_gguf, train

    comfy, harness, python, base = comfy_paths()
    tok_dir = tmp_path / "tokenizers"
    tok_dir.mkdir()
    for name, case in (("umt5", "unigram_nfkc"), ("gemma", "bpe_bytes")):
        kind, opts = CASES[case]
        model = train(**opts)
        (tok_dir / f"{name}.model").write_bytes(model)
        to_gguf(tok_dir / f"{name}.gguf", model, kind)
    env = dict(os.environ, PYTHONPATH=os.path.join(harness, "torchvision_stub"))
    r = subprocess.run([python, str(ROOT / "tests" / "comfy_gguf_llm_check.py"), comfy, str(tmp_path),
                        str(tok_dir)], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    cases = ["llama", "gemma2"]
    if out["qwen_image"] is not None:           # None: this ComfyUI predates Qwen-Image
        assert out["qwen_image_tokens"] > 10    # ComfyUI's Qwen template and tokenizer ran
        cases.append("qwen_image")
        # with an image (Qwen-Image-Edit) the missing vision tower is named, not run on garbage
        err = out["qwen_image_with_image"]
        assert err.startswith("GGUFError") and "mmproj" in err and "qwen25vl_q8.gguf" in err, err
    for case in cases:
        assert out[f"{case}_scale"] > 0.1, out
        assert out[case] == 0.0, out
    for name in ("umt5", "gemma"):              # the file's vocabulary, rebuilt, in ComfyUI's tokenizers
        assert out[f"tokenizer_{name}_tokens"] > 5, out
        assert out[f"tokenizer_{name}"] == 0, out
