"""NF4/FP4: bit-exact against bitsandbytes on CPU, byte-identical quantizer, clear errors."""
import json
import subprocess
import sys

import pytest
import torch

from vbar_loaders.loaders.errors import NF4Error
from vbar_loaders.loaders.nf4.codec import (
    NF4Weight, dequantize_nf4, nf4_state_dict_entries, parse_quant_state, quantize_nf4,
)
from vbar_loaders.loaders.nf4.kernels import code_table, dynamic_map, quantize_blockwise_8bit
from vbar_loaders.loaders.nf4 import kernels as nf4_kernels

F = pytest.importorskip("bitsandbytes.functional")

P = "blk.lin"
PATH = "model-nf4.safetensors"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def _eager_bnb():
    # bnb's fallback path (odd shapes) is wrapped in torch.compile: minutes of compiling, same result.
    with torch._dynamo.config.patch(disable=True):
        yield


def bnb_entries(x, blocksize, nested, quant_type):
    """The state-dict bnb.nn.Linear4bit would save for weight ``x``."""
    q, st = F.quantize_4bit(x, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    return {f"{P}.weight": q, **{f"{P}.weight.{k}": v for k, v in st.as_dict(packed=True).items()}}


def bnb_dequant(entries, dtype, prefix=P):
    w = prefix + ".weight"
    qs = F.QuantState.from_dict({k[len(w) + 1:]: v for k, v in entries.items() if k != w},
                                torch.device("cpu"))
    qs.dtype = dtype
    # bnb's AVX-512 CPU kernel picks the wrong absmax when the last dim is not a multiple of
    # blocksize (bnb 0.50.2); flat indexing, which its scalar and CUDA kernels use, is right.
    if qs.shape[-1] % qs.blocksize:
        qs.shape = torch.Size([qs.shape.numel()])
    return F.dequantize_4bit(entries[w], qs)


def same_bits(a, b):
    # +0 and -0 both arise from fp4's two zero codes (bnb's own CPU paths disagree on which).
    a, b = a.reshape(-1) + 0.0, b.reshape(-1) + 0.0
    ints = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(ints), b.view(ints))


SHAPES = [(64, 256), (128, 3072), (33, 17), (7,), (4, 48), (3, 96), (1, 4096)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False], ids=["v1", "v2"])
@pytest.mark.parametrize("fused", [False, True], ids=["cpu-ops", "accelerator-ops"])
def test_dequant_bit_exact_vs_bnb(shape, quant_type, nested, fused, monkeypatch):
    # accelerator-ops: the one-call mixed-dtype multiply CUDA runs, here on CPU
    monkeypatch.setattr(nf4_kernels, "mixed_dtype_ops_fuse", lambda device: fused)
    torch.manual_seed(hash((shape, quant_type, nested)) % 1000)
    x = torch.randn(shape, dtype=torch.bfloat16) * 0.05
    for blocksize in (64, 32, 4096) if shape == (128, 3072) else (64,):
        entries = bnb_entries(x, blocksize, nested, quant_type)
        w = parse_quant_state(entries, P, PATH)
        assert w.nested == nested and w.shape == x.shape and w.dtype == torch.bfloat16
        for dtype in DTYPES:
            ours = dequantize_nf4(w, dtype, use_bnb=False)
            assert ours.shape == x.shape
            assert same_bits(ours, bnb_dequant(entries, dtype)), (blocksize, dtype)


def test_chunking_and_out_buffer():
    x = torch.randn(96, 200)  # 19200 values: 300 blocks of 64, chunks end mid-row
    w = parse_quant_state(bnb_entries(x, 64, True, "nf4"), P, PATH)
    ref = dequantize_nf4(w, torch.bfloat16, use_bnb=False)
    for chunk in (64, 192, 1000, 1 << 30):
        assert same_bits(dequantize_nf4(w, torch.bfloat16, chunk=chunk, use_bnb=False), ref)
    out = torch.empty(96, 200, dtype=torch.bfloat16)
    assert dequantize_nf4(w, torch.bfloat16, device="cpu", out=out, use_bnb=False) is out
    assert same_bits(out, ref)
    with pytest.raises(ValueError):
        dequantize_nf4(w, torch.float16, out=out, use_bnb=False)


def test_tables_match_bnb():
    for qt in ("nf4", "fp4"):
        assert same_bits(code_table(qt), F.get_4bit_type(qt, device="cpu"))
    assert same_bits(dynamic_map(), F.create_dynamic_map())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False], ids=["v1", "v2"])
def test_quantizer_byte_identical_to_bnb(quant_type, nested):
    torch.manual_seed(1)
    cases = [torch.randn(256, 512, dtype=torch.bfloat16), torch.randn(33, 17) * 1e-3,
             torch.randn(7, dtype=torch.float16), torch.randn(3, 4096) * 100]
    z = torch.randn(64, 300)
    z[5:9] = 0  # whole zero blocks: absmax 0
    z[:, -1] = 0  # and a partial all-zero tail block (bnb clamps that one's absmax)
    cases.append(z)
    for x in cases:
        for blocksize in (64, 128):
            ours = nf4_state_dict_entries(P, x, blocksize=blocksize, compress_statistics=nested,
                                          quant_type=quant_type)
            ref = bnb_entries(x, blocksize, nested, quant_type)
            assert list(ours) == list(ref)
            for k in ref:
                assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape, k
                same = same_bits if ref[k].is_floating_point() else torch.equal
                assert same(ours[k], ref[k]), k


def test_nested_absmax_quantizer_matches_bnb_at_rounding_edges():
    # bnb snaps to a 65536-point grid before choosing a code; probe every grid midpoint
    # (and one ulp either side), where any difference in rounding order would show.
    k = torch.arange(1, 65536, dtype=torch.float32)
    mids = -1.0 + (2.0 * k - 1.0) / 65535.0
    probes = torch.cat([mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    probes = probes[: probes.numel() // 255 * 255].view(-1, 255).clamp(-1, 1)
    x = torch.cat([torch.ones(probes.shape[0], 1), probes], 1)  # absmax 1 per 256-block
    x = torch.cat([x.view(-1), torch.randn(5000) * 3])
    codes, absmax = quantize_blockwise_8bit(x, 256)
    ref, st = F.quantize_blockwise(x, blocksize=256)
    assert torch.equal(codes, ref) and same_bits(absmax, st.absmax)


def test_quantizer_round_trip_error_as_bnbs():
    torch.manual_seed(2)
    x = torch.randn(512, 1024) * 0.02
    ours = nf4_state_dict_entries(P, x)
    err_ours = (bnb_dequant(ours, torch.float32) - x).abs()
    err_bnb = (bnb_dequant(bnb_entries(x, 64, True, "nf4"), torch.float32) - x).abs()
    assert err_ours.max() <= err_bnb.max() and err_ours.mean() <= err_bnb.mean() * 1.0001
    # And within NF4's own resolution: half the widest code gap (0.152) times the block absmax,
    # plus nested-scale error.
    w = parse_quant_state(ours, P, PATH)
    am = x.view(-1, 64).abs().amax(1, keepdim=True)
    assert ((dequantize_nf4(w, torch.float32, use_bnb=False) - x).view(-1, 64) <= am * 0.17).all()


def test_safetensors_file_round_trip(tmp_path):
    from safetensors.torch import load_file, safe_open, save_file
    torch.manual_seed(3)
    layers = {"a.qkv": torch.randn(96, 64, dtype=torch.bfloat16), "b.proj": torch.randn(48, 32)}
    sd = {}
    sd.update(nf4_state_dict_entries("a.qkv", layers["a.qkv"]))
    sd.update(nf4_state_dict_entries("b.proj", layers["b.proj"], compress_statistics=False, quant_type="fp4"))
    f = tmp_path / "m.safetensors"
    save_file(sd, str(f))
    loaded = load_file(str(f))
    with safe_open(str(f), "pt") as lazy:
        for name, x in layers.items():
            w = parse_quant_state(loaded, name, f)
            w_lazy = parse_quant_state(lazy, name + ".weight", f)
            entries = {k: v for k, v in loaded.items() if k.startswith(name + ".")}
            ref = bnb_dequant(entries, x.dtype, name)
            assert same_bits(dequantize_nf4(w, use_bnb=False), ref)
            assert same_bits(dequantize_nf4(w_lazy, use_bnb=False), ref)


def test_quantize_returns_weight():
    w = quantize_nf4(torch.randn(8, 64), compress_statistics=False)
    assert isinstance(w, NF4Weight) and not w.nested and w.packed.dtype == torch.uint8
    assert w.packed.numel() == 256 and w.absmax.dtype == torch.float32
    with pytest.raises(ValueError):
        quantize_nf4(torch.randn(8, 64), blocksize=48)


# -- malformed files -------------------------------------------------------------------------

def _blob(d):
    return torch.tensor(list(json.dumps(d).encode()), dtype=torch.uint8)


def _qs(e):
    return json.loads(bytes(e[f"{P}.weight.quant_state.bitsandbytes__nf4"].tolist()))


def _with_qs(**kw):
    def edit(e):
        d = _qs(e)
        d.update(kw)
        e[f"{P}.weight.quant_state.bitsandbytes__nf4"] = _blob(d)
    return edit


W = P + ".weight"
QS = W + ".quant_state.bitsandbytes__nf4"


def _pop(name):
    return lambda e: e.pop(name)


def _set(name, value):
    return lambda e: e.__setitem__(name, value)


def _rename_qs(e):
    e[W + ".quant_state.bitsandbytes__int4"] = e.pop(QS)


MALFORMED = {
    "no quant_state": (_pop(QS), W, "no quant_state"),
    "unknown type key": (_rename_qs, W + ".quant_state.bitsandbytes__int4", "unknown 4-bit quant type"),
    "quant_type field": (_with_qs(quant_type="int4"), QS, "unknown quant_type"),
    "quant_type mismatch": (_with_qs(quant_type="fp4"), QS, "disagrees"),
    "blocksize": (_with_qs(blocksize=48), QS, "blocksize 48"),
    "dtype": (_with_qs(dtype="float64"), QS, "dtype"),
    "shape": (_with_qs(shape=[64, -1]), QS, "shape"),
    "numel vs bytes": (_with_qs(shape=[64, 130]), W, "needs 4160"),
    "not json": (_set(QS, torch.tensor([0xff, 0x7b], dtype=torch.uint8)), QS, "not valid JSON"),
    "no packed": (_pop(W), W, "missing"),
    "no absmax": (_pop(W + ".absmax"), W + ".absmax", "missing"),
    "absmax length": (lambda e: e.__setitem__(W + ".absmax", e[W + ".absmax"][:-1]), W + ".absmax",
                      "expected 128"),
    "quant_map size": (lambda e: e.__setitem__(W + ".quant_map", e[W + ".quant_map"][:15]),
                       W + ".quant_map", "16"),
    "nested_absmax length": (_set(W + ".nested_absmax", torch.ones(3)), W + ".nested_absmax", "expected 1"),
    "nested_quant_map size": (_set(W + ".nested_quant_map", torch.ones(255)), W + ".nested_quant_map", "256"),
    "no nested_absmax": (_pop(W + ".nested_absmax"), W + ".nested_absmax", "missing"),
    "nested_blocksize": (_with_qs(nested_blocksize=0), QS, "nested_blocksize"),
    "nested_offset": (_with_qs(nested_offset="x"), QS, "nested_offset"),
    "float absmax in v1": (_set(W + ".absmax", torch.ones(128)), W + ".absmax", "uint8 codes"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_names_tensor(case):
    edit, tensor, words = MALFORMED[case]
    e = nf4_state_dict_entries(P, torch.randn(64, 128))
    edit(e)
    with pytest.raises(NF4Error) as ei:
        parse_quant_state(e, P, PATH)
    assert ei.value.tensor == tensor and PATH in str(ei.value) and words in str(ei.value)


def test_v2_with_uint8_absmax_is_refused():
    e = nf4_state_dict_entries(P, torch.randn(64, 128), compress_statistics=False)
    e[W + ".absmax"] = torch.zeros(128, dtype=torch.uint8)
    with pytest.raises(NF4Error, match="no nested_absmax") as ei:
        parse_quant_state(e, P, PATH)
    assert ei.value.tensor == W + ".absmax"


def test_import_does_not_load_bitsandbytes():
    code = "import sys, vbar_loaders.loaders.nf4.codec; assert 'bitsandbytes' not in sys.modules"
    root = __file__.rsplit("/tests/", 1)[0]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


def test_bitsandbytes_kernel_is_used_when_installed_and_agrees():
    pytest.importorskip("bitsandbytes")
    import vbar_loaders.loaders.nf4.codec as nf4_mod

    torch.manual_seed(0)
    for shape in ((96, 160), (48, 48)):           # 48: last dim not a multiple of the blocksize
        for nested in (False, True):
            w = quantize_nf4(torch.randn(shape), compress_statistics=nested)
            calls = []
            real = nf4_mod._bnb_functional()
            orig = real.dequantize_4bit

            def spy(*a, **k):
                calls.append(1)
                return orig(*a, **k)

            real.dequantize_4bit = spy
            try:
                via_bnb = dequantize_nf4(w, torch.bfloat16)
            finally:
                real.dequantize_4bit = orig
            assert calls, "bitsandbytes installed but its kernel was not used"
            assert via_bnb.shape == shape
            assert same_bits(via_bnb, dequantize_nf4(w, torch.bfloat16, use_bnb=False))
