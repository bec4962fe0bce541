"""Loader entry points that need no ComfyUI: file refusal happens before ComfyUI is touched."""
import pickle

import pytest

from vbar_loaders.loaders.comfyui.loading import open_state_dict
from vbar_loaders.loaders.errors import ModelFileError


@pytest.mark.parametrize("ext", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickles_are_refused_by_extension(tmp_path, ext):
    path = tmp_path / f"model{ext}"
    path.write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(ModelFileError, match="pickle") as e:
        open_state_dict(path)
    assert str(path) in str(e.value) and "safetensors" in str(e.value)


def test_pickle_renamed_to_safetensors_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(ModelFileError) as e:
        open_state_dict(path)
    assert str(path) in str(e.value)


def test_triple_and_quadruple_clip_loaders_pass_their_files_in_order(monkeypatch):
    """The wiring of the 3- and 4-encoder nodes (their loading is the dual loader's, tested in
    real ComfyUI; no tiny CLIP-G exists to run SD3/HiDream encoders end to end)."""
    import sys
    import types

    import torch

    import vbar_loaders.loaders.comfyui.gguf as cg
    from vbar_loaders import nodes

    fake = types.SimpleNamespace(get_full_path_or_raise=lambda folder, name: f"/m/{folder}/{name}",
                                 get_folder_paths=lambda folder: ["/m/embeddings"])
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    calls = []
    monkeypatch.setattr(cg, "load_text_encoders", lambda *a: calls.append(a) or "CLIP")
    triple = nodes.NODE_CLASS_MAPPINGS["VBARGGUFTripleCLIPLoader"]()
    assert triple.load(clip_name1="l.gguf", clip_name2="g.safetensors", clip_name3="t5.gguf") == ("CLIP",)
    assert calls[-1] == (["/m/text_encoders/l.gguf", "/m/text_encoders/g.safetensors",
                          "/m/text_encoders/t5.gguf"], "stable_diffusion", ["/m/embeddings"], {})
    quad = nodes.NODE_CLASS_MAPPINGS["VBARGGUFQuadrupleCLIPLoader"]()
    assert quad.load(clip_name1="l", clip_name2="g", clip_name3="t5", clip_name4="llama.gguf",
                     device="cpu") == ("CLIP",)
    paths, kind, _, options = calls[-1]
    assert paths[-1] == "/m/text_encoders/llama.gguf" and len(paths) == 4 and kind == "stable_diffusion"
    assert options == {"load_device": torch.device("cpu"), "offload_device": torch.device("cpu")}
    names = nodes.NODE_DISPLAY_NAME_MAPPINGS
    assert names["VBARGGUFQuadrupleCLIPLoader"] == "VBAR GGUF Quadruple CLIP Loader"
