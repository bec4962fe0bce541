"""Loader entry points that need no ComfyUI: file refusal happens before ComfyUI is touched."""
import pickle

import pytest

from vbar_loaders.loaders.comfy_loaders import open_state_dict
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
