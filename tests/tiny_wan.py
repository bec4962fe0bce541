"""A tiny Wan 2.1 T2V diffusion model and Wan VAE from ComfyUI's own classes, seeded; run with
the ComfyUI Python:  python tests/tiny_wan.py <out models dir>  (COMFYUI_DIR=<ComfyUI>).

Writes diffusion_models/tiny_wan21.safetensors (2 blocks, hidden 256: the fewest heads
detection allows, since it reads num_heads as dim // 128) and vae/tiny_wan21_vae.safetensors
(dim 8; ComfyUI 0.33.0 reads dim from the file, 0.3.64 fixes it at 96 and cannot load it).
Built on the meta device from what detection returns, filled with the harness's seeded fill,
and checked through ComfyUI's own UNETLoader path and comfy.sd.VAE.
NOTE: duplicates the Wan entry of the family models being written on branch `fam`
(tests/tiny_families.py); merge into that one.
"""
import os
import sys

BLOCKS, DIM = 2, 256
MODEL, VAE = "tiny_wan21.safetensors", "tiny_wan21_vae.safetensors"


def _probe(torch):
    shapes = {"head.modulation": (1, 2, DIM), "head.head.weight": (16 * 4, DIM),
              "patch_embedding.weight": (DIM, 16, 1, 2, 2)}
    shapes.update({f"blocks.{i}.ffn.0.weight": (2 * DIM, DIM) for i in range(BLOCKS)})
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def build(out):
    harness = os.environ.get("COMFY_HARNESS") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "comfy_harness")
    sys.path.insert(0, os.path.abspath(harness))
    import tiny_models as tm

    tm.import_comfy(os.environ["COMFYUI_DIR"])
    import comfy.model_detection as md
    import comfy.sd
    import torch
    from comfy.ldm.wan.vae import WanVAE
    from safetensors.torch import save_file

    mc = md.model_config_from_unet(_probe(torch), "")
    assert type(mc).__name__ == "WAN21_T2V", type(mc).__name__
    with torch.device("meta"):
        model = mc.get_model({}, "", device="meta").diffusion_model
    sd = tm.fill_state_dict(model, "", torch.float16)
    patcher = comfy.sd.load_diffusion_model_state_dict(dict(sd))
    assert type(patcher.model.model_config).__name__ == "WAN21_T2V"
    assert set(patcher.model.diffusion_model.state_dict()) == set(sd)
    os.makedirs(os.path.join(out, "diffusion_models"), exist_ok=True)
    save_file(sd, os.path.join(out, "diffusion_models", MODEL))

    vae = tm.meta_build(lambda: WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                       attn_scales=[], temperal_downsample=[False, True, True],
                                       dropout=0.0))
    vsd = tm.fill_state_dict(vae, "", torch.float32)
    loaded = comfy.sd.VAE(sd=dict(vsd))
    assert loaded.latent_channels == 16 and isinstance(loaded.first_stage_model, WanVAE)
    os.makedirs(os.path.join(out, "vae"), exist_ok=True)
    save_file(vsd, os.path.join(out, "vae", VAE))


if __name__ == "__main__":
    build(sys.argv[1])
