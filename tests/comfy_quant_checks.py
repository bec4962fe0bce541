"""Run inside ComfyUI's interpreter (see test_comfyui_quant.py): quantized safetensors (every
comfy_quant format ComfyUI defines, and scaled fp8) through the VBAR loaders give the stock
loaders' samples bit for bit, with and without LoRA, at an unlimited and a tiny budget; the
VBAR holds the stored bytes; bad layers are refused by name. Prints 'CHECK name ok' lines."""
import gc
import os
import sys

ARGS = list(sys.argv)
comfy_dir, work, models = ARGS[1], ARGS[2], ARGS[3]
os.makedirs(work, exist_ok=True)
only = set(ARGS[4].split(",")) if len(ARGS) > 4 and ARGS[4] else None
from comfy_boot import boot, check  # noqa: E402

boot(comfy_dir)

import comfy.model_management as mm  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import quant_helpers as qh  # noqa: E402
from vbar_loaders.loaders.comfyui import quant  # noqa: E402
from vbar_loaders.loaders.comfyui.loading import load_checkpoint, load_diffusion_model  # noqa: E402
from vbar_loaders.loaders.comfyui.patcher import stores_of  # noqa: E402
from vbar_loaders.loaders.errors import QuantError  # noqa: E402
from vbar_loaders.vram import get_pool  # noqa: E402

KIND = quant.flavor()
NATIVE_EXPECTED = ()
BUDGETS = {"unlimited": 64 << 30, "tiny": 1 << 20}
pool = get_pool("cpu", budget=BUDGETS["unlimited"])


def free():
    mm.unload_all_models()
    gc.collect()


@torch.inference_mode()     # as ComfyUI's executor runs a prompt
def sample(model, kind):
    g = torch.Generator().manual_seed(0)
    if kind == "flux":
        lat = torch.zeros(1, 16, 8, 8)
        c = [[torch.randn(1, 8, 4096, generator=g),
              {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]
        cfg = 1.0
    else:
        lat = torch.zeros(1, 4, 8, 8)
        c = [[torch.randn(1, 77, 768, generator=g), {}]]
        cfg = 5.0
    return comfy.sample.sample(model, comfy.sample.prepare_noise(lat, 1), 2, cfg, "euler",
                               "simple", c, c, lat, seed=1, disable_pbar=True)


def with_lora(model, lora):
    return comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)[0] if lora else model


def stock_load(path, kind):
    if kind == "flux":
        return comfy.sd.load_diffusion_model(path)
    return comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False)[0]


def vbar_load(path, kind):
    return load_diffusion_model(path) if kind == "flux" else load_checkpoint(path)[0]


def stored_bytes_check(name, model, path, prefix):
    """Every quantized layer's handle holds exactly the file's bytes for it."""
    from vbar_loaders.loaders.quant.comfy_quant import find_layers
    from vbar_loaders.loaders.files.safetensors_file import SafetensorsFile

    f = SafetensorsFile(path)
    sd = {k: f.get_tensor(k) for k in f.keys()}
    layers, _ = find_layers(sd, path, f.metadata)
    store = stores_of(model)[0]
    bad = []
    for key, L in layers.items():
        k = key[len(prefix):] + ".weight"
        hs = [h for h in store.handles if h.key == k or h.key.startswith(k + ".")]
        want = L.weight.numel() * L.weight.element_size() + sum(
            t.numel() * t.element_size() for c, t in L.tensors.items()
            if c not in ("input_scale", "pre_quant_scale") and t.numel() > 1)
        got = sum(h.nbytes for h in hs)
        if got != want:
            bad.append((k, got, want))
    check(f"{name}: VBAR holds the stored bytes of {len(layers)} quantized layers", not bad, bad)
    native = sorted(n for n, mod in model.model.diffusion_model.named_modules()
                    if getattr(mod, "vbar_native", False))
    if NATIVE_EXPECTED:
        check(f"{name}: layers on ComfyUI's quantized matmul path: {', '.join(native)}",
              set(NATIVE_EXPECTED) <= set(native), native)


@torch.inference_mode()     # ComfyUI runs every node (loaders too) in inference mode
def compare(name, path, kind, lora=None, prefix=""):
    for use_lora in ([False, True] if lora else [False]):
        tag = f"{name}{' +LoRA' if use_lora else ''}"
        m = stock_load(path, kind)
        want = sample(with_lora(m, lora if use_lora else None), kind)
        del m
        free()
        for bname, b in BUDGETS.items():
            pool.set_budget(b)
            m = vbar_load(path, kind)
            if not use_lora and bname == "unlimited":
                stored_bytes_check(name, m, path, prefix)
            got = sample(with_lora(m, lora if use_lora else None), kind)
            check(f"{tag} at {bname} budget matches stock", torch.equal(got, want),
                  f"max diff {(got - want).abs().max().item()}")
            del m
            free()
        pool.set_budget(BUDGETS["unlimited"])


def shapes_of(sd, layers, prefix):
    return {k: tuple(sd[prefix + k + ".weight"].shape) for k in layers}


def want(case):
    return only is None or case in only


def refused(name, fn, *words):
    try:
        fn()
    except QuantError as e:
        msg = str(e)
        check(name, all(w in msg for w in words), msg)
        return
    raise AssertionError(f"{name}: not refused")


if want("errors") and KIND == "mixed":
    from vbar_loaders.loaders.quant.comfy_quant import QuantLayer

    def layer(fmt, shape=(32, 256), **edit):
        t = qh.quantize_comfy(torch.randn(shape).bfloat16(), fmt)
        w = t.pop("weight")
        t.pop("comfy_quant")
        tensors = {"weight_" + k[len("weight_"):] if k.startswith("weight_") else k: v
                   for k, v in t.items()}
        for k, v in edit.items():
            if v is None:
                tensors.pop(k, None)
            elif k == "weight":
                w = v
            else:
                tensors[k] = v
        return QuantLayer("blocks.3.lin", {"format": fmt}, w, tensors, "comfy_quant")

    P = "/m/bad.safetensors"
    for fmt in ("float8_e4m3fn", "nvfp4", "mxfp8", "int8_tensorwise", "convrot_w4a4", "asym_w4a8_int8"):
        quant._check_layer(layer(fmt), (32, 256), P)
    check("well-formed layers of every format pass the shape checks", True)
    cases = [
        ("nvfp4 block scale of the wrong shape",
         layer("nvfp4", weight_scale=torch.zeros(4, 4, dtype=torch.float8_e4m3fn)), "weight_scale"),
        ("nvfp4 without weight_scale_2", layer("nvfp4", weight_scale_2=None), "weight_scale_2"),
        ("mxfp8 block scale of 2-byte values",
         layer("mxfp8", weight_scale=torch.zeros(128, 4, dtype=torch.float16)), "weight_scale"),
        ("fp8 scale with 2 values", layer("float8_e4m3fn", weight_scale=torch.ones(2)), "weight_scale"),
        ("int8 scale that is an integer",
         layer("int8_tensorwise", weight_scale=torch.ones((), dtype=torch.int32)), "weight_scale"),
        ("fp8 weight stored as bf16",
         layer("float8_e4m3fn", weight=torch.zeros(32, 256, dtype=torch.bfloat16)), "weight"),
        ("nvfp4 weight for another shape", layer("nvfp4", (64, 256)), "weight"),
        ("convrot on a width its layout cannot hold", layer("int8_tensorwise", (32, 96)), "weight"),
        ("asym_w4a8 without its group scales", layer("asym_w4a8_int8", weight_s_rel=None), "weight_s_rel"),
        ("asym_w4a8 group scales for another group size",
         layer("asym_w4a8_int8", weight_s_rel=torch.zeros(32, 8, dtype=torch.float8_e4m3fn)), "weight_s_rel"),
        ("asym_w4a8 codebook of 8 codes", layer("asym_w4a8_int8", weight_codebook=torch.zeros(8)), "weight_codebook"),
    ]
    for name, L, comp in cases:
        shape = (32, 96) if "width" in name else (32, 256)
        if "width" in name:
            L.conf = {"format": "convrot_w4a4"}
        refused(f"refused: {name}", lambda: quant._check_layer(L, shape, P), P,
                "blocks.3.lin", L.format, comp)
    sd = {"a.weight": torch.zeros(32, 128, dtype=torch.int8), "a.weight_s_rel": torch.zeros(32, 16),
          "a.comfy_quant": qh.encode_conf({"format": "float4_imaginary"})}
    refused("a format ComfyUI does not define is refused", lambda: quant.prepare(sd, P, None),
            P, "'a'", "float4_imaginary", "does not define")
    sd = {"cond_stage_model.x.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn),
          "cond_stage_model.x.comfy_quant": qh.encode_conf({"format": "float8_e4m3fn"}),
          "model.diffusion_model.y.weight": torch.zeros(4, 4)}
    refused("a quantized text-encoder layer is refused",
            lambda: quant.prepare(sd, P, None, model_prefix="model.diffusion_model."),
            P, "cond_stage_model.x", "text encoder")


flux_src = load_file(os.path.join(models, "diffusion_models", "tiny_flux.safetensors"))
flux_lora_layers = ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.0",
                    "double_blocks.0.txt_attn.qkv", "single_blocks.0.linear1",
                    "double_blocks.0.img_attn.proj", "double_blocks.0.txt_mlp.0",
                    "final_layer.linear"]
flux_lora = qh.lora_for(flux_lora_layers, "diffusion_model.", shapes_of(flux_src, flux_lora_layers, ""))

if want("flux_scaled"):
    p = os.path.join(work, "flux_scaled_fp8.safetensors")
    save_file(qh.scaled_fp8_state_dict(flux_src, qh.SCALED_FLUX), p)
    compare("flux scaled_fp8", p, "flux", flux_lora)

if want("flux_native_fp8") and KIND == "mixed":
    # ComfyUI's fp8 matmul path (quantized input, QuantizedTensor F.linear), which it takes on
    # fp8-capable CUDA cards, forced on here through its own switch (SUPPORT_FP8_OPS, set by
    # --supports-fp8-compute) so both loaders take it on the CPU.
    mm.SUPPORT_FP8_OPS = True
    NATIVE_EXPECTED = ("double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj")
    p = os.path.join(work, "flux_comfy_quant_fp8.safetensors")
    plan = {k: v for k, v in qh.FLUX_PLAN.items() if v["format"].startswith("float8")}
    save_file(qh.quantize_state_dict(flux_src, plan), p)
    compare("flux fp8 on ComfyUI's fp8 matmul path", p, "flux", flux_lora)
    mm.SUPPORT_FP8_OPS = False
    NATIVE_EXPECTED = ()

if want("flux_mixed"):
    p = os.path.join(work, "flux_comfy_quant.safetensors")
    if KIND == "mixed":
        save_file(qh.quantize_state_dict(flux_src, qh.FLUX_PLAN), p)
        compare("flux comfy_quant (" + ", ".join(sorted({s["format"] for s in qh.FLUX_PLAN.values()}))
                + ")", p, "flux", flux_lora)
    else:
        sd = dict(flux_src)
        sd["double_blocks.0.img_attn.qkv.comfy_quant"] = qh.encode_conf({"format": "float8_e4m3fn"})
        save_file(sd, p)
        try:
            load_diffusion_model(p)
            raise AssertionError("a comfy_quant file loaded on a ComfyUI without comfy_quant")
        except QuantError as e:
            check("comfy_quant on an older ComfyUI is refused by name",
                  p in str(e) and "comfy_quant" in str(e) and "0.33" in str(e), str(e))
del flux_src
free()

sd15_src = load_file(os.path.join(models, "checkpoints", "tiny_sd15.safetensors"))
sd15_lora_layers = list(qh.SD15_PLAN)[:3] + ["input_blocks.1.1.transformer_blocks.0.attn1.to_k",
                                            "middle_block.1.transformer_blocks.0.ff.net.2"]
sd15_lora = qh.lora_for(sd15_lora_layers, "diffusion_model.",
                        shapes_of(sd15_src, sd15_lora_layers, qh.SD15_PREFIX))
if want("sd15_scaled"):
    p = os.path.join(work, "sd15_scaled_fp8.safetensors")
    save_file(qh.scaled_fp8_state_dict(sd15_src, qh.SCALED_SD15, prefix=qh.SD15_PREFIX), p)
    compare("sd15 checkpoint scaled_fp8", p, "sd15", sd15_lora, prefix=qh.SD15_PREFIX)
if want("sd15_mixed") and KIND == "mixed":
    p = os.path.join(work, "sd15_comfy_quant.safetensors")
    save_file(qh.quantize_state_dict(sd15_src, qh.SD15_PLAN, prefix=qh.SD15_PREFIX), p)
    compare("sd15 checkpoint comfy_quant", p, "sd15", sd15_lora, prefix=qh.SD15_PREFIX)
    # SD1.5's proj_in is a 1x1 Conv2d: ComfyUI quantizes Linear layers only (its stock loader
    # would ignore the scale and compute garbage); the VBAR loader names the layer instead.
    conv = "input_blocks.1.1.proj_in"
    sd = dict(sd15_src)
    w = sd.pop(qh.SD15_PREFIX + conv + ".weight")
    sd[qh.SD15_PREFIX + conv + ".weight"] = w.to(torch.float8_e4m3fn)
    sd[qh.SD15_PREFIX + conv + ".weight_scale"] = torch.tensor(1.0)
    sd[qh.SD15_PREFIX + conv + ".comfy_quant"] = qh.encode_conf({"format": "float8_e4m3fn"})
    p = os.path.join(work, "sd15_conv_quant.safetensors")
    save_file(sd, p)
    del sd
    refused("a quantized Conv2d is refused by layer", lambda: load_checkpoint(p), p,
            conv, "float8_e4m3fn", "Conv2d")
del sd15_src
free()
print("ALL OK")
