"""Real ComfyUI (COMFYUI_PATH): Checkpoint Save and LoRA extraction from a VBAR model write the
same tensors as from ComfyUI's stock loader, a LoRA on the UNet and the text encoder applied.

0.33 reads the weights through ``patch_weight_to_device(return_weight=True)``; 0.3.x loads with
``force_patch_weights=True`` and reads ``state_dict()``: both paths are the pack's to honour."""
import glob
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_env import comfy_paths, ensure_models, start_server
from test_comfyui_checkpoint import load_wf

pytestmark = pytest.mark.comfyui

LORA = "vbar_test_save_lora.safetensors"
UNET_KEYS = ("input_blocks.1.1.transformer_blocks.0.attn1.to_q", "middle_block.1.proj_in")
TE_KEYS = ("text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.11.mlp.fc1")


def write_lora(models):
    from vbar_loaders.loaders.files.safetensors_file import SafetensorsFile

    ckpt = SafetensorsFile(os.path.join(models, "checkpoints", "tiny_sd15.safetensors"))
    g = torch.Generator().manual_seed(1)
    lora = {}
    for prefix, lora_prefix, names in (("model.diffusion_model.", "lora_unet_", UNET_KEYS),
                                       ("cond_stage_model.transformer.", "lora_te_", TE_KEYS)):
        for name in names:
            shape = ckpt.info(prefix + name + ".weight")[1]
            key = lora_prefix + name.replace(".", "_")
            lora[key + ".lora_up.weight"] = torch.randn(shape[0], 4, generator=g) * 0.2
            lora[key + ".lora_down.weight"] = torch.randn(4, *shape[1:], generator=g) * 0.2
    os.makedirs(os.path.join(models, "loras"), exist_ok=True)
    path = os.path.join(models, "loras", LORA)
    save_file(lora, f"{path}.{os.getpid()}.tmp")
    os.replace(f"{path}.{os.getpid()}.tmp", path)   # atomic: another test server may be reading it


@pytest.fixture(scope="module")
def server():
    comfy, harness, python, models = comfy_paths()
    ensure_models(harness, python, models, comfy)
    write_lora(models)
    srv = start_server(harness, comfy, python, models)
    yield srv
    srv.stop()


def base(srv, vbar):
    """The checkpoint loader and the LoRA on MODEL and CLIP (nodes 1 and 90)."""
    wf = {k: v for k, v in load_wf(srv, "sd15_tiny_api.json").items() if k == "1"}
    if vbar:
        wf["1"]["class_type"] = "VBARCheckpointLoader"
    wf["90"] = {"class_type": "LoraLoader", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": LORA,
        "strength_model": 1.0, "strength_clip": 1.0}}
    return wf


def saved(srv, wf, folder, prefix):
    r = srv.run(wf, fresh_cache=True)
    assert r.status == "success", r.errors
    files = sorted(glob.glob(os.path.join(srv.output_dir, folder, prefix + "_*.safetensors")))
    assert files, f"nothing saved under {folder}/{prefix}"
    return load_file(files[-1])


def assert_same(got, want, what):
    assert sorted(got) == sorted(want), (what, sorted(set(got) ^ set(want))[:10])
    diff = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not diff, (what, diff[:10], [(got[k].dtype, want[k].dtype) for k in diff[:3]])


def test_checkpoint_save_equals_stock(server):
    out = {}
    for vbar in (False, True):
        wf = base(server, vbar)
        prefix = f"vbar_save_{'vbar' if vbar else 'stock'}"
        wf["95"] = {"class_type": "CheckpointSave", "inputs": {
            "model": ["90", 0], "clip": ["90", 1], "vae": ["1", 2],
            "filename_prefix": f"checkpoints/{prefix}"}}
        out[vbar] = saved(server, wf, "checkpoints", prefix)
    plain = load_file(os.path.join(server.models_dir, "checkpoints", "tiny_sd15.safetensors"))
    for k in ("model.diffusion_model." + UNET_KEYS[0] + ".weight",
              "cond_stage_model.transformer." + TE_KEYS[0] + ".weight"):
        assert not torch.equal(out[False][k].float(), plain[k].float()), f"the LoRA did not reach {k}"
    assert_same(out[True], out[False], "checkpoint")


def test_lora_extraction_equals_stock(server):
    """LoraSave's ``full_diff``: every weight and bias difference as ComfyUI's extraction reads it
    (patch_weight_to_device(return_weight=True) unless a module is marked patched), saved
    unreduced. ``standard`` would only add an SVD of each of these differences, a pure function
    of them, and its full SVD of CLIP's 49408x768 token embedding takes ~10 GB and ~15 min on a
    CPU; equal differences give equal LoRAs."""
    out = {}
    for vbar in (False, True):
        wf = base(server, vbar)
        prefix = f"vbar_extract_{'vbar' if vbar else 'stock'}"
        wf["96"] = {"class_type": "ModelMergeSubtract", "inputs": {
            "model1": ["90", 0], "model2": ["1", 0], "multiplier": 1.0}}
        wf["97"] = {"class_type": "CLIPMergeSubtract", "inputs": {
            "clip1": ["90", 1], "clip2": ["1", 1], "multiplier": 1.0}}
        wf["98"] = {"class_type": "LoraSave", "inputs": {
            "filename_prefix": f"loras/{prefix}", "rank": 4, "lora_type": "full_diff",
            "bias_diff": True, "model_diff": ["96", 0], "text_encoder_diff": ["97", 0]}}
        out[vbar] = saved(server, wf, "loras", prefix)
    moved = sorted(k for k in out[False] if out[False][k].abs().max() > 0
                   and ".text_projection." not in k)
    assert len(moved) == len(UNET_KEYS) + len(TE_KEYS), moved
    for name in UNET_KEYS + TE_KEYS:   # the LoRA's layers, and only those, moved
        assert sum(k.endswith(f".{name}.diff") for k in moved) == 1, (name, moved)
    assert len(out[False]) > 300, len(out[False])   # every weight and bias, not only the moved
    # CLIP-L's text_projection is not in the file (nor in SD1.5 checkpoints). ComfyUI's stock
    # loader leaves it uninitialised memory, so its difference there is whatever that memory
    # held; the VBAR loader gives it zeros: a zero difference. Everything else must be identical
    # (a token embedding patched twice once gave -weight here instead of 0).
    plain = load_file(os.path.join(server.models_dir, "checkpoints", "tiny_sd15.safetensors"))
    assert not any("text_projection" in k for k in plain)
    proj = sorted(k for k in set(out[True]) | set(out[False]) if ".text_projection." in k)
    for k in proj:
        if k in out[True]:
            assert not out[True][k].any(), k
    assert_same({k: v for k, v in out[True].items() if k not in proj},
                {k: v for k, v in out[False].items() if k not in proj}, "extracted differences")
