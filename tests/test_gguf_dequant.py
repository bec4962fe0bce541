"""loaders/gguf/dequant.py against gguf-py's numpy reference (llama.cpp's layouts)."""
import pathlib
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from hypothesis import given, settings, strategies as st

import vbar_loaders.loaders.gguf.dequant as gd
from vbar_loaders.loaders.errors import GGUFError
from vbar_loaders.loaders.gguf.dequant import (QTYPE_BLOCK, UnsupportedQuantType, dequantize,
                                               dequantize_into, quantized_nbytes)

ROOT = pathlib.Path(__file__).resolve().parent.parent
FLOATS = (QT.F32, QT.F16, QT.BF16)
QUANTS = tuple(qt for qt in QTYPE_BLOCK if qt not in FLOATS)
# fp16 scale fields (byte offsets inside a block): random bytes there could be inf/NaN.
F16_FIELDS = {
    QT.Q8_0: (0,), QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q5_0: (0,), QT.Q5_1: (0, 2),
    QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,),
    QT.IQ4_NL: (0,), QT.IQ4_XS: (0,),
}
# gguf-py can quantize these, which gives realistic (not just random) blocks too.
QUANTIZABLE = (QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1)


def random_blocks(qt, rows, cols, seed):
    """Random bytes for every field, with finite, sign-mixed fp16 scales."""
    rng = np.random.default_rng(seed)
    if qt in FLOATS:
        x = rng.normal(size=(rows, cols)).astype(np.float32)
        return gguf.quants.quantize(x, qt).view(np.uint8).reshape(rows, -1)
    bs, ts = GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, size=(rows * cols // bs, ts), dtype=np.uint8)
    for off in F16_FIELDS[qt]:
        scale = rng.normal(0, 0.5, size=(raw.shape[0], 1)).astype(np.float16)
        scale[::7] = 0  # exact zeros and negative zeros both appear in real files
        scale[3::11] = -0.0
        raw[:, off:off + 2] = scale.view(np.uint8)
    return raw.reshape(rows, -1)


def reference(raw, qt):
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, qt), dtype=np.float32))


def ours(raw, qt, shape, dtype):
    return dequantize(torch.from_numpy(np.ascontiguousarray(raw)), qt, shape, dtype)


def shape_for(qt, rows=5, blocks_per_row=3):
    return rows, GGML_QUANT_SIZES[qt][0] * blocks_per_row


@pytest.mark.parametrize("qt", QTYPE_BLOCK, ids=lambda q: q.name)
def test_exact_in_fp32_and_rounded_once_in_half(qt):
    shape = shape_for(qt)
    raw = random_blocks(qt, *shape, seed=int(qt))
    ref = reference(raw, qt)
    assert torch.equal(ours(raw, qt, shape, torch.float32), ref)
    # float32 math then a single rounding: identical to rounding the reference.
    for dtype in (torch.float16, torch.bfloat16):
        got = ours(raw, qt, shape, dtype)
        assert got.dtype == dtype and got.shape == shape
        torch.testing.assert_close(got, ref.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("qt", QUANTIZABLE, ids=lambda q: q.name)
def test_exact_on_gguf_quantized_weights(qt):
    shape = shape_for(qt, rows=4, blocks_per_row=8)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    raw = gguf.quants.quantize(x, qt)
    assert torch.equal(ours(raw, qt, shape, torch.float32), reference(raw, qt))


@pytest.mark.parametrize("qt", QUANTS, ids=lambda q: q.name)
def test_many_chunks_with_a_partial_last_one(qt, monkeypatch):
    bs, _ = GGML_QUANT_SIZES[qt]
    monkeypatch.setattr(gd, "_CPU_CHUNK", 4 * bs // torch.get_num_threads())  # 4 blocks
    monkeypatch.setattr(gd, "_PREP_CHUNKS", 2)  # headers for 8 blocks at a time
    shape = (7, 3 * bs)  # 21 blocks: 5 full chunks and one of 1 block, in 3 header batches
    raw = random_blocks(qt, *shape, seed=99)
    assert torch.equal(ours(raw, qt, shape, torch.float32), reference(raw, qt))
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(ours(raw, qt, shape, dtype), reference(raw, qt).to(dtype))


def test_float16_output_of_extreme_scales_is_the_reference_rounded_once():
    """Rounding once to float16 at the edges: products that overflow, subnormal and zero
    scales, the largest quants."""
    for qt in (QT.Q8_0, QT.Q4_0, QT.Q5_0):
        shape = shape_for(qt, rows=4, blocks_per_row=16)
        raw = random_blocks(qt, *shape, seed=3)
        blocks = raw.reshape(-1, GGML_QUANT_SIZES[qt][1])   # a view: writes go to raw
        scales = np.array([65504, -65504, 6e-8, -6e-8, 1e-5, 0.0, 1000.0, 3.0e4] * 8, np.float16)
        blocks[:, :2] = scales[:blocks.shape[0]].view(np.uint8).reshape(-1, 2)
        ref = reference(raw, qt)
        assert torch.isinf(ref.half()).any()       # some products overflow float16
        assert torch.equal(ours(raw, qt, shape, torch.float16), ref.half())


@pytest.mark.parametrize("qt", QUANTS, ids=lambda q: q.name)
def test_accelerator_path_is_identical(qt, monkeypatch):
    """The fused ops CUDA runs (in-kernel conversions, no float32 copy) give the same bits;
    they run here on CPU, only slower. Extreme fp16 scales check the rounding into half."""
    bs, _ = GGML_QUANT_SIZES[qt]
    shape = (7, 3 * bs)
    raw = random_blocks(qt, *shape, seed=31)
    blocks = raw.reshape(-1, GGML_QUANT_SIZES[qt][1])
    field = F16_FIELDS[qt][0]
    blocks[::3, field:field + 2] = np.array([3.0e4], np.float16).view(np.uint8)
    blocks[1::5, field:field + 2] = np.array([6e-8], np.float16).view(np.uint8)
    ref = reference(raw, qt)
    monkeypatch.setattr(gd, "mixed_dtype_ops_fuse", lambda device: True)
    monkeypatch.setattr(gd, "_CPU_CHUNK", 4 * bs // torch.get_num_threads())  # several chunks
    assert torch.equal(ours(raw, qt, shape, torch.float32), ref)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(ours(raw, qt, shape, dtype), ref.to(dtype))


@pytest.mark.parametrize("qt", (QT.Q8_0, QT.Q4_K, QT.Q3_K, QT.Q5_0), ids=lambda q: q.name)
def test_two_threads_and_inference_mode(qt, monkeypatch):
    bs, _ = GGML_QUANT_SIZES[qt]
    monkeypatch.setattr(gd, "_CPU_CHUNK", 2 * bs)  # 4 blocks a chunk over two threads
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        shape = (7, 3 * bs)
        raw = random_blocks(qt, *shape, seed=7)
        assert torch.equal(ours(raw, qt, shape, torch.float32), reference(raw, qt))
        with torch.inference_mode():  # as ComfyUI samples
            got = ours(raw, qt, shape, torch.bfloat16)
        assert got.is_inference() and torch.equal(got, reference(raw, qt).bfloat16())
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(QUANTS), st.integers(1, 3), st.integers(1, 7), st.integers(0, 2**32 - 1))
def test_any_block_count(qt, rows, blocks_per_row, seed):
    shape = shape_for(qt, rows, blocks_per_row)
    raw = random_blocks(qt, *shape, seed=seed)
    assert torch.equal(ours(raw, qt, shape, torch.float32), reference(raw, qt))


@pytest.mark.parametrize("qt", (QT.Q4_K, QT.Q5_0, QT.F16), ids=lambda q: q.name)
def test_unaligned_and_non_uint8_input(qt):
    shape = shape_for(qt, rows=2)
    raw = random_blocks(qt, *shape, seed=5)
    buf = torch.zeros(raw.size + 3, dtype=torch.uint8)
    buf[3:] = torch.from_numpy(raw.reshape(-1))
    ref = reference(raw, qt)
    assert torch.equal(dequantize(buf[3:], qt, shape, torch.float32), ref)
    as_int8 = torch.from_numpy(raw.reshape(-1).copy()).view(torch.int8)
    assert torch.equal(dequantize(as_int8, int(qt), shape, torch.float32), ref)


def test_dequantize_into_fills_the_given_tensor():
    qt = QT.Q6_K
    shape = shape_for(qt)
    raw = random_blocks(qt, *shape, seed=3)
    out = torch.full(shape, float("nan"), dtype=torch.bfloat16)
    assert dequantize_into(out, torch.from_numpy(raw), qt) is out
    assert torch.equal(out, reference(raw, qt).bfloat16())


def test_zero_rows():
    out = dequantize(torch.empty(0, dtype=torch.uint8), QT.Q4_K, (0, 256), torch.float16)
    assert out.shape == (0, 256)


@pytest.mark.parametrize("qt", (QT.IQ2_XXS, QT.TQ1_0, QT.Q8_1))
def test_unsupported_type_is_named(qt):
    with pytest.raises(UnsupportedQuantType, match=qt.name) as e:
        dequantize(torch.zeros(64, dtype=torch.uint8), qt, (1, 256))
    assert isinstance(e.value, GGUFError) and "Supported:" in str(e.value)


def test_unknown_type_number():
    with pytest.raises(UnsupportedQuantType, match="12345"):
        dequantize(torch.zeros(64, dtype=torch.uint8), 12345, (1, 32))


def test_wrong_byte_count_and_row_length():
    with pytest.raises(GGUFError, match="needs 34 bytes, got 33"):
        dequantize(torch.zeros(33, dtype=torch.uint8), QT.Q8_0, (1, 32))
    with pytest.raises(GGUFError, match="not a multiple"):
        dequantize(torch.zeros(68, dtype=torch.uint8), QT.Q8_0, (2, 48))
    with pytest.raises(GGUFError, match="not a multiple"):
        dequantize(torch.zeros(0, dtype=torch.uint8), QT.Q4_K, ())
    with pytest.raises(TypeError):
        dequantize(torch.zeros(34, dtype=torch.uint8), QT.Q8_0, (1, 32), torch.int8)


def test_block_table_and_sizes():
    assert QTYPE_BLOCK[QT.Q8_0] == (32, 34) and QTYPE_BLOCK[QT.Q4_K] == (256, 144)
    assert set(QTYPE_BLOCK) == set(FLOATS) | set(F16_FIELDS)
    assert quantized_nbytes(QT.Q4_K, (3072, 3072)) == 3072 * 12 * 144
    assert quantized_nbytes(QT.F16, (7, 5)) == 70
    assert quantized_nbytes(QT.IQ2_XXS, (1, 256)) == 66  # sizes work for any GGML type


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("qt", QTYPE_BLOCK, ids=lambda q: q.name)
def test_cuda_matches_cpu(qt):
    shape = shape_for(qt, rows=64, blocks_per_row=4)
    raw = torch.from_numpy(random_blocks(qt, *shape, seed=11))
    for dtype in (torch.float32, torch.bfloat16):
        got = dequantize(raw.cuda(), qt, shape, dtype)
        assert got.device.type == "cuda"
        assert torch.equal(got.cpu(), dequantize(raw, qt, shape, dtype))


def test_benchmark_script_runs_quick():
    script = ROOT / "benchmarks" / "bench_gguf_dequant.py"
    res = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Q4_K" in res.stdout and "memcpy" in res.stdout
