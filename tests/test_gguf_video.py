"""GGUF files laid out as ComfyUI-GGUF writes video models: the 3-D convolution's 5-D weight
kept as a 5-D F32 tensor (its fix_5d_tensors step), read by the pack's reader and run through a
VBAR Conv3d; and the test writer's per-arch rules (tests/gguf_helpers.write_comfyui_gguf)."""
import struct

import numpy as np
import pytest
import torch
import torch.nn as nn
from gguf import GGMLQuantizationType as QT

from gguf_helpers import converter_arch, reference_state_dict, write_comfyui_gguf, write_gguf
from vbar_loaders.loaders.errors import GGUFError
from vbar_loaders.loaders.gguf.file import GGUFFile
from vbar_loaders.loaders.gguf.weights import attach_sources, gguf_state_dict
from vbar_loaders.loaders.runtime.vbar_modules import vbarize
from vbar_loaders.loaders.runtime.weight_store import WeightStore
from vbar_loaders.vram import Pool
from vbar_loaders.vram.host_backend import HostBackend

DIM = 256


class TinyWanParts(nn.Module):
    """Wan 2.1's key names for the parts the converter treats specially: the Conv3d patch
    embedding (5-D weight), a text embedding, one block's norm and modulation, the head."""

    def __init__(self):
        super().__init__()
        self.patch_embedding = nn.Conv3d(16, DIM, (1, 2, 2), stride=(1, 2, 2))
        self.text_embedding = nn.Sequential(nn.Linear(64, DIM), nn.GELU(), nn.Linear(DIM, DIM))
        self.blocks = nn.ModuleList([nn.Module()])
        self.blocks[0].self_attn = nn.Module()
        self.blocks[0].self_attn.norm_q = nn.RMSNorm(DIM)
        self.blocks[0].modulation = nn.Parameter(torch.randn(1, 6, DIM))
        self.head = nn.Module()
        self.head.modulation = nn.Parameter(torch.randn(1, 2, DIM))

    def forward(self, x, ctx):
        return self.patch_embedding(x), self.text_embedding(ctx)


def _wan_sd(seed=0):
    torch.manual_seed(seed)
    m = TinyWanParts()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    return m, m.state_dict()


def test_comfyui_gguf_wan_layout_is_read_with_its_5d_weight(tmp_path):
    m, sd = _wan_sd()
    path = tmp_path / "wan.gguf"
    assert write_comfyui_gguf(path, sd, QT.Q8_0) == "wan"
    gf = GGUFFile(path)
    assert gf.architecture == "wan"
    info = gf.info("patch_embedding.weight")
    assert info.qtype == QT.F32 and info.shape == (DIM, 16, 1, 2, 2)
    assert torch.equal(gf.tensor("patch_embedding.weight"), sd["patch_embedding.weight"])
    # The converter's rules: modulation stays F32 (high precision), big 2-D weights quantize.
    assert gf.info("blocks.0.modulation").qtype == QT.F32
    assert gf.info("head.modulation").qtype == QT.F32
    assert gf.info("text_embedding.2.weight").qtype == QT.Q8_0
    # gguf-py (what ComfyUI-GGUF reads with) sees the same tensors and values.
    ref = reference_state_dict(path)
    assert set(ref) == set(gf.keys())
    assert torch.equal(ref["patch_embedding.weight"], gf.tensor("patch_embedding.weight"))


def test_conv3d_from_a_gguf_runs_through_the_vbar(tmp_path):
    m, sd = _wan_sd(1)
    path = tmp_path / "wan.gguf"
    write_comfyui_gguf(path, sd, QT.Q8_0)
    ref = reference_state_dict(path)
    gf = GGUFFile(path)
    expect_model = TinyWanParts()
    expect_model.load_state_dict(ref)
    loaded = gguf_state_dict(gf)
    x = torch.randn(1, 16, 5, 8, 8)
    ctx = torch.randn(1, 7, 64)
    with torch.no_grad():
        want = expect_model(x, ctx)
    for budget in (64 << 20, 96 << 10):    # everything resident / less than one layer at a time
        model_b = _fresh(loaded)
        pool = Pool(HostBackend(), budget=budget)
        vbarize(model_b, WeightStore(f"wan{budget}", pool, page_size=64 << 10))
        assert type(model_b.patch_embedding).__name__ == "VbarConv3d"
        with torch.no_grad():
            got = model_b(x, ctx)
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def _fresh(loaded):
    model = TinyWanParts()
    for name, mod in model.named_modules():
        for pname in ("weight", "bias"):
            key = f"{name}.{pname}"
            if key in loaded and pname in mod._parameters:
                mod._parameters[pname] = nn.Parameter(loaded[key], requires_grad=False)
    attach_sources(model)
    return model


def _ndims_at(data, name):
    """Offset of the dimension count in tensor ``name``'s info record (it follows the name)."""
    return data.index(name.encode()) + len(name)


def test_more_than_five_dimensions_is_still_refused(tmp_path):
    path = tmp_path / "six.gguf"
    write_gguf(path, {"x.weight": (np.ones((1, 1, 1, 1, 2, 32), np.float32), QT.F32)}, arch="wan")
    with pytest.raises(GGUFError, match=r"'x.weight'.*6 dimensions \(1 to 5 supported\)"):
        GGUFFile(path)
    # and a corrupt count in a real 5-D record is refused too, naming the tensor
    path5 = tmp_path / "five.gguf"
    write_gguf(path5, {"p.weight": (np.ones((2, 1, 1, 2, 32), np.float32), QT.F32)}, arch="wan")
    assert GGUFFile(path5).info("p.weight").shape == (2, 1, 1, 2, 32)
    data = bytearray(path5.read_bytes())
    struct.pack_into("<I", data, _ndims_at(data, "p.weight"), 9)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="9 dimensions"):
        GGUFFile(bad)


def test_writer_rules_per_arch(tmp_path):
    rng = np.random.default_rng(0)
    # SD1/SDXL UNets: conv weights whose last dim is not a multiple of 256 go to 256-wide rows
    # with an orig_shape record; 1-D and tiny tensors F32.
    keys = ["input_blocks.3.0.op.weight", "input_blocks.6.0.op.weight", "input_blocks.9.0.op.weight",
            "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
            "output_blocks.8.2.conv.weight"]
    sd = {k: rng.standard_normal((32, 32, 3, 3)).astype(np.float32) for k in keys}
    sd["out.0.bias"] = rng.standard_normal(32).astype(np.float32)
    path = tmp_path / "sd1.gguf"
    assert write_comfyui_gguf(path, sd, QT.Q4_0) == "sd1"
    gf = GGUFFile(path)
    info = gf.info("input_blocks.3.0.op.weight")
    assert info.shape == (32, 32, 3, 3) and info.stored_shape == (36, 256) and info.qtype == QT.Q4_0
    assert gf.info("out.0.bias").qtype == QT.F32
    assert gf.field("comfy.gguf.orig_shape.input_blocks.3.0.op.weight") == [32, 32, 3, 3]
    # Flux (and Chroma, written as flux) is never reshaped; a row that does not fit the block
    # falls back to Q8_0, then F16.
    sd = {"double_blocks.0.img_attn.proj.weight": rng.standard_normal((64, 96)).astype(np.float32),
          "img_in.weight": rng.standard_normal((64, 40)).astype(np.float32)}
    path = tmp_path / "flux.gguf"
    assert write_comfyui_gguf(path, sd, QT.Q4_K) == "flux"
    gf = GGUFFile(path)
    assert gf.info("double_blocks.0.img_attn.proj.weight").qtype == QT.Q8_0
    assert gf.info("img_in.weight").qtype == QT.F16
    assert not [k for k in gf.fields() if k.startswith("comfy.gguf.orig_shape")]
    with pytest.raises(ValueError, match="no ComfyUI-GGUF architecture"):
        converter_arch(["foo.weight"])
