"""Real ComfyUI (COMFYUI_PATH): every tiny model family of tests/tiny_families.py that this
ComfyUI detects, converted to GGUF as ComfyUI-GGUF's converter lays files out (Q8_0 where a row
fits its blocks, F32 for 1-D/small/high-precision tensors, 5-D patch embeddings of Wan and
HunyuanVideo kept 5-D F32; tests/gguf_helpers.write_comfyui_gguf), runs through the VBAR GGUF
loader and gives the pixels of the stock UNETLoader fed the same weights dequantized by gguf-py
(float32 safetensors), at an unlimited and at a tiny budget (every layer streamed).

On CPU the models compute in float32 and our dequantization is gguf-py's bit for bit, so the
PNGs must be identical. Video families decode a 5-D latent (17 frames) with their own VAE."""
import os

import pytest

import tiny_families as tf
from comfy_env import add_budget, comfy_paths, start_server
from test_comfyui_families import BUDGETS_GB, digest, pixel_spread, write_models

pytestmark = pytest.mark.comfyui

QTYPE = "Q8_0"


def gguf_names(unet):
    """(the GGUF's file name, its float32 reference's) for a family's safetensors name."""
    stem = unet[:-len(".safetensors")]
    return f"{stem}_{QTYPE}.gguf", f"{stem}_{QTYPE}_ref.safetensors"


def convert_family(src, dst_gguf, dst_ref):
    """The family's file as a ComfyUI-GGUF-style GGUF and its gguf-py reference; returns
    {qtype name: tensor count} of what was written (checked by the caller)."""
    import gguf
    from safetensors.torch import load_file

    from gguf_helpers import write_comfyui_gguf, write_reference_safetensors

    write_comfyui_gguf(dst_gguf, load_file(str(src)), getattr(gguf.GGMLQuantizationType, QTYPE))
    write_reference_safetensors(dst_gguf, dst_ref)
    counts = {}
    for t in gguf.GGUFReader(str(dst_gguf)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """A server over a models folder holding, per family, its GGUF, the reference and a link to
    its VAE. ``srv.family_files[name]``: {"unet": reference, "vae": ..., "gguf": ...}."""
    comfy, harness, python, base = comfy_paths()
    try:
        import gguf  # noqa: F401
    except ImportError:
        pytest.skip("the gguf package is not installed (pip install gguf)")
    written = write_models(comfy, python, base)
    d = tmp_path_factory.mktemp("family_gguf_models")
    for sub in ("diffusion_models", "vae"):
        os.makedirs(d / sub)
    files = {}
    for name, f in written.items():
        gguf_name, ref_name = gguf_names(f["unet"])
        counts = convert_family(os.path.join(base, "diffusion_models", f["unet"]),
                                d / "diffusion_models" / gguf_name, d / "diffusion_models" / ref_name)
        # what the comparison covers: quantized weights, and the 5-D F32 tensors of video DiTs
        assert counts.get(QTYPE, 0) > 0, f"{name}: no {QTYPE} tensor written: {counts}"
        if not os.path.lexists(d / "vae" / f["vae"]):
            os.symlink(os.path.join(base, "vae", f["vae"]), d / "vae" / f["vae"])
        files[name] = {"unet": ref_name, "vae": f["vae"], "gguf": gguf_name, "qtypes": counts}
    srv = start_server(harness, comfy, python, str(d), extra_nodes=[tf.TEST_NODES])
    srv.family_files = files
    srv.stock = {}          # family -> digest of the stock run on the reference
    yield srv
    srv.stop()


def run(srv, wf):
    result = srv.run(wf, fresh_cache=True)
    assert result.status == "success", result.errors
    return result


def family_workflow(srv, name):
    if name not in srv.family_files:
        pytest.skip(f"this ComfyUI's detection does not know {name}")
    return tf.workflow(name, srv.family_files[name], prefix=f"gguf_{name}")


def stock_digest(srv, name):
    """UNETLoader on the gguf-py reference; its images must not be flat (an all-equal
    comparison would prove nothing)."""
    if name not in srv.stock:
        result = run(srv, family_workflow(srv, name))
        spread = min(pixel_spread(p) for p in result.files)
        assert spread > 2.0, f"{name}: a flat image from the reference (pixel std {spread:.2f})"
        srv.stock[name] = digest(result)
    return srv.stock[name]


def test_video_families_keep_5d_f32_patch_embedding(comfy):
    """The files hold what real Wan/HunyuanVideo GGUFs hold: the 3-D convolution's weight as
    a 5-D F32 tensor (ComfyUI-GGUF's fix_5d_tensors), which the loader must accept."""
    import gguf

    want = {"wan21": "patch_embedding.weight", "hunyuan_video": "img_in.proj.weight"}
    seen = [n for n in want if n in comfy.family_files]
    if not seen:
        pytest.skip("this ComfyUI detects neither Wan 2.1 nor HunyuanVideo")
    for name in seen:
        path = os.path.join(comfy.models_dir, "diffusion_models", comfy.family_files[name]["gguf"])
        t = next(t for t in gguf.GGUFReader(path).tensors if t.name == want[name])
        assert len(t.shape) == 5 and t.tensor_type.name == "F32", (name, t.shape, t.tensor_type)


@pytest.mark.parametrize("budget", list(BUDGETS_GB))
@pytest.mark.parametrize("name", list(tf.FAMILIES))
def test_vbar_gguf_loader_matches_stock(comfy, name, budget):
    want = stock_digest(comfy, name)
    wf = tf.use_model_loader(family_workflow(comfy, name), "VBARGGUFDiffusionModelLoader",
                             unet_name=comfy.family_files[name]["gguf"],
                             dequant_dtype="default", patch_dtype="default")
    wf[tf.SAMPLER]["inputs"]["model"] = add_budget(wf, [tf.MODEL_LOADER, 0], BUDGETS_GB[budget])
    got = digest(run(comfy, wf))
    assert got == want, (f"{name} ({QTYPE}) at budget {budget}: the VBAR GGUF loader's pixels "
                         f"differ from UNETLoader's on the gguf-py reference")
