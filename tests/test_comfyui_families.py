"""Real ComfyUI (COMFYUI_PATH): the tiny model families of tests/tiny_families.py run end to end
through stock nodes (UNETLoader, KSampler, the family's latent and VAE), give the same pixels
twice, and give the same pixels through the pack's VBAR diffusion-model loader at an unlimited
and a tiny budget. Video families decode a 5-D latent (17 frames) and save every frame."""
import pytest

import tiny_families as tf
from comfy_env import add_budget, comfy_paths, image_digest, start_server

pytestmark = pytest.mark.comfyui

BUDGETS_GB = {"unlimited": 64.0, "tiny": 0.001}   # tiny < one page: every layer streams


@pytest.fixture(scope="module")
def comfy():
    comfy, harness, python, models = comfy_paths()
    files = write_models(comfy, python, models)
    srv = start_server(harness, comfy, python, models, extra_nodes=[tf.TEST_NODES])
    srv.family_files = files
    srv.stock = {}          # family -> digest of the stock run (shared by the tests below)
    yield srv
    srv.stop()


def write_models(comfy, python, models):
    """Writes the families this ComfyUI knows (skips files already there); returns their files."""
    return tf.run_writer(python, comfy, models)


def run(srv, wf):
    result = srv.run(wf, fresh_cache=True)
    assert result.status == "success", result.errors
    return result


def digest(result):
    """sha256 over the image data (IDAT chunks) of every saved PNG, in frame order; the PNG's
    text chunk holds the prompt, which names the loader, so it is left out."""
    return image_digest(sorted(result.files))


def pixel_spread(path):
    """Standard deviation of the pixel values: a random model that collapsed to a flat or
    NaN-black image would make every comparison trivially equal."""
    from PIL import Image, ImageStat

    with Image.open(path) as im:
        return max(ImageStat.Stat(im.convert("RGB")).stddev)


def family_workflow(srv, name):
    if name not in srv.family_files:
        pytest.skip(f"this ComfyUI's detection does not know {name}")
    return tf.workflow(name, srv.family_files[name])


def stock_digest(srv, name):
    if name not in srv.stock:
        srv.stock[name] = digest(run(srv, family_workflow(srv, name)))
    return srv.stock[name]


@pytest.mark.parametrize("name", list(tf.FAMILIES))
def test_stock_workflow_runs_and_repeats(comfy, name):
    family = tf.FAMILIES[name]
    first = run(comfy, family_workflow(comfy, name))
    frames = family.latent["inputs"]["length"] if family.video else 1
    assert len(first.files) == frames, (len(first.files), frames)
    spreads = [pixel_spread(p) for p in first.files]
    assert min(spreads) > 2.0, f"{name}: a flat image (pixel std {min(spreads):.2f})"
    again = digest(run(comfy, family_workflow(comfy, name)))
    assert digest(first) == again, f"{name}: the same prompt gave other pixels"
    comfy.stock.setdefault(name, again)


@pytest.mark.parametrize("budget", list(BUDGETS_GB))
@pytest.mark.parametrize("name", list(tf.FAMILIES))
def test_vbar_loader_matches_stock(comfy, name, budget):
    want = stock_digest(comfy, name)
    wf = tf.use_model_loader(family_workflow(comfy, name), "VBARDiffusionModelLoader")
    wf[tf.SAMPLER]["inputs"]["model"] = add_budget(wf, [tf.MODEL_LOADER, 0], BUDGETS_GB[budget])
    got = digest(run(comfy, wf))
    assert got == want, f"{name} at budget {budget}: VBAR loader's pixels differ from UNETLoader's"
