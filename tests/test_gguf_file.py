"""GGUF files: validated reading, logical shapes, and quantized weights through the VBAR.

Files are written with gguf-py's GGUFWriter (quantized by gguf-py, Q4_K by tests/gguf_helpers)
from a small model with real Flux key names; outputs through the VBAR must equal the same model
with its weights dequantized by gguf-py's reference decoder, at every budget.
"""
import pickle
import struct

import gguf
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

from gguf_helpers import fits, reference_state_dict, write_gguf
from vbar_loaders.loaders.gguf import file as gguf_file
from vbar_loaders.loaders.errors import GGUFError
from vbar_loaders.loaders.gguf.file import GGUFFile
from vbar_loaders.loaders.gguf.names import t5_name, text_encoder_names
from vbar_loaders.loaders.gguf.weights import (Decoder, GGUFWeight, attach_sources, choice_dtype,
                                               dequantize_unmanaged, gguf_state_dict,
                                               set_patch_dtype)
from vbar_loaders.loaders.runtime.vbar_modules import vbarize
from vbar_loaders.loaders.runtime.weight_store import WeightStore
from vbar_loaders.vram import Pool
from vbar_loaders.vram.host_backend import HostBackend

PAGE = 64 << 10
D, MLP, TXT, IN = 256, 1024, 512, 64


class TinyFlux(nn.Module):
    """Flux's layer names and layout (one double and one single block), small widths."""

    def __init__(self):
        super().__init__()
        L = nn.Linear
        self.img_in = L(IN, D)
        self.txt_in = L(TXT, D)
        self.time_in = nn.ModuleDict({"in_layer": L(D, D), "out_layer": L(D, D)})
        blk = nn.Module()
        blk.img_mod = nn.ModuleDict({"lin": L(D, 6 * D)})
        blk.img_attn = nn.ModuleDict({"qkv": L(D, 3 * D), "proj": L(D, D)})
        blk.img_mlp = nn.Sequential(L(D, MLP), nn.GELU(approximate="tanh"), L(MLP, D))
        blk.img_norm1 = nn.LayerNorm(D, elementwise_affine=False)
        self.double_blocks = nn.ModuleList([blk])
        sb = nn.Module()
        sb.linear1 = L(D, 3 * D + MLP)
        sb.linear2 = L(D + MLP, D)
        self.single_blocks = nn.ModuleList([sb])
        self.final_layer = nn.ModuleDict({"linear": L(D, IN)})
        self.conv_in = nn.Conv2d(16, 32, 3, padding=1)   # conv: stored flattened (orig_shape)

    def forward(self, img, txt, t):
        b = self.double_blocks[0]
        vec = self.time_in["out_layer"](F.silu(self.time_in["in_layer"](t)))
        x = self.img_in(img) + self.txt_in(txt)
        shift, scale, gate = b.img_mod["lin"](F.silu(vec)).chunk(6, -1)[:3]
        h = b.img_norm1(x) * (1 + scale) + shift
        q, k, v = b.img_attn["qkv"](h).chunk(3, -1)
        x = x + gate * b.img_attn["proj"](F.scaled_dot_product_attention(q, k, v))
        x = x + b.img_mlp(x)
        s = self.single_blocks[0]
        qkv, mlp = s.linear1(x).split([3 * D, MLP], -1)
        x = x + s.linear2(torch.cat([qkv[..., :D], F.gelu(mlp, approximate="tanh")], -1))
        c = self.conv_in(x[:, :16].reshape(x.shape[0], 16, 16, 16))
        return self.final_layer["linear"](x) + c.mean()


def inputs():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(2, 32, IN, generator=g), torch.randn(2, 32, TXT, generator=g),
            torch.randn(2, 1, D, generator=g))


def write_model(path, qtype, seed=0, arch="flux"):
    """TinyFlux's random weights as GGUF: 2-D+ tensors ``qtype`` where the row fits the block
    (else Q8_0), 1-D F32, the conv flattened into 256-wide rows with an orig_shape record."""
    torch.manual_seed(seed)
    sd = TinyFlux().state_dict()
    tensors, orig = {}, {}
    for k, v in sd.items():
        x = v.numpy() * (4.0 if v.ndim > 1 else 1.0)
        if v.ndim == 1:
            qt = QT.F32
        elif k == "conv_in.weight":
            qt = qtype if qtype in (QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K) else QT.Q8_0
            orig[k] = (x.size // 256, 256)
        else:
            qt = qtype if fits(x.shape, qtype) else QT.Q8_0
        tensors[k] = (x, qt)
    write_gguf(path, tensors, arch=arch, orig_shapes=orig)
    return path


def meta_model():
    with torch.device("meta"):
        return TinyFlux().eval()


def adopt(model, sd):
    """What our ComfyUI ops do in _load_from_state_dict: take the tensors as they are."""
    for name, m in model.named_modules():
        for pname in [n for n, p in m._parameters.items() if p is not None]:
            m._parameters[pname] = nn.Parameter(sd[f"{name}.{pname}"], requires_grad=False)
    return model


def reference_model(path, dtype=None, quantized_only=False):
    """TinyFlux with gguf-py's decoded weights (rounded to ``dtype`` if given: all of them, or
    only the quantized ones)."""
    ref = reference_state_dict(path)
    if dtype is not None:
        gf = GGUFFile(path)
        ref = {k: v.to(dtype).float() if gf.info(k).quantized or not quantized_only else v
               for k, v in ref.items()}
    model = TinyFlux().eval()
    model.load_state_dict(ref)
    return model


QTYPES = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    return {qt: write_model(d / f"tiny_flux_{qt.name}.gguf", qt) for qt in QTYPES}


def packed_bytes(model):
    return sum(p.vbar_packed.numel() if isinstance(p, GGUFWeight) else p.numel() * p.element_size()
               for p in model.parameters())


@pytest.mark.parametrize("qt", QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("budget", ["unlimited", "half", "tiny"])
def test_vbar_outputs_equal_reference_dequantized_model(files, qt, budget):
    path = files[qt]
    x = inputs()
    with torch.no_grad():
        want = reference_model(path)(*x)
    gf = GGUFFile(path)
    model = adopt(meta_model(), gguf_state_dict(gf))
    assert attach_sources(model) == sum(1 for i in map(gf.info, gf.keys()) if i.quantized)
    total = packed_bytes(model)
    pool = Pool(HostBackend(), budget={"unlimited": 4 * total + (16 << 20), "half": total // 2,
                                       "tiny": PAGE}[budget])
    store = WeightStore("tiny_flux", pool, page_size=PAGE)
    vbarize(model, store)
    try:
        # the slots hold packed bytes: 4-8x fewer than the float32 weights they decode to
        assert sum(h.nbytes for h in store.handles) == total
        assert model.double_blocks[0].img_attn["qkv"].weight.shape == (3 * D, D)
        with torch.no_grad():
            for _ in range(2):
                assert torch.equal(model(*x), want)
        st = pool.stats()
        assert st["resident_bytes"] <= pool.budget()
        if budget == "unlimited":
            assert st["offloaded"] == 0 and st["hits"] > 0
        if budget == "tiny":
            assert st["offloaded"] > 0
    finally:
        pool.close()


def test_dequant_dtype_rounds_once_to_the_chosen_dtype(files):
    path = files[QT.Q4_K]
    x = inputs()
    with torch.no_grad():
        want = reference_model(path, torch.bfloat16, quantized_only=True)(*x)
    model = adopt(meta_model(), gguf_state_dict(GGUFFile(path), dequant_dtype=torch.bfloat16))
    attach_sources(model)
    pool = Pool(HostBackend(), budget=64 << 20)
    vbarize(model, WeightStore("m", pool, page_size=PAGE))
    with torch.no_grad():
        assert torch.equal(model(*x), want)
    pool.close()


def test_default_dequant_rounds_through_the_layers_weight_dtype(files):
    """"default": what ComfyUI would store (vbar_store_dtype), then the compute dtype."""
    path = files[QT.Q8_0]
    x = inputs()
    with torch.no_grad():
        want = reference_model(path, torch.float16)(*x)
    model = meta_model()
    for m in model.modules():
        m.vbar_store_dtype = torch.float16
    adopt(model, gguf_state_dict(GGUFFile(path)))
    attach_sources(model)
    # plain (F32) tensors are held in the same dtype, as for safetensors files
    pool = Pool(HostBackend(), budget=64 << 20)
    vbarize(model, WeightStore("m", pool, page_size=PAGE))
    with torch.no_grad():
        assert torch.equal(model(*x), want)
    pool.close()


def test_patches_run_after_dequant_in_the_patch_dtype(files):
    gf = GGUFFile(files[QT.Q8_0])
    model = adopt(meta_model(), gguf_state_dict(gf))
    attach_sources(model)
    pool = Pool(HostBackend(), budget=64 << 20)
    vbarize(model, WeightStore("m", pool, page_size=PAGE))
    lin = model.double_blocks[0].img_attn["qkv"]
    ref_w = reference_state_dict(files[QT.Q8_0])["double_blocks.0.img_attn.qkv.weight"]
    delta = torch.randn(3 * D, D, dtype=torch.float64) * 0.01
    seen = []

    def lora(w):
        seen.append(w.dtype)
        return w.add_(delta.to(w.dtype))

    lin.weight_function = [lora]
    lin.vbar_patch_key = "lora"
    set_patch_dtype(model, torch.float64)
    h = torch.randn(3, D)
    with torch.no_grad():
        got = lin(h)
    assert seen == [torch.float64]
    want = F.linear(h, (ref_w.double() + delta).float(), lin.bias)
    assert torch.equal(got, want)
    pool.close()


# --- the GGUFWeight tensor --------------------------------------------------------------------

def test_gguf_weight_reports_logical_shape_and_packed_size(files):
    gf = GGUFFile(files[QT.Q4_0])
    w = gguf_state_dict(gf)["double_blocks.0.img_mlp.0.weight"]
    assert isinstance(w, GGUFWeight) and w.qtype == QT.Q4_0
    assert w.shape == (MLP, D) and w.size() == (MLP, D) and w.size(1) == D and w.dim() == 2
    assert w.dtype == torch.uint8 and w.numel() * w.element_size() == MLP * D // 32 * 18
    p = nn.Parameter(w, requires_grad=False)
    assert isinstance(p, nn.Parameter) and isinstance(p, GGUFWeight) and p.shape == (MLP, D)
    lin = nn.Linear(D, MLP, device="meta")
    lin._parameters["weight"] = p
    sd = lin.state_dict()
    assert isinstance(sd["weight"], GGUFWeight) and sd["weight"].shape == (MLP, D)
    assert "Q4_0" in repr(w)
    ref = reference_state_dict(files[QT.Q4_0])["double_blocks.0.img_mlp.0.weight"]
    assert torch.equal(w.dequantize(), ref)
    assert torch.equal(w.to(torch.float32), ref) and torch.equal(w.float(), ref)
    assert w.to(torch.bfloat16).dtype == torch.bfloat16
    assert torch.empty_like(w).shape == (MLP, D)
    with pytest.raises(TypeError):
        pickle.dumps(w)


def test_stock_load_state_dict_dequantizes_into_plain_parameters(files):
    """A module that is not ours copies the values, as ComfyUI does for non-op params."""
    gf = GGUFFile(files[QT.Q5_1])
    sd = gguf_state_dict(gf)
    lin = nn.Linear(D, 6 * D)
    lin.load_state_dict({"weight": sd["double_blocks.0.img_mod.lin.weight"],
                         "bias": sd["double_blocks.0.img_mod.lin.bias"]})
    ref = reference_state_dict(files[QT.Q5_1])
    assert torch.equal(lin.weight.data, ref["double_blocks.0.img_mod.lin.weight"])
    with pytest.raises(TypeError):
        sd["double_blocks.0.img_mod.lin.weight"].copy_(torch.zeros(6 * D, D))


def test_unmanaged_weights_are_dequantized_once(files):
    model = adopt(meta_model(), gguf_state_dict(GGUFFile(files[QT.Q8_0])))
    assert dequantize_unmanaged(model.single_blocks) == 2
    assert not isinstance(model.single_blocks[0].linear1.weight, GGUFWeight)
    assert model.single_blocks[0].linear1.weight.dtype == torch.float32


def test_choice_dtype():
    assert choice_dtype("default") is None and choice_dtype("target") == "target"
    assert choice_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="float8"):
        choice_dtype("float8")


# --- reading ----------------------------------------------------------------------------------

def test_tensors_are_zero_copy_views_with_logical_shapes(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 64)).astype(np.float32)
    conv = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    path = tmp_path / "m.gguf"
    write_gguf(path, {"a.weight": (x, QT.F32), "b.weight": (x, QT.F16), "c.weight": (x, QT.BF16),
                      "d.weight": (x, QT.Q8_0), "e.bias": (x[0], QT.Q8_0),
                      "conv.weight": (conv, QT.Q8_0)},
               arch="sdxl", orig_shapes={"conv.weight": (18, 256)})
    gf = GGUFFile(path)
    assert gf.architecture == "sdxl" and gf.version == 3 and len(gf) == 6
    sd, info = gf.state_dict()
    assert sd["a.weight"].dtype == torch.float32 and sd["a.weight"].shape == (8, 64)
    assert sd["b.weight"].dtype == torch.float16 and sd["c.weight"].dtype == torch.bfloat16
    assert sd["d.weight"].dtype == torch.uint8 and sd["d.weight"].shape == (8, 64 // 32 * 34)
    assert info["d.weight"] == (QT.Q8_0, torch.Size([8, 64]))
    assert info["conv.weight"] == (QT.Q8_0, torch.Size([32, 16, 3, 3]))
    assert gf.info("conv.weight").stored_shape == (18, 256)
    for name in sd:   # views of the file mapping, not copies
        assert sd[name].data_ptr() == gf._bytes.ctypes.data + gf.info(name).offset
    ref = reference_state_dict(path)
    assert torch.equal(sd["c.weight"].float(), ref["c.weight"])
    w = gguf_state_dict(gf)
    assert w["conv.weight"].shape == (32, 16, 3, 3)
    assert torch.equal(w["conv.weight"].dequantize(), ref["conv.weight"])
    # 1-D quantized tensors are dequantized once: ComfyUI reads some of them directly
    assert not isinstance(w["e.bias"], GGUFWeight) and torch.equal(w["e.bias"], ref["e.bias"])
    assert gf.field("general.architecture") == "sdxl"
    assert gf.field("comfy.gguf.orig_shape.conv.weight") == [32, 16, 3, 3]
    assert gf.field("missing", 5) == 5


def raw_gguf(path, tensors, kv=()):
    """A GGUF v3 file assembled by hand. ``tensors``: [(name, type, GGUF dims, data bytes)];
    ``kv``: [(key, value type, encoded value)]."""
    def s(text):
        b = text.encode()
        return struct.pack("<Q", len(b)) + b

    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)))
    for key, vtype, payload in kv:
        out += s(key) + struct.pack("<I", vtype) + payload
    offset, blobs = 0, []
    for name, qtype, dims, blob in tensors:
        out += s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, int(qtype), offset)
        blobs.append(blob + b"\0" * (-len(blob) % 32))
        offset += len(blobs[-1])
    out += b"\0" * (-len(out) % 32)
    path.write_bytes(bytes(out + b"".join(blobs)))
    return path


@pytest.mark.parametrize("arch", ["flux", "sd1", "sdxl", "sd3", None])
def test_architecture(tmp_path, arch):
    kv = [] if arch is None else [("general.architecture", 8,
                                   struct.pack("<Q", len(arch)) + arch.encode())]
    blob = np.ones((2, 32), np.float16).tobytes()
    path = raw_gguf(tmp_path / "a.gguf", [("w.weight", QT.F16, (32, 2), blob)], kv)
    gf = GGUFFile(path)
    assert gf.architecture == arch
    assert torch.equal(gf.tensor("w.weight"), torch.ones(2, 32, dtype=torch.float16))


def test_unsupported_types_use_the_reference_or_are_named(tmp_path):
    import gguf

    if not hasattr(QT, "TQ2_0"):
        pytest.skip("this gguf package predates TQ2_0")
    x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    path = tmp_path / "tq.gguf"
    write_gguf(path, {"blk.tq.weight": (x, QT.TQ2_0)})
    w = gguf_state_dict(GGUFFile(path))["blk.tq.weight"]   # no torch kernel: numpy fallback
    assert torch.equal(w.dequantize(), reference_state_dict(path)["blk.tq.weight"])
    path = raw_gguf(tmp_path / "q8k.gguf", [("blk.q8k.weight", QT.Q8_K, (256, 2),
                                             bytes(2 * gguf.GGML_QUANT_SIZES[QT.Q8_K][1]))])
    gf = GGUFFile(path)
    with pytest.raises(GGUFError, match=r"Q8_K") as e:
        gguf_state_dict(gf)
    assert str(path) in str(e.value) and e.value.tensor == "blk.q8k.weight"


def test_t5_names_map_to_comfyui():
    assert t5_name("enc.blk.3.attn_q.weight") == "encoder.block.3.layer.0.SelfAttention.q.weight"
    assert t5_name("enc.blk.0.attn_rel_b.weight") == \
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert t5_name("enc.blk.1.ffn_gate.weight") == "encoder.block.1.layer.1.DenseReluDense.wi_0.weight"
    assert t5_name("enc.blk.1.ffn_up.weight") == "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
    assert t5_name("enc.blk.1.ffn_down.weight") == "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    assert t5_name("enc.blk.1.ffn_norm.weight") == "encoder.block.1.layer.1.layer_norm.weight"
    assert t5_name("enc.output_norm.weight") == "encoder.final_layer_norm.weight"
    assert t5_name("token_embd.weight") == "shared.weight"
    assert t5_name("dec.blk.0.attn_q.weight") is None and t5_name("output.weight") is None
    clip = ["text_model.encoder.layers.0.mlp.fc1.weight"]
    assert text_encoder_names("clip", clip) == {clip[0]: clip[0]}
    assert text_encoder_names(None, ["enc.blk.0.attn_k.weight"]) == {
        "enc.blk.0.attn_k.weight": "encoder.block.0.layer.0.SelfAttention.k.weight"}


# --- malformed files --------------------------------------------------------------------------

@pytest.fixture
def good(tmp_path):
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    path = tmp_path / "good.gguf"
    write_gguf(path, {"blk.a.weight": (x, QT.Q8_0), "blk.b.weight": (x, QT.F16)},
               kv={"general.name": "tiny", "tokenizer.ggml.tokens": ["a", "bc", "def"]})
    GGUFFile(path)
    return path


def variant(good, name, edit):
    data = bytearray(good.read_bytes())
    edit(data)
    out = good.with_name(name)
    out.write_bytes(bytes(data))
    return out


def tensor_info_at(data, name):
    """Offsets of (n_dims, first dim, type, offset) in the tensor record called ``name``."""
    i = data.find(name.encode()) + len(name)
    n_dims = struct.unpack_from("<I", data, i)[0]
    return i, i + 4, i + 4 + 8 * n_dims, i + 4 + 8 * n_dims + 4


def expect_error(path, match):
    with pytest.raises(GGUFError, match=match) as e:
        GGUFFile(path)
    assert str(path) in str(e.value)
    return e.value


def test_truncated_anywhere(good):
    data = good.read_bytes()
    for cut in (0, 3, 10, 30, 60, 150, len(data) // 2, len(data) - 1):
        path = good.with_name(f"cut{cut}.gguf")
        path.write_bytes(data[:cut])
        expect_error(path, "empty|too short|truncated|ends|past the end")


def test_wrong_magic(good):
    expect_error(variant(good, "magic.gguf", lambda d: d.__setitem__(slice(0, 4), b"GGML")),
                 "not a GGUF file")
    st = good.with_name("st.gguf")
    st.write_bytes(struct.pack("<Q", 30) + b'{"a": 1}' + b" " * 64)
    expect_error(st, "not a GGUF file")


def test_versions(good):
    expect_error(variant(good, "v1.gguf", lambda d: struct.pack_into("<I", d, 4, 1)), "version 1")
    expect_error(variant(good, "be.gguf", lambda d: struct.pack_into(">I", d, 4, 3)), "big-endian")


def test_absurd_counts(good):
    expect_error(variant(good, "nt.gguf", lambda d: struct.pack_into("<Q", d, 8, 2**62)),
                 "claims 4611686018427387904 tensors")
    expect_error(variant(good, "nkv.gguf", lambda d: struct.pack_into("<Q", d, 16, 10**12)),
                 "metadata entries")


def test_huge_array_and_string_lengths_fail_fast(good):
    def array_len(d):
        i = d.find(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 4 + 4
        struct.pack_into("<Q", d, i, 2**40)

    expect_error(variant(good, "arr.gguf", array_len), "claims 1099511627776 elements")

    def string_len(d):
        i = d.find(b"general.name") + len(b"general.name") + 4
        struct.pack_into("<Q", d, i, 2**50)

    expect_error(variant(good, "str.gguf", string_len), "needs 1125899906842624 bytes")


# A corrupted field of one tensor's info record: (tensor, field index in tensor_info_at,
# struct format, value written, expected message, whether the error must name the tensor).
BAD_TENSOR_INFO = {
    "past": ("blk.b.weight", 3, "<Q", 10**9, "past the end", True),
    "overlap": ("blk.b.weight", 3, "<Q", 0, "overlaps", False),
    "misaligned": ("blk.b.weight", 3, "<Q", 8, "alignment", False),
    "qtype": ("blk.a.weight", 2, "<I", 99, "unknown tensor type number 99", True),
    "ndims": ("blk.a.weight", 0, "<I", 7, "7 dimensions", False),
    "row": ("blk.a.weight", 1, "<Q", 48, "not a multiple of the Q8_0 block size 32", False),
}


@pytest.mark.parametrize("case", BAD_TENSOR_INFO)
def test_bad_tensor_info_records(good, case):
    tensor, field, fmt, value, message, names_tensor = BAD_TENSOR_INFO[case]

    def corrupt(d):
        struct.pack_into(fmt, d, tensor_info_at(d, tensor)[field], value)

    e = expect_error(variant(good, f"{case}.gguf", corrupt), message)
    if names_tensor:
        assert e.tensor == tensor


def test_bad_orig_shape(tmp_path):
    path = tmp_path / "o.gguf"
    write_gguf(path, {"w.weight": (np.ones((2, 256), np.float32), QT.Q8_0)},
               kv={"comfy.gguf.orig_shape.w.weight": [3, 3]})
    expect_error(path, "orig_shape")


def test_missing_file_and_directory(tmp_path):
    expect_error(tmp_path / "nope.gguf", "cannot open")
    (tmp_path / "empty.gguf").write_bytes(b"")
    expect_error(tmp_path / "empty.gguf", "empty")


def test_metadata_values_match_gguf_readers(tmp_path):
    """Every GGUF value type, scalars and arrays (nested too), decoded as gguf-py's reader
    decodes them: its fields flattened, strings as str."""
    import gguf
    from gguf import GGUFValueType as VT

    path = tmp_path / "kv.gguf"
    w = gguf.GGUFWriter(str(path), "flux")
    scalars = {"u8": (7, VT.UINT8), "i8": (-7, VT.INT8), "u16": (65535, VT.UINT16),
               "i16": (-300, VT.INT16), "u32": (4000000000, VT.UINT32), "i32": (-5, VT.INT32),
               "u64": (2**60, VT.UINT64), "i64": (-(2**60), VT.INT64), "f32": (1.5, VT.FLOAT32),
               "f64": (2.25, VT.FLOAT64), "bool": (True, VT.BOOL), "str": ("héllo ▁wörld", VT.STRING)}
    for k, (v, t) in scalars.items():
        w.add_key_value(f"t.{k}", v, t)
    w.add_key_value("t.a_i32", [1, -2, 3], VT.ARRAY, VT.INT32)
    w.add_key_value("t.a_f32", [0.5, -1.25], VT.ARRAY, VT.FLOAT32)
    w.add_key_value("t.a_u8", list(range(256)), VT.ARRAY, VT.UINT8)
    w.add_key_value("t.a_bool", [True, False, True], VT.ARRAY, VT.BOOL)
    w.add_key_value("t.a_str", ["a", "", "▁b", "東京"], VT.ARRAY, VT.STRING)
    w.add_key_value("t.a_nested", [[1, 2], [3]], VT.ARRAY, VT.ARRAY)
    w.add_tensor("x", np.zeros((2, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    gf = GGUFFile(path)
    r = gguf.GGUFReader(str(path))
    for f in r.fields.values():
        if not f.name.startswith("t."):
            continue
        vals = [bytes(f.parts[i]).decode() if f.types[-1] == VT.STRING else f.parts[i][0].item()
                for i in f.data]
        want = vals if f.types[0] == VT.ARRAY else vals[0]
        got = gf.field(f.name)
        assert got == want and type(got) is type(want), (f.name, got, want)
    assert gf.field("t.a_nested") == [1, 2, 3]


def test_file_changed_is_detected(good):
    from vbar_loaders.loaders.errors import FileChangedError

    gf = GGUFFile(good)
    with open(good, "ab") as f:
        f.write(b"\0" * 7)
    with pytest.raises(FileChangedError):
        gf.state_dict()


def test_random_corruption_raises_only_gguf_errors(good):
    """Byte flips anywhere in the header: either a valid file or a GGUFError, never a crash,
    a hang or another exception type."""
    data = good.read_bytes()
    header = GGUFFile(good).data_start
    rng = np.random.default_rng(7)
    outcomes = {"ok": 0, "error": 0}
    path = good.with_name("flip.gguf")
    for _ in range(400):
        d = bytearray(data)
        for _ in range(rng.integers(1, 4)):
            i = int(rng.integers(0, header))
            d[i] = int(rng.integers(0, 256))
        path.write_bytes(bytes(d))
        try:
            gguf_state_dict(GGUFFile(path))
            outcomes["ok"] += 1
        except GGUFError:
            outcomes["error"] += 1
    assert outcomes["error"] > 100 and outcomes["ok"] > 0, outcomes


def test_limits_are_sane():
    assert gguf_file.MAX_DIMS == 5 and gguf_file.DEFAULT_ALIGNMENT == 32


# --- LoRA on quantized weights: the patched result is cached below the quantized bytes ---------

def _lora_model(path, budget):
    model = adopt(meta_model(), gguf_state_dict(GGUFFile(path)))
    attach_sources(model)
    pool = Pool(HostBackend(), budget=budget)
    store = WeightStore("m", pool, page_size=PAGE)
    vbarize(model, store)
    lin = model.double_blocks[0].img_attn["qkv"]
    calls = []
    delta = torch.randn(3 * D, D, generator=torch.Generator().manual_seed(5)) * 0.01

    def lora(w):
        calls.append(1)
        return w.add_(delta.to(w.dtype))

    lin.weight_function = [lora]
    lin.vbar_patch_key = "lora-1"
    ref_w = reference_state_dict(path)["double_blocks.0.img_attn.qkv.weight"]
    want = lambda h: F.linear(h, ref_w + delta, lin.bias)  # noqa: E731
    return model, store, pool, lin, calls, want


def test_lora_on_a_quantized_weight_is_applied_once_per_patch_set(files):
    model, store, pool, lin, calls, want = _lora_model(files[QT.Q4_K], 64 << 20)
    h = torch.randn(3, D)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(lin(h), want(h))
        assert len(calls) == 1                      # dequantized and patched once, then reused
        assert pool.vbars[:2] == store.vbars()      # the patched results sit right below
        lin.vbar_patch_key = "lora-2"               # a new patch set: computed again
        assert torch.equal(lin(h), want(h))
        assert len(calls) == 2
        store.prioritize()                          # as ComfyUI loading the model does
        assert pool.vbars[:2] == store.vbars()
        # evicting the patched copy (as a squeezed budget would) recomputes, correctly
        store.patch_vbar.free_memory(store.patch_vbar.size)
        assert torch.equal(lin(h), want(h))
        assert len(calls) == 3
    store.close()
    pool.close()


def test_patched_results_only_use_budget_the_quantized_bytes_leave(files):
    """Budget = the quantized bytes plus less than one patched weight: the patched result never
    evicts a quantized page (the patches are re-applied per use instead), and the quantized
    faults evict patched pages first when they need room."""
    path = files[QT.Q4_K]
    probe, store, pool, *_ = _lora_model(path, 64 << 20)
    with torch.no_grad():
        probe(*inputs())
    packed = store.vbar.stats()["resident_bytes"]
    store.close()
    pool.close()
    model, store, pool, lin, calls, want = _lora_model(path, packed + PAGE)
    x, h = inputs(), torch.randn(3, D)
    with torch.no_grad():
        model(*x)
        evictions = store.vbar.counters.evictions
        for _ in range(3):
            assert torch.equal(lin(h), want(h))
        assert len(calls) == 4                       # one in model(), then one per use
        assert store.vbar.counters.evictions == evictions
        assert store.vbar.stats()["resident_bytes"] == packed
    store.close()
    pool.close()
    # Room for both, then the model's own pages need it back: the patched copy goes first.
    model, store, pool, lin, calls, want = _lora_model(path, packed + (8 << 20))
    with torch.no_grad():
        model(*x)
        assert store.patch_vbar.stats()["resident_bytes"] > 0
        pool.set_budget(packed)
        assert store.patch_vbar.stats()["resident_bytes"] == 0
        assert store.vbar.stats()["resident_bytes"] == packed
        assert torch.equal(lin(h), want(h))
    store.close()
    pool.close()


def test_quantized_embedding_returns_floats():
    """A quantized Embedding table reports uint8 (its packed bytes); called without out_dtype the
    layer must still return the decoded float values, as a float table would."""
    table = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    packed = torch.from_numpy(gguf.quants.quantize(table.numpy(), QT.Q8_0).copy()).reshape(-1)
    emb = nn.Embedding(64, 256)
    emb._parameters["weight"] = GGUFWeight(packed, Decoder(QT.Q8_0, (64, 256), (64, 256)))
    attach_sources(emb)
    pool = Pool(HostBackend(), budget=64 << 20)
    vbarize(emb, WeightStore("m", pool, page_size=PAGE, small_bytes=0))
    ids = torch.tensor([1, 2, 63])
    want = torch.from_numpy(gguf.quants.dequantize(packed.numpy(), QT.Q8_0).reshape(64, 256))[ids]
    with torch.no_grad():
        got = emb(ids)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    pool.close()
