"""Write the sample workflows (ComfyUI's UI format, draggable into the editor) from API-format
definitions, so every file is laid out and linked the same way.

    python workflows/make_workflows.py            # rewrite workflows/*.json
    python workflows/make_workflows.py --check    # exit 1 if a file differs from what it would write

Standard library only. SCHEMA lists, per node type used here, its link inputs, its widgets in
ComfyUI's input order and its outputs; tests/test_workflows.py checks it against a real
ComfyUI's /object_info.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# type: (link inputs [(name, type)], widget names in input order, outputs [(name, type)])
SCHEMA = {
    "VBARCheckpointLoader": ([], ["ckpt_name"], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "VBARDiffusionModelLoader": ([], ["unet_name", "weight_dtype", "blocks_cuda_size"],
                                 [("MODEL", "MODEL")]),
    "VBARGGUFDiffusionModelLoader": ([], ["unet_name", "dequant_dtype", "patch_dtype",
                                          "double_blocks_cuda_size", "single_blocks_cuda_size",
                                          "blocks_cuda_size"],
                                     [("MODEL", "MODEL")]),
    "VBARGGUFCLIPLoader": ([], ["clip_name", "type", "device"], [("CLIP", "CLIP")]),
    "ModelSamplingSD3": ([("model", "MODEL")], ["shift"], [("MODEL", "MODEL")]),
    "EmptyHunyuanLatentVideo": ([], ["width", "height", "length", "batch_size"],
                                [("LATENT", "LATENT")]),
    "VBARGGUFDualCLIPLoader": ([], ["clip_name1", "clip_name2", "type", "device"], [("CLIP", "CLIP")]),
    "VBARNF4DiffusionModelLoader": ([], ["unet_name", "double_blocks_cuda_size",
                                         "single_blocks_cuda_size", "quantize_on_load",
                                         "blocks_cuda_size"],
                                    [("MODEL", "MODEL")]),
    "VBARSetBudget": ([("model", "MODEL")], ["budget_gb", "headroom_gb"], [("MODEL", "MODEL")]),
    "VBARVRAMMonitor": ([("passthrough", "*")], [],
                        [("passthrough", "*"), ("report", "STRING"), ("residency_map", "IMAGE")]),
    "DualCLIPLoader": ([], ["clip_name1", "clip_name2", "type", "device"], [("CLIP", "CLIP")]),
    "VAELoader": ([], ["vae_name"], [("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP")], ["text"], [("CONDITIONING", "CONDITIONING")]),
    "ConditioningZeroOut": ([("conditioning", "CONDITIONING")], [], [("CONDITIONING", "CONDITIONING")]),
    "FluxGuidance": ([("conditioning", "CONDITIONING")], ["guidance"], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([], ["width", "height", "batch_size"], [("LATENT", "LATENT")]),
    "EmptySD3LatentImage": ([], ["width", "height", "batch_size"], [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")],
                 ["seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"], [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], ["filename_prefix"], []),
}
# The frontend adds a "control after generate" widget after these INT widgets (its rule: the
# input's control_after_generate option, or the names seed / noise_seed).
CONTROL_AFTER = {"seed", "noise_seed"}
SIZES = {"VBARVRAMMonitor": [900, 600], "CLIPTextEncode": [400, 160], "KSampler": [315, 262],
         "SaveImage": [420, 460], "DualCLIPLoader": [315, 130]}
TITLES = {"VBARVRAMMonitor": "VBAR VRAM Monitor"}

SD15_CKPT = "v1-5-pruned-emaonly.safetensors"
POSITIVE = "a photo of a red cube on a wooden table, soft light"
NEGATIVE = "blurry, low quality"
WAN_POSITIVE = "a red fox running through fresh snow at sunrise, tracking shot"


def monitor_and_save(wf, image, prefix):
    """The monitor sits between the decoder and SaveImage: it runs once the image exists."""
    wf["20"] = {"class_type": "VBARVRAMMonitor", "inputs": {"passthrough": [image, 0]}}
    wf["21"] = {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": prefix}}
    return wf


def sd15_checkpoint():
    wf = {
        "1": {"class_type": "VBARCheckpointLoader", "inputs": {"ckpt_name": SD15_CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": POSITIVE}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": NEGATIVE}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 42, "steps": 20, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
    }
    return monitor_and_save(wf, "6", "vbar_sd15")


def flux(model_node, text_encoders=None):
    """Flux around a given diffusion-model loader: text encoders (stock unless given) and VAE."""
    wf = {
        "1": model_node,
        "2": text_encoders or {"class_type": "DualCLIPLoader", "inputs": {
            "clip_name1": "t5xxl_fp8_e4m3fn.safetensors", "clip_name2": "clip_l.safetensors",
            "type": "flux", "device": "default"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": POSITIVE}},
        "4": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["3", 0], "guidance": 3.5}},
        "5": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 0]}},
        "6": {"class_type": "EmptySD3LatentImage",
              "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0],
            "seed": 42, "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "denoise": 1.0}},
        "8": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["8", 0]}},
    }
    return wf


def flux_diffusion_model():
    wf = flux({"class_type": "VBARDiffusionModelLoader", "inputs": {
        "unet_name": "flux1-dev.safetensors", "weight_dtype": "default", "blocks_cuda_size": 0}})
    return monitor_and_save(wf, "9", "vbar_flux")


def flux_gguf():
    """GGUF Flux and a GGUF T5: both stay quantized in VRAM."""
    wf = flux({"class_type": "VBARGGUFDiffusionModelLoader", "inputs": {
        "unet_name": "flux1-dev-Q4_K_S.gguf", "dequant_dtype": "default", "patch_dtype": "default",
        "double_blocks_cuda_size": 4, "single_blocks_cuda_size": 0, "blocks_cuda_size": 0}},
        {"class_type": "VBARGGUFDualCLIPLoader", "inputs": {
            "clip_name1": "t5-v1_1-xxl-encoder-Q8_0.gguf", "clip_name2": "clip_l.safetensors",
            "type": "flux", "device": "default"}})
    return monitor_and_save(wf, "9", "vbar_flux_gguf")


def flux_nf4_pinned():
    """bf16 Flux quantized to NF4 while loading, its first 4 double and 8 single blocks held
    resident (never evicted), the rest faulted in within the budget."""
    wf = flux({"class_type": "VBARNF4DiffusionModelLoader", "inputs": {
        "unet_name": "flux1-dev.safetensors", "double_blocks_cuda_size": 4,
        "single_blocks_cuda_size": 8, "quantize_on_load": True, "blocks_cuda_size": 0}})
    return monitor_and_save(wf, "9", "vbar_flux_nf4")


def small_card():
    """Flux in fp8 on an 8 GB card: at most 6 GB of weights resident, 1.5 GB kept for activations."""
    wf = flux({"class_type": "VBARDiffusionModelLoader", "inputs": {
        "unet_name": "flux1-dev.safetensors", "weight_dtype": "fp8_e4m3fn", "blocks_cuda_size": 0}})
    wf["10"] = {"class_type": "VBARSetBudget", "inputs": {"model": ["1", 0], "budget_gb": 6.0,
                                                          "headroom_gb": 1.5}}
    wf["7"]["inputs"]["model"] = ["10", 0]
    return monitor_and_save(wf, "9", "vbar_small_card")


def wan_gguf():
    """Wan 2.1 T2V 14B as a ComfyUI-GGUF file (Q4_K_M, 40 blocks), its first 10 blocks held
    resident, the UMT5 text encoder as GGUF too; ComfyUI's stock Wan settings (shift 8, uni_pc,
    33 frames at 832x480). The monitor shows what stayed resident while it ran."""
    wf = {
        "1": {"class_type": "VBARGGUFDiffusionModelLoader", "inputs": {
            "unet_name": "wan2.1-t2v-14b-Q4_K_M.gguf", "dequant_dtype": "default",
            "patch_dtype": "default", "double_blocks_cuda_size": 0, "single_blocks_cuda_size": 0,
            "blocks_cuda_size": 10}},
        "2": {"class_type": "VBARGGUFCLIPLoader", "inputs": {
            "clip_name": "umt5-xxl-encoder-Q8_0.gguf", "type": "wan", "device": "default"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": WAN_POSITIVE}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": NEGATIVE}},
        "5": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {
            "width": 832, "height": 480, "length": 33, "batch_size": 1}},
        "6": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 8.0}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["6", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "seed": 42, "steps": 30, "cfg": 6.0, "sampler_name": "uni_pc", "scheduler": "simple",
            "denoise": 1.0}},
        "8": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae.safetensors"}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["8", 0]}},
    }
    return monitor_and_save(wf, "9", "vbar_wan")


WORKFLOWS = {
    "vbar_sd15_checkpoint.json": sd15_checkpoint,
    "vbar_flux_diffusion_model.json": flux_diffusion_model,
    "vbar_flux_gguf.json": flux_gguf,
    "vbar_flux_nf4_pinned.json": flux_nf4_pinned,
    "vbar_small_card.json": small_card,
    "vbar_wan_gguf.json": wan_gguf,
}


# --- API format -> UI format ------------------------------------------------------------------
def _is_link(v):
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int)


def _depths(api):
    memo = {}

    def depth(nid):
        if nid not in memo:
            ins = [v[0] for v in api[nid]["inputs"].values() if _is_link(v)]
            memo[nid] = 1 + max((depth(i) for i in ins), default=-1)
        return memo[nid]

    return {nid: depth(nid) for nid in api}


def _size(ctype):
    sockets, widget_names, outputs = SCHEMA[ctype]
    return SIZES.get(ctype, [315, 58 + 26 * max(len(widget_names), len(sockets), len(outputs))])


def to_ui(api):
    """A ComfyUI workflow (UI format, version 0.4) equivalent to the API-format ``api``."""
    ids = {nid: i + 1 for i, nid in enumerate(sorted(api, key=int))}
    depths = _depths(api)
    nodes, links = {}, []
    column_y = {}
    sizes = {nid: _size(api[nid]["class_type"]) for nid in api}
    widths = {}
    for nid, d in depths.items():
        widths[d] = max(widths.get(d, 0), sizes[nid][0])
    column_x = {d: 40 + sum(widths[c] + 60 for c in range(d)) for d in widths}
    for order, nid in enumerate(sorted(api, key=lambda n: (depths[n], int(n)))):
        node = api[nid]
        ctype = node["class_type"]
        sockets, widget_names, outputs = SCHEMA[ctype]
        unknown = set(node["inputs"]) - {n for n, _ in sockets} - set(widget_names)
        if unknown:
            raise ValueError(f"node {nid} ({ctype}): inputs {sorted(unknown)} are not in SCHEMA")
        values = []
        for name in widget_names:
            values.append(node["inputs"][name])
            if name in CONTROL_AFTER:
                values.append("fixed")
        size = sizes[nid]
        d = depths[nid]
        y = column_y.get(d, 60)
        column_y[d] = y + size[1] + 60
        ui = {
            "id": ids[nid], "type": ctype, "pos": [column_x[d], y], "size": list(size),
            "flags": {}, "order": order, "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in sockets],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                        for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": ctype},
            "widgets_values": values,
        }
        if ctype in TITLES:
            ui["title"] = TITLES[ctype]
        nodes[nid] = ui
    for nid in sorted(api, key=int):
        sockets = SCHEMA[api[nid]["class_type"]][0]
        for slot, (name, typ) in enumerate(sockets):
            v = api[nid]["inputs"].get(name)
            if v is None:
                continue
            if not _is_link(v):
                raise ValueError(f"node {nid}: input '{name}' must be a link, got {v!r}")
            src, out_slot = v
            link_id = len(links) + 1
            out_type = SCHEMA[api[src]["class_type"]][2][out_slot][1]
            links.append([link_id, ids[src], out_slot, ids[nid], slot, out_type if out_type != "*" else typ])
            nodes[nid]["inputs"][slot]["link"] = link_id
            nodes[src]["outputs"][out_slot]["links"].append(link_id)
    for n in nodes.values():
        for o in n["outputs"]:
            if not o["links"]:
                o["links"] = None
    return {
        "last_node_id": len(nodes), "last_link_id": len(links),
        "nodes": [nodes[nid] for nid in sorted(api, key=int)],
        "links": links, "groups": [], "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4,
    }


def dumps(ui):
    """One node and one link per line: readable, and a change shows as a one-line diff."""
    parts = []
    for key, value in ui.items():
        if key in ("nodes", "links"):
            items = ",\n".join("    " + json.dumps(x) for x in value)
            parts.append(f'  "{key}": [\n{items}\n  ]')
        else:
            parts.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def render(name):
    return dumps(to_ui(WORKFLOWS[name]()))


def main(argv):
    check = "--check" in argv
    stale = []
    for name in WORKFLOWS:
        path = os.path.join(HERE, name)
        text = render(name)
        old = open(path).read() if os.path.exists(path) else None
        if old != text:
            stale.append(name)
            if not check:
                with open(path, "w") as f:
                    f.write(text)
    if check and stale:
        print("out of date: " + ", ".join(stale) + " (run python workflows/make_workflows.py)")
        return 1
    print(("checked " if check else "wrote ") + ", ".join(WORKFLOWS))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
