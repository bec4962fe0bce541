"""The sample workflows in workflows/: well-formed UI-format files, in step with their generator,
and (with a real ComfyUI, COMFYUI_PATH) converted to API prompts and run on the tiny models."""
import importlib.util
import json
import os
import pathlib

import pytest

import tiny_families as tf

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "workflows"
FILES = sorted(p.name for p in WORKFLOWS.glob("*.json"))


def load_generator():
    spec = importlib.util.spec_from_file_location("make_workflows", WORKFLOWS / "make_workflows.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


GEN = load_generator()


def read(name):
    with open(WORKFLOWS / name) as f:
        return json.load(f)


# --- offline: the files themselves ------------------------------------------------------------
def test_every_generated_workflow_is_on_disk_and_current():
    assert FILES == sorted(GEN.WORKFLOWS), "workflows/ holds files the generator does not make"
    for name in FILES:
        assert (WORKFLOWS / name).read_text() == GEN.render(name), (
            f"{name} is out of date: run python workflows/make_workflows.py")


def types_match(out_type, in_type):
    return out_type == in_type or "*" in (out_type, in_type)


@pytest.mark.parametrize("name", FILES)
def test_ui_format_and_links_are_consistent(name):
    wf = read(name)
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    assert wf["last_node_id"] >= max(nodes)
    for n in wf["nodes"]:
        for key in ("id", "type", "pos", "size", "inputs", "outputs", "widgets_values", "mode"):
            assert key in n, f"node {n.get('id')} lacks '{key}'"
        assert len(n["pos"]) == 2 and len(n["size"]) == 2
        sockets, widgets, outputs = GEN.SCHEMA[n["type"]]
        expected = len(widgets) + sum(1 for w in widgets if w in GEN.CONTROL_AFTER)
        assert len(n["widgets_values"]) == expected, f"node {n['id']} ({n['type']}) widgets"
        assert [o["type"] for o in n["outputs"]] == [t for _, t in outputs]
    links = {}
    for link in wf["links"]:
        assert len(link) == 6, link
        lid, src, src_slot, dst, dst_slot, ltype = link
        assert lid not in links, f"duplicate link id {lid}"
        links[lid] = link
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert lid in (out["links"] or []), f"link {lid} missing from node {src}'s output"
        assert inp["link"] == lid, f"link {lid} missing from node {dst}'s input"
        assert types_match(out["type"], inp["type"]) and types_match(ltype, inp["type"])
    assert wf["last_link_id"] >= max(links)
    for n in wf["nodes"]:   # the other direction: nothing refers to a link that is not there
        for i in n["inputs"]:
            assert i["link"] is None or i["link"] in links
        for o in n["outputs"]:
            assert all(lid in links for lid in (o["links"] or []))


@pytest.mark.parametrize("name", FILES)
def test_every_workflow_has_a_monitor_that_runs_last(name):
    wf = read(name)
    monitors = [n for n in wf["nodes"] if n["type"] == "VBARVRAMMonitor"]
    assert len(monitors) == 1
    # Wired after the decoder, so it reports the state once the image exists.
    assert monitors[0]["inputs"][0]["link"] is not None
    loaders = [n["type"] for n in wf["nodes"] if n["type"].startswith("VBAR") and "Loader" in n["type"]]
    assert loaders, "no VBAR loader"


def test_small_card_limits_the_budget():
    wf = read("vbar_small_card.json")
    budget = [n for n in wf["nodes"] if n["type"] == "VBARSetBudget"]
    assert budget and budget[0]["widgets_values"][0] > 0


# --- UI format -> API prompt, by the rules the frontend uses ----------------------------------
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def is_widget(spec):
    typ, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    return (isinstance(typ, list) or typ in WIDGET_TYPES) and not opts.get("forceInput")


def has_control(name, spec):
    opts = spec[1] if len(spec) > 1 else {}
    return spec[0] == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed"))


def ui_to_api(wf, object_info):
    """API prompt from a UI workflow: widget values in object_info's input order (plus the
    frontend's 'control after generate' value after seed-like INTs), links as [id, slot]."""
    links = {l[0]: l for l in wf["links"]}
    prompt = {}
    for n in wf["nodes"]:
        if n.get("mode", 0) != 0:
            continue
        info = object_info[n["type"]]
        linked = {i["name"]: links[i["link"]] for i in n["inputs"] if i.get("link") is not None}
        values = iter(n["widgets_values"])
        inputs = {}
        order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
        for section in ("required", "optional"):
            for name in order.get(section, []):
                spec = info["input"][section][name]
                if is_widget(spec):
                    value = next(values)
                    if has_control(name, spec):
                        next(values)
                    inputs[name] = value
                if name in linked:
                    link = linked[name]
                    inputs[name] = [str(link[1]), link[2]]
        rest = list(values)
        assert not rest, f"node {n['id']} ({n['type']}): {len(rest)} widget values left over"
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return prompt


# --- real ComfyUI -----------------------------------------------------------------------------
# A workflow whose loader node is missing from the ComfyUI under test is skipped, not failed
# (a pack checked out without one of its loaders still has its other workflows run).
NEEDS = {
    "vbar_flux_gguf.json": "VBARGGUFDiffusionModelLoader",
    "vbar_flux_nf4_pinned.json": "VBARNF4DiffusionModelLoader",
    "vbar_wan_gguf.json": "VBARGGUFDiffusionModelLoader",
}
TINY_GGUF = "tiny_flux_Q8_0.gguf"
TINY_WAN_GGUF = "tiny_wan21_Q8_0.gguf"   # written as ComfyUI-GGUF writes Wan (5-D F32 patch conv)
WAN_BLOCKS = 2      # the Wan workflow keeps blocks resident: 1 of the 2 in the test


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """ComfyUI on a models folder of links to the harness's tiny models, plus, when the gguf
    package is there, the tiny Flux converted to GGUF Q8_0 and the tiny Wan 2.1 of
    tests/tiny_families.py (its VAE the one this ComfyUI's VAELoader takes) as GGUF Q8_0."""
    from comfy_env import comfy_paths, ensure_models, start_server

    comfy, harness, python, base = comfy_paths()
    ensure_models(harness, python, base, comfy)
    try:
        from gguf import GGMLQuantizationType
        from gguf_helpers import convert_safetensors
    except ImportError:
        wan = None      # the GGUF workflows then skip, naming what is missing
    else:   # written into the shared models folder (kept there), linked below like the rest
        wan = tf.run_writer(python, comfy, base, only=["wan21"], blocks=WAN_BLOCKS)["wan21"]
    models = tmp_path_factory.mktemp("workflow_models")
    for sub in ("checkpoints", "diffusion_models", "vae", "text_encoders"):
        os.makedirs(models / sub)
        for f in pathlib.Path(base, sub).glob("*.safetensors"):
            os.symlink(f, models / sub / f.name)
    if wan:
        convert_safetensors(pathlib.Path(base, "diffusion_models", "tiny_flux.safetensors"),
                            models / "diffusion_models" / TINY_GGUF, GGMLQuantizationType.Q8_0)
        _wan_gguf(models / "diffusion_models", wan["unet"])
    srv = start_server(harness, comfy, python, str(models))
    srv.models_dir_path = str(models)
    srv.wan_vae = wan and wan["vae"]
    srv.object_info = srv.get("/object_info")
    yield srv
    srv.stop()


def _wan_gguf(diffusion_models, unet):
    """The tiny Wan's weights as a Q8_0 GGUF laid out as ComfyUI-GGUF writes Wan."""
    from gguf import GGMLQuantizationType
    from gguf_helpers import write_comfyui_gguf
    from safetensors.torch import load_file

    sd = load_file(str(diffusion_models / unet))
    assert write_comfyui_gguf(diffusion_models / TINY_WAN_GGUF, sd, GGMLQuantizationType.Q8_0) == "wan"


def tiny_file(models, folder, name):
    return name if pathlib.Path(models, folder, name).exists() else None


TEXT_ENCODER_LOADERS = ("DualCLIPLoader", "VBARGGUFDualCLIPLoader", "VBARGGUFCLIPLoader")


def shrink_for_test(prompt, models, wan_vae):
    """The tiny models in place of real ones (``wan_vae``: the tiny Wan's VAE file, or None),
    64 px, 2 steps; Flux's T5 text encoder (no tiny one exists) replaced by the harness's random
    conditioning. Returns what it could not map."""
    missing = []
    for nid, node in list(prompt.items()):
        ct, inp = node["class_type"], node["inputs"]
        if ct == "VBARCheckpointLoader":
            inp["ckpt_name"] = "tiny_sd15.safetensors"
        elif ct in ("VBARDiffusionModelLoader", "VBARNF4DiffusionModelLoader"):
            inp["unet_name"] = "tiny_flux.safetensors"   # NF4: quantized on load
        elif ct == "VBARGGUFDiffusionModelLoader":
            tiny = TINY_WAN_GGUF if "wan" in inp["unet_name"] else TINY_GGUF
            inp["unet_name"] = tiny_file(models, "diffusion_models", tiny) or missing.append(
                f"{tiny} (needs the gguf package and tests/gguf_helpers.py)")
        elif ct == "VAELoader":
            if "wan" not in inp["vae_name"]:
                inp["vae_name"] = "tiny_flux_ae.safetensors"
            else:
                inp["vae_name"] = wan_vae or missing.append("the tiny Wan VAE (needs the gguf package)")
        elif ct in ("EmptyLatentImage", "EmptySD3LatentImage"):
            inp.update(width=64, height=64)
        elif ct == "EmptyHunyuanLatentVideo":
            inp.update(width=64, height=64, length=5)     # 5 frames: 2 latent frames
        elif ct == "KSampler":
            inp["steps"] = 2
        elif ct == "CLIPTextEncode" and prompt[inp["clip"][0]]["class_type"] in TEXT_ENCODER_LOADERS:
            prompt[nid] = {"class_type": "ComfyHarnessRandomConditioning", "inputs": {
                "tokens": 16, "dim": 4096, "pooled_dim": 768, "seed": 1, "scale": 1.0}}
        for k in ("double_blocks_cuda_size", "single_blocks_cuda_size", "blocks_cuda_size"):
            if k in inp:
                inp[k] = min(inp[k], 1)   # tiny Flux: 1 double + 1 single block; tiny Wan: 2
    for nid in [n for n, v in prompt.items() if v["class_type"] in TEXT_ENCODER_LOADERS]:
        del prompt[nid]
    return missing


def test_schema_matches_real_comfyui(server):
    """make_workflows.SCHEMA (which lays out the files) agrees with the nodes of the installed
    ComfyUI: the same widgets and link inputs in order, and its outputs come first."""
    info = server.object_info
    for ctype, (sockets, widgets, outputs) in GEN.SCHEMA.items():
        if ctype not in info:
            assert ctype in NEEDS.values() or ctype in ("VBARGGUFDualCLIPLoader", "VBARGGUFCLIPLoader"), (
                f"{ctype} is not a node in this ComfyUI")
            continue
        spec = info[ctype]
        order = spec.get("input_order") or {k: list(v) for k, v in spec["input"].items()}
        names = [(s, n) for s in ("required", "optional") for n in order.get(s, [])]
        got_widgets = [n for s, n in names if is_widget(spec["input"][s][n])]
        got_sockets = [(n, spec["input"][s][n][0]) for s, n in names if not is_widget(spec["input"][s][n])]
        assert got_widgets == widgets, f"{ctype} widgets"
        assert got_sockets == sockets, f"{ctype} link inputs"
        # Links name output slots by index, so the files' slots must be this node's first ones,
        # same types. A node may declare more after them (0.33.0's SaveImage returns its
        # images; 0.3.64's returns nothing): files that leave those unlinked load on both.
        ours = [t for _, t in outputs]
        assert list(spec["output"])[:len(ours)] == ours, f"{ctype} outputs: {spec['output']} here"


@pytest.mark.parametrize("name", FILES)
def test_workflow_runs_end_to_end(server, name):
    if name in NEEDS and NEEDS[name] not in server.object_info:
        pytest.skip(f"{NEEDS[name]} is not in this ComfyUI")
    prompt = ui_to_api(read(name), server.object_info)
    missing = shrink_for_test(prompt, server.models_dir_path, server.wan_vae)
    if missing:
        pytest.skip("no tiny model for this workflow: " + "; ".join(missing))
    result = server.run(prompt, fresh_cache=True)
    assert result.status == "success", result.errors
    monitor = next(nid for nid, n in prompt.items() if n["class_type"] == "VBARVRAMMonitor")
    ui = result.outputs[monitor]
    text = ui["text"][0]
    assert "VBAR VRAM monitor" in text
    # The monitor ran while the workflow's models were loaded: a row for one of them.
    assert any(ln.startswith("tiny_") for ln in text.splitlines()), text
    assert ui["images"][0]["type"] == "temp"
    saved = [f for f in result.files if os.sep + "output" + os.sep in f]
    assert saved, "SaveImage wrote nothing"
    stats = server.get("/vbar/stats")
    vbars = [v for st in stats["pools"].values() for v in st["vbars"]]
    assert all(len(v["slot_states"]) == v["slots"] for v in vbars)
