"""Tiny random-weight variants of the large model families, recognised by ComfyUI's own detection.

Run with a ComfyUI venv's python:
    COMFYUI_DIR=/path/to/ComfyUI python tests/tiny_families.py --out-dir /path/to/models [--only wan21,qwen_image]

How a model is made (no weights are downloaded, no ComfyUI code is copied):
  1. A *probe*: the handful of tensor shapes ComfyUI's detection reads (``model_detection.
     detect_unet_config``), as meta tensors. Everything detection hard-codes stays as it is.
  2. ComfyUI detects the probe (``model_config_from_unet``) and builds its own model class from
     that config on the meta device (``model_config.get_model(device="meta")``): the real key
     names and shapes, version-specific details included.
  3. Every tensor is filled with seeded random values (norm scales 1, norm biases 0).
  4. Before writing, the filled state dict goes through ComfyUI's UNETLoader path
     (``comfy.sd.load_diffusion_model_state_dict``): it must detect the expected class, and the
     model ComfyUI builds must hold exactly the keys and shapes of the file.
VAEs are built from ComfyUI's VAE classes on the meta device, written, and checked by loading
the file through the installed ComfyUI's own ``VAELoader`` node, as workflows load it (ComfyUI
0.3.64's drops the file's metadata, 0.33.0's passes it on). Where that node refuses the tiny VAE,
the VAE's ``fallback`` (the size that ComfyUI fixes) is written instead.

Each family keeps one block of each repeated kind (detection would accept 0, which would leave
nothing to stream or pin). ``--blocks N`` writes N blocks (file name gets ``_bN``).

Files are byte-identical from run to run (seeded per tensor name, one metadata key, or the
family's own "config" metadata where ComfyUI reads one).
"""
import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 16   # issue 16


# --------------------------------------------------------------------------- ComfyUI import
def import_comfy(comfy_dir):
    """Import ComfyUI from ``comfy_dir`` in CPU mode (torchvision/torchaudio stubs if needed)."""
    comfy_dir = os.path.abspath(comfy_dir)
    if not os.path.isfile(os.path.join(comfy_dir, "comfy", "model_detection.py")):
        raise SystemExit(f"not a ComfyUI checkout: {comfy_dir} (set COMFYUI_DIR or --comfy-dir)")
    stubs = os.path.join(os.environ.get("COMFY_HARNESS") or os.path.join(
        HERE, "..", "..", "shared", "comfy_harness"), "torchvision_stub")
    try:
        import torchvision  # noqa: F401
    except Exception:
        for k in [k for k in sys.modules if k.split(".")[0] in ("torchvision", "torchaudio")]:
            del sys.modules[k]
        sys.path.insert(0, os.path.abspath(stubs))
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True     # before comfy.model_management is imported
    import comfy.model_detection  # noqa: F401
    import comfy.sd  # noqa: F401


def comfy_version(comfy_dir):
    try:
        with open(os.path.join(comfy_dir, "comfyui_version.py")) as f:
            return f.read().split('"')[1]
    except (OSError, IndexError):
        return "unknown"


# --------------------------------------------------------------------------- seeded fill
def _generator(name):
    import torch

    digest = hashlib.sha256(f"{SEED}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _owners(module):
    """state-dict key -> class name of the module that holds it."""
    out = {}
    for mname, mod in module.named_modules():
        for pname, _ in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            out[f"{mname}.{pname}" if mname else pname] = type(mod).__name__
    return out


def file_shapes(module, rename=None):
    """{key as written in the file: shape} of ``module``'s state dict."""
    owners = _owners(module)
    return {(rename(k, owners.get(k, "")) if rename else k): tuple(v.shape)
            for k, v in module.state_dict().items()}


def random_state_dict(module, dtype, rename=None):
    """Seeded values for every floating tensor of ``module``'s state dict (meta or not), under
    the key names ``rename(key, owner class name)`` gives (the names real checkpoints use).

    Weights get N(0, 1/fan_in) so activations keep their scale through the few blocks (the
    images must not collapse to a constant, or pixel comparisons would prove nothing); norm
    scales are 1 and norm shifts 0; other 1-D tensors (biases, modulation tables) are small."""
    import torch

    owners = _owners(module)
    out = {}
    for key, meta in module.state_dict().items():
        name = rename(key, owners.get(key, "")) if rename else key
        if not torch.is_floating_point(meta):
            out[name] = torch.zeros(meta.shape, dtype=meta.dtype)
            continue
        leaf = name.rsplit(".", 1)[-1]
        shape = tuple(meta.shape)
        if "norm" in owners.get(key, "").lower():
            t = torch.ones(shape) if leaf in ("weight", "scale", "gamma") else torch.zeros(shape)
        elif len(shape) >= 2 and leaf in ("weight",):
            fan_in = max(1, meta[0].numel())
            t = torch.randn(shape, generator=_generator(name)) * fan_in ** -0.5
        else:
            t = torch.randn(shape, generator=_generator(name)) * 0.02
        out[name] = t.to(dtype).contiguous()
    return out


# --------------------------------------------------------------------------- families
@dataclasses.dataclass(frozen=True)
class Family:
    """A diffusion model family: what detection must read, and how a workflow drives it."""
    name: str
    expect: str                 # comfy.supported_models class detection must pick
    probe: object               # blocks -> {key: shape}: only what detection reads
    dtype: str
    vae: str                    # key into VAES
    latent: dict                # stock latent node (class_type + inputs, no batch_size)
    cond: tuple                 # (tokens, dim, pooled_dim) for the random conditioning
    attention_mask: bool = False  # the model reads the text encoder's mask (LTXV's T5)
    video: bool = False
    rename: object = None       # (key, owner class) -> key as real checkpoints name it
    sampler: tuple = ("euler", "simple")
    note: str = ""


def _rms_scale(key, owner):
    """BFL checkpoints (Flux, Chroma) name RMSNorm weights ``.scale``; ComfyUI 0.3.64 builds them
    so and 0.33.0 maps them to ``.weight``: written as ``.scale``, one file serves both."""
    return key[:-len("weight")] + "scale" if "RMSNorm" in owner and key.endswith(".weight") else key


def _hunyuan_norms(key, owner):
    """HunyuanVideo checkpoints name the q/k norms ``img_attn_q_norm.weight`` (double blocks) and
    ``q_norm.weight`` (single blocks); both ComfyUI versions map those to their own names."""
    key = re.sub(r"_attn\.norm\.(query|key)_norm\.(weight|scale)$",
                 lambda m: f"_attn_{m[1][0]}_norm.weight", key)
    return re.sub(r"\.norm\.(query|key)_norm\.(weight|scale)$", lambda m: f".{m[1][0]}_norm.weight", key)


def _blocks(prefix, n, suffix, shape):
    return {f"{prefix}{i}.{suffix}": shape for i in range(n)}


def _wan21(n):
    dim = 256       # detection: num_heads = dim // 128 -> 2 heads
    return {"head.modulation": (1, 2, dim), "head.head.weight": (16 * 4, dim),
            "patch_embedding.weight": (dim, 16, 1, 2, 2),
            **_blocks("blocks.", n, "ffn.0.weight", (2 * dim, dim))}


def _qwen_image(n):
    # hidden 3072 (24 heads x 128) and the 3584-wide text input are fixed by the model class
    return {"txt_norm.weight": (3584,), "img_in.weight": (3072, 64), "proj_out.weight": (64, 3072),
            **_blocks("transformer_blocks.", n, "img_mod.1.weight", (6 * 3072, 3072))}


def _chroma(n):
    # detection fixes the approximator (5 layers of 5120) and its 3072 output = hidden size
    return {"img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096),
            "distilled_guidance_layer.norms.0.scale": (5120,),
            **_blocks("double_blocks.", n, "img_attn.norm.key_norm.scale", (128,))}


def _hunyuan_video(n):
    hidden = 128    # detection: heads = hidden // 128, rotary axes [16, 56, 56] = one head
    return {"txt_in.individual_token_refiner.blocks.0.norm1.weight": (hidden,),
            "img_in.proj.weight": (hidden, 16, 1, 2, 2), "final_layer.linear.weight": (16 * 4, hidden),
            "txt_in.input_embedder.weight": (hidden, 4096), "vector_in.in_layer.weight": (hidden, 768),
            "guidance_in.in_layer.weight": (hidden, 256),
            **_blocks("double_blocks.", n, "img_attn_qkv.weight", (3 * hidden, hidden)),
            **_blocks("single_blocks.", n, "linear1.weight", (3 * hidden, hidden))}


LTXV_HEAD_DIM = 8   # detection: heads fixed at 32, head dim = to_k rows // 32


def _ltxv(n):
    inner = 32 * LTXV_HEAD_DIM
    return {"adaln_single.emb.timestep_embedder.linear_1.bias": (inner,),
            **_blocks("transformer_blocks.", n, "attn2.to_k.weight", (inner, inner))}


def _sd35(n):
    hidden = 64 * n     # detection: depth = hidden // 64, heads = depth
    return {"joint_blocks.0.context_block.attn.qkv.weight": (3 * hidden, hidden),
            "joint_blocks.0.context_block.attn.ln_q.weight": (64,),
            "x_embedder.proj.weight": (hidden, 16, 2, 2), "final_layer.linear.weight": (64, hidden),
            "y_embedder.mlp.0.weight": (hidden, 2048), "context_embedder.weight": (hidden, 4096),
            "pos_embed": (1, 96 * 96, hidden)}


VIDEO_LATENT = {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 17}}
IMAGE_LATENT = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64}}

FAMILIES = {f.name: f for f in [
    Family("wan21", "WAN21_T2V", _wan21, "bf16", "wan21_vae", VIDEO_LATENT, (16, 4096, 0), video=True,
           note="Wan 2.1 T2V; umt5 context 4096"),
    Family("qwen_image", "QwenImage", _qwen_image, "bf16", "wan21_vae", IMAGE_LATENT, (16, 3584, 0),
           note="hidden 3072 fixed: one block is ~340 M params"),
    # Chroma reads no pooled vector, but 0.3.64 runs it through Flux's encode_adm, which indexes
    # pooled_output (KeyError without one); 0.33.0 ignores it
    Family("chroma", "Chroma", _chroma, "bf16", "kl16_vae", IMAGE_LATENT, (16, 4096, 768), rename=_rms_scale,
           note="Flux-derived; hidden 3072 and approximator fixed; no single blocks (Flux covers them)"),
    Family("hunyuan_video", "HunyuanVideo", _hunyuan_video, "bf16", "hunyuan_video_vae", VIDEO_LATENT,
           (16, 4096, 768), video=True, rename=_hunyuan_norms, note="llama context 4096 + CLIP-L pooled 768"),
    Family("ltxv", "LTXV", _ltxv, "bf16", "ltxv_vae",
           {"class_type": "EmptyLTXVLatentVideo", "inputs": {"width": 64, "height": 64, "length": 17}},
           (16, 4096, 0), attention_mask=True, video=True, note="T5 context 4096"),
    Family("sd35", "SD3", _sd35, "bf16", "kl16_vae", IMAGE_LATENT, (16, 4096, 2048),
           note="MMDiT with RMS q/k norm (SD3.5); context 4096, pooled 2048"),
]}

# Families the issue names that cannot be tiny: detection fixes their size.
NOT_TINY = {
    "hidream": "detection hard-codes 16 double + 32 single MoE layers at 2560 wide (~17 B params)",
    "sdxl": "SDXL matching requires transformer_depth [0,0,2,2,10,10] at 320 channels (the full 2.6 B UNet)",
}


# --------------------------------------------------------------------------- VAEs
@dataclasses.dataclass(frozen=True)
class Vae:
    name: str
    build: object               # () -> nn.Module (ComfyUI class), called on the meta device
    dtype: str
    latent_channels: int
    metadata: object = None     # safetensors metadata ComfyUI reads
    fallback: str = None        # the VAES entry to write where this ComfyUI refuses this one
    note: str = ""


def _wan21_vae(dim=8):
    from comfy.ldm.wan.vae import WanVAE

    # comfy.sd.VAE of 0.33.0 reads dim (from decoder.head.0.gamma); 0.3.64 fixes it at 96.
    # dim_mult, z_dim 16, 2 res blocks per level and the 3-D (causal) convolutions are fixed.
    return WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                  temperal_downsample=[False, True, True], dropout=0.0)


def _kl16_vae():
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    dd = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3,
          "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    return AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": dd},
        decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": dd})


def _hunyuan_video_vae():
    from comfy.ldm.models.autoencoder import AutoencoderKL

    dd = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3,
          "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
          "conv3d": True, "time_compress": 4}
    return AutoencoderKL(ddconfig=dd, embed_dim=16)


LTXV_VAE_CONFIG = {
    "_class_name": "CausalVideoAutoencoder", "dims": 3, "in_channels": 3, "out_channels": 3,
    "latent_channels": 128,
    # the decoder runs these in reverse; comfy.sd.VAE recognises LTXV by its first up block's res block
    "blocks": [["res_x", 1], ["compress_all", 1], ["compress_all", 1], ["compress_all", 1], ["res_x", 1]],
    "scaling_factor": 1.0, "norm_layer": "pixel_norm", "patch_size": 4, "latent_log_var": "uniform",
    "use_quant_conv": False, "causal_decoder": False,
    "encoder_base_channels": 16, "decoder_base_channels": 16,
}


def _ltxv_vae():
    from comfy.ldm.lightricks.vae.causal_video_autoencoder import VideoVAE

    return VideoVAE(config=LTXV_VAE_CONFIG)


def _ltxv_vae_guessed():
    """The LTXV VAE comfy.sd.VAE builds for a file without "config" metadata: it reads only the
    rows of decoder.up_blocks.0.res_blocks.0.conv1 (512: version 0, 1024: versions 1 and 2)
    and takes VideoVAE's built-in config for that version. Version 0 is the smallest (~420 M
    params); no smaller LTXV VAE loads without metadata."""
    from comfy.ldm.lightricks.vae.causal_video_autoencoder import VideoVAE

    return VideoVAE(version=0)


VAES = {v.name: v for v in [
    Vae("wan21_vae", _wan21_vae, "fp32", 16, fallback="wan21_vae_dim96",
        note="Wan 2.1 VAE (3-D causal convs), dim 8 (real: 96); needs a ComfyUI that reads dim"),
    Vae("wan21_vae_dim96", lambda: _wan21_vae(96), "bf16", 16,
        note="Wan 2.1 VAE at the real width 96, for ComfyUI versions that fix it (0.3.64)"),
    Vae("kl16_vae", _kl16_vae, "bf16", 16,
        note="Flux/SD3 16-channel KL VAE; ch 128, ch_mult [1,2,4,4] fixed by comfy.sd.VAE"),
    Vae("hunyuan_video_vae", _hunyuan_video_vae, "bf16", 16,
        note="3-D KL VAE; ch 128, ch_mult [1,2,4,4] fixed by comfy.sd.VAE"),
    Vae("ltxv_vae", _ltxv_vae, "fp32", 128, metadata=lambda: {"config": json.dumps({"vae": LTXV_VAE_CONFIG})},
        fallback="ltxv_vae_v0",
        note="LTXV causal video VAE; size from the file's config metadata (as real LTXV files carry); "
             "needs a VAELoader that passes the metadata on"),
    Vae("ltxv_vae_v0", _ltxv_vae_guessed, "bf16", 128,
        note="LTXV VAE version 0 at its real size, no metadata: for VAELoaders that drop the "
             "metadata (0.3.64), which build the LTXV VAE from the tensor shapes alone"),
]}


# --------------------------------------------------------------------------- build + verify
def _dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _meta_probe(shapes):
    import torch

    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def _mismatch(want, got, what):
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing or extra or wrong:
        raise AssertionError(f"{what}: missing {missing[:5]}, unexpected {extra[:5]}, "
                             f"shape differs {[(k, want[k], got[k]) for k in wrong[:5]]}")


def detect(family, sd):
    """ComfyUI's detection of ``sd`` (a diffusion-model state dict); raises unless it is ``family``."""
    import comfy.model_detection as md

    mc = md.model_config_from_unet(sd, "")
    got = type(mc).__name__ if mc is not None else None
    if got != family.expect:
        raise AssertionError(f"{family.name}: ComfyUI detects {got}, want {family.expect}")
    return mc


def build_model(family, blocks=1):
    """(the diffusion model ComfyUI builds for the family's probe, on meta; its unet_config)."""
    import torch

    mc = detect(family, _meta_probe(family.probe(blocks)))
    with torch.device("meta"):
        model = mc.get_model({}, "", device="meta")
    return model.diffusion_model, mc.unet_config


def verify_model(family, sd, unet_config):
    """UNETLoader's own path: detect, build, load. The loaded model must have exactly our keys."""
    import comfy.sd

    mc = detect(family, sd)
    if mc.unet_config != unet_config:
        raise AssertionError(f"{family.name}: detected config {mc.unet_config} != built {unet_config}")
    patcher = comfy.sd.load_diffusion_model_state_dict(dict(sd))
    if patcher is None or type(patcher.model.model_config).__name__ != family.expect:
        raise AssertionError(f"{family.name}: load_diffusion_model_state_dict did not load it")
    as_loaded = mc.process_unet_state_dict(dict(sd))     # the file's names -> this ComfyUI's
    _mismatch(_shapes(as_loaded), _shapes(patcher.model.diffusion_model.state_dict()), family.name)
    return type(patcher.model).__name__


def build_vae(vae):
    import torch

    with torch.device("meta"):
        return vae.build()


def verify_vae(vae, path, shapes):
    """Loads the file at ``path`` with the installed ComfyUI's VAELoader node, which is how the
    workflows load it (with or without the file's metadata, as that version does). Raises unless
    it builds a VAE of ``vae.latent_channels`` holding exactly ``shapes``; returns its class."""
    import folder_paths
    import nodes

    folder_paths.add_model_folder_path("vae", os.path.dirname(path))
    loaded = nodes.VAELoader().load_vae(os.path.basename(path))[0]
    if loaded.first_stage_model is None or loaded.latent_channels != vae.latent_channels:
        raise AssertionError(f"{vae.name}: VAELoader built {type(loaded.first_stage_model).__name__} "
                             f"with {getattr(loaded, 'latent_channels', None)} latent channels")
    _mismatch(shapes, _shapes(loaded.first_stage_model.state_dict()), vae.name)
    return type(loaded.first_stage_model).__name__


# --------------------------------------------------------------------------- workflows
# Node ids of every family workflow; tests swap or wrap nodes by these ids.
TEST_NODES = os.path.join(HERE, "comfy_nodes", "vbar_test_nodes")   # custom node the workflows need
MODEL_LOADER, VAE_LOADER, POSITIVE, NEGATIVE, LATENT, SAMPLER, DECODE, SAVE = "1", "2", "3", "4", "5", "6", "7", "8"


def workflow(name, files, steps=3, seed=42, cfg=2.0, prefix=None):
    """API-format prompt with stock nodes only (plus the test-only VBARTestConditioning from
    tests/comfy_nodes, because the real text encoders are multi-GB): UNETLoader -> KSampler on the family's empty
    latent -> VAEDecode with the family's VAE -> SaveImage (a video saves one PNG per frame).

    ``files``: {"unet": ..., "vae": ...} for this family, as the last line of main()'s output
    (``FILES {json}``) or write_family() give them (file names carry a layout tag).
    Swap the loader with ``use_model_loader``; put anything between the loader and the sampler
    by setting ``wf[SAMPLER]["inputs"]["model"]`` (see comfy_env.add_budget)."""
    family = FAMILIES[name]
    tokens, dim, pooled = family.cond
    sampler, scheduler = family.sampler

    def cond(s):
        return {"class_type": "VBARTestConditioning", "inputs": {
            "tokens": tokens, "dim": dim, "pooled_dim": pooled,
            "attention_mask": family.attention_mask, "seed": s}}

    return {
        MODEL_LOADER: {"class_type": "UNETLoader", "inputs": {
            "unet_name": files["unet"], "weight_dtype": "default"}},
        VAE_LOADER: {"class_type": "VAELoader", "inputs": {"vae_name": files["vae"]}},
        POSITIVE: cond(1),
        NEGATIVE: cond(2),
        LATENT: {"class_type": family.latent["class_type"],
                 "inputs": dict(family.latent["inputs"], batch_size=1)},
        SAMPLER: {"class_type": "KSampler", "inputs": {
            "model": [MODEL_LOADER, 0], "seed": seed, "steps": steps, "cfg": cfg,
            "sampler_name": sampler, "scheduler": scheduler, "positive": [POSITIVE, 0],
            "negative": [NEGATIVE, 0], "latent_image": [LATENT, 0], "denoise": 1.0}},
        DECODE: {"class_type": "VAEDecode", "inputs": {"samples": [SAMPLER, 0], "vae": [VAE_LOADER, 0]}},
        SAVE: {"class_type": "SaveImage", "inputs": {"images": [DECODE, 0],
                                                     "filename_prefix": prefix or f"tiny_{name}"}},
    }


def use_model_loader(wf, class_type, **inputs):
    """Replace the model loader, keeping its file: e.g. ``use_model_loader(wf,
    "VBARDiffusionModelLoader")`` (same inputs as UNETLoader), or a GGUF loader with its own
    inputs (``unet_name=...gguf``). Returns ``wf``."""
    old = wf[MODEL_LOADER]["inputs"]
    wf[MODEL_LOADER] = {"class_type": class_type,
                        "inputs": dict(old) if not inputs else {"unet_name": old["unet_name"], **inputs}}
    return wf


# --------------------------------------------------------------------------- files
def layout_tag(shapes, dtype, metadata):
    """8 hex digits of the file's layout (names, shapes, dtype, metadata, seed). Files are named
    by it because a ComfyUI version may lay out the same family differently (0.3.64's LTXV VAE
    has other buffers than 0.33.0's): several versions then share one models folder safely."""
    text = json.dumps([sorted(shapes.items()), dtype, metadata, SEED])
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def file_name(name, tag, blocks=1):
    return f"tiny_{name}{'' if blocks == 1 else f'_b{blocks}'}-{tag}.safetensors"


def _save(sd, path, metadata):
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"   # several test runs may write the same models dir
    save_file(sd, tmp, metadata=metadata)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return os.path.getsize(path)


def _sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_family(name, out_dir, blocks=1, force=False, log=print):
    """Writes the family's diffusion model and its VAE under ``out_dir``; returns a report dict."""
    family = FAMILIES[name]
    report = {}
    t0 = time.time()
    module, cfg = build_model(family, blocks)
    meta = {"vbar_tests": f"tiny_{name} blocks={blocks} seed={SEED}"}
    unet = file_name(name, layout_tag(file_shapes(module, family.rename), family.dtype, meta), blocks)
    path = os.path.join(out_dir, "diffusion_models", unet)
    if force or not os.path.isfile(path):
        sd = random_state_dict(module, _dtype(family.dtype), family.rename)
        loaded_as = verify_model(family, sd, cfg)
        size = _save(sd, path, meta)
        report[name] = {"file": path, "detected": family.expect, "model": loaded_as, "bytes": size,
                        "params": sum(t.numel() for t in sd.values()), "seconds": round(time.time() - t0, 1)}
        del sd
    vae, vae_report = write_vae(family.vae, out_dir, force)
    report.update(vae_report)
    for k, v in report.items():
        log(f"{k}: {json.dumps(v)}")
    return {"unet": unet, "vae": vae}, report


def write_vae(name, out_dir, force=False):
    """Writes VAES[name], or its fallback where this ComfyUI's VAELoader refuses it (checked on
    the file itself); returns (file name, report)."""
    vae = VAES[name]
    t0 = time.time()
    os.makedirs(out_dir, exist_ok=True)
    module = build_vae(vae)
    shapes = file_shapes(module)
    meta = vae.metadata() if vae.metadata else {"vbar_tests": f"tiny_{name} seed={SEED}"}
    fname = file_name(name, layout_tag(shapes, vae.dtype, meta))
    path = os.path.join(out_dir, "vae", fname)

    def refused(err):       # a ComfyUI that fixes what this VAE varies: write the fallback
        fallback, report = write_vae(vae.fallback, out_dir, force)
        return fallback, {name: {"refused_by_vae_loader": str(err)[:300]}, **report}

    if not force and os.path.isfile(path):
        if not vae.fallback:
            return fname, {}
        try:    # written by a ComfyUI that takes it (the models folder may be shared)
            verify_vae(vae, path, shapes)
            return fname, {}
        except Exception as e:
            return refused(e)
    sd = random_state_dict(module, _dtype(vae.dtype))
    check = tempfile.mkdtemp(prefix=".vae_check-", dir=out_dir)   # beside vae/, not listed in it
    try:
        size = _save(sd, os.path.join(check, fname), meta)
        try:
            built = verify_vae(vae, os.path.join(check, fname), shapes)
        except Exception as e:
            if not vae.fallback:
                raise
            return refused(e)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.replace(os.path.join(check, fname), path)
    finally:
        shutil.rmtree(check, ignore_errors=True)
    return fname, {name: {"file": path, "model": built, "bytes": size,
                         "params": sum(t.numel() for t in sd.values()), "seconds": round(time.time() - t0, 1)}}


def known_families():
    """Families this ComfyUI's detection knows (the supported_models class exists)."""
    import comfy.supported_models as sm

    return [n for n, f in FAMILIES.items() if hasattr(sm, f.expect) and _detects(f)]


def _detects(family):
    try:
        detect(family, _meta_probe(family.probe(1)))
        return True
    except Exception:
        return False


def run_writer(python, comfy_dir, out_dir, only=(), blocks=1, timeout=900):
    """Runs this file with a ComfyUI venv's ``python`` (it imports that ComfyUI, so it cannot run
    in the caller's process) and returns the FILES it prints: {family: {"unet": ..., "vae": ...}}
    for ``only`` (default: every family this ComfyUI knows), written under ``out_dir`` or
    already there."""
    import subprocess

    cmd = [python, os.path.abspath(__file__), "--out-dir", out_dir, "--blocks", str(blocks)]
    if only:
        cmd += ["--only", ",".join(only)]
    out = subprocess.run(cmd, env=dict(os.environ, COMFYUI_DIR=comfy_dir), capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n"
                           f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    line = [x for x in out.stdout.splitlines() if x.startswith("FILES ")][-1]
    return json.loads(line[len("FILES "):])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfy-dir", default=os.environ.get("COMFYUI_DIR"), help="ComfyUI checkout (COMFYUI_DIR)")
    ap.add_argument("--out-dir", default=os.environ.get("COMFY_HARNESS_MODELS"), help="models root")
    ap.add_argument("--only", default="", help="comma list of families (default: all this ComfyUI knows)")
    ap.add_argument("--blocks", type=int, default=1, help="blocks of each repeated kind (>= 1)")
    ap.add_argument("--force", action="store_true", help="rewrite existing files")
    ap.add_argument("--list", action="store_true", help="print the families this ComfyUI knows and exit")
    ap.add_argument("--sha256", action="store_true", help="print each written file's sha256")
    a = ap.parse_args(argv)
    if not a.comfy_dir:
        ap.error("--comfy-dir or COMFYUI_DIR is required")
    import_comfy(a.comfy_dir)
    known = known_families()
    if a.list:
        print(json.dumps({"comfyui": comfy_version(a.comfy_dir), "families": known,
                          "unknown": [n for n in FAMILIES if n not in known], "not_tiny": NOT_TINY}))
        return 0
    if not a.out_dir:
        ap.error("--out-dir or COMFY_HARNESS_MODELS is required")
    wanted = [x for x in a.only.split(",") if x] or known
    bad = [x for x in wanted if x not in known]
    if bad:
        ap.error(f"ComfyUI {comfy_version(a.comfy_dir)} does not know {bad} (known: {known})")
    report, files = {}, {}
    for name in wanted:
        files[name], written = write_family(name, os.path.abspath(a.out_dir), a.blocks, a.force)
        report.update(written)
    if a.sha256:
        for v in report.values():
            if "file" in v:     # not a VAE the VAELoader refused (its fallback was written)
                print(f"sha256 {os.path.basename(v['file'])} {_sha(v['file'])}")
    # last line: which files the workflows of this ComfyUI use (tests read it)
    print("FILES " + json.dumps(files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
