"""LoRA on a scaled-fp8 VBAR layer (ComfyUI 0.3.x scaled_fp8_ops), no ComfyUI: the patch sees
the weight as stock patch_weight_to_device does (fp8 -> float32, times scale_weight, patched,
divided by the scale and rounded back to fp8 with the key's seed), and the layer then computes
with that fp8 weight times the scale. Before the fix the patch skipped the scale: the LoRA was
added to the unscaled fp8 weight (max diff 1.6 in a real Flux sample on 0.3.64).

ComfyUI's modules are stand-ins with the same arithmetic, installed for each test only."""
import sys
import types

import pytest
import torch
import torch.nn as nn

from vbar_loaders.loaders.comfyui import quant
from vbar_loaders.loaders.comfyui.lora import stored_patch
from vbar_loaders.loaders.runtime.vbar_modules import vbarize
from vbar_loaders.loaders.runtime.weight_store import WeightStore
from vbar_loaders.vram import Pool
from vbar_loaders.vram.host_backend import HostBackend

PAGE = 64 << 10
FP8 = torch.float8_e4m3fn
KEY = "blk.lin.weight"
SEEDS = []


def _round(value, dtype, seed=0):
    SEEDS.append(seed)
    return value.to(dtype)   # stands for comfy.float.stochastic_rounding


@pytest.fixture
def fake_comfy(monkeypatch):
    mods = {n: types.ModuleType(n) for n in ("comfy", "comfy.lora", "comfy.float",
                                              "comfy.model_management", "comfy.utils",
                                              "comfy.model_patcher")}
    # calculate_weight stand-in: each patch is a difference added in the working dtype
    mods["comfy.lora"].calculate_weight = lambda patches, w, key: w + sum(patches)
    mods["comfy.float"].stochastic_rounding = _round
    mods["comfy.utils"].string_to_seed = lambda key: len(key)
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
        if "." in name:
            setattr(mods["comfy"], name.split(".")[1], mod)
    SEEDS.clear()


class ScaledOp:
    """The scaled_fp8_op.Linear conversion methods, as 0.3.64 defines them (return_weight)."""
    def convert_weight(self, weight, inplace=False, **kw):
        s = self.scale_weight.to(device=weight.device, dtype=weight.dtype)
        return weight.mul_(s) if inplace else weight * s

    def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kw):
        w = _round(weight / self.scale_weight.to(device=weight.device, dtype=weight.dtype),
                   self.weight.dtype, seed=seed)
        if return_weight:
            return w
        self.weight = nn.Parameter(w, requires_grad=False)


class ScaledOp0340(ScaledOp):
    """0.3.40's set_weight has no return_weight: it always assigns self.weight."""
    def set_weight(self, weight, inplace_update=False, seed=None, **kw):
        ScaledOp.set_weight(self, weight, inplace_update, seed)


def scaled_layer(budget, file_dtype=FP8):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight = nn.Parameter((lin.weight * 8).to(file_dtype), requires_grad=False)
    model = nn.Module()
    model.blk = nn.Module()
    model.blk.lin = lin
    lin.vbar_store_dtype = FP8
    pool = Pool(HostBackend(), budget=budget)
    vbarize(model, WeightStore("m", pool, page_size=PAGE))
    return model, lin, pool


@pytest.mark.parametrize("op", [ScaledOp, ScaledOp0340], ids=["0.3.64", "0.3.40"])
@pytest.mark.parametrize("budget", [8 << 20, PAGE // 4], ids=["resident", "streamed"])
def test_scaled_fp8_lora_is_patched_at_scale_then_requantized(fake_comfy, op, budget):
    model, m, pool = scaled_layer(budget)
    scale = torch.tensor(0.37)
    m.scale_weight = scale
    quant._bind_scaled(m, op, FP8)
    m.vbar_linear = quant._scaled_linear
    delta = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)) * 0.05
    patches = {KEY: [delta]}
    m.weight_function = [stored_patch(m, "weight", KEY, patches)]
    m.vbar_patch_key = "lora-1"
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    wq = m.weight                                   # the file's fp8 tensor
    file_bytes = wq.view(torch.uint8).clone()
    # stock: patch_weight_to_device, then scaled_fp8_op's forward (input * scale: the weight
    # has more elements than the input). The op holds its bias in fp8 too.
    held = ((wq.float() * scale + delta) / scale).to(FP8)
    with torch.no_grad():
        want = nn.functional.linear(x * scale.to(x.dtype), held.to(x.dtype),
                                    m.bias.to(FP8).to(x.dtype))
    unscaled = (wq.float() + delta).to(FP8)          # what the patch computed before the fix
    assert not torch.equal(held.float(), unscaled.float())
    try:
        with torch.no_grad():
            for _ in range(2):
                assert torch.equal(m(x), want)
        assert SEEDS and set(SEEDS) == {len(KEY)}     # set_weight rounded with the key's seed
        assert torch.equal(m.weight.view(torch.uint8), file_bytes)   # the source is never written
    finally:
        pool.close()


def test_op_class_conversion_is_not_taken(fake_comfy):
    """0.33's mixed-precision Linear defines convert/set on its class; they act on ComfyUI's
    parameter, which a VBAR layer does not hold. Only a loader's instance binding counts: else
    float32 copy, patched, rounded to the stored dtype."""
    class MixedLinear(nn.Linear, ScaledOp):
        pass

    m = MixedLinear(64, 32)
    p = stored_patch(m, "weight", KEY, {KEY: [torch.ones(32, 64)]})
    assert p.convert_func is None and p.set_func is None
    out = p(torch.zeros(32, 64, dtype=torch.float16))
    assert out.dtype == torch.float16 and torch.equal(out, torch.ones(32, 64, dtype=torch.float16))
    assert SEEDS == [len(KEY)]


def test_bound_set_weight_without_return_weight_puts_the_weight_in_the_module(fake_comfy):
    """ComfyUI's own patch_weight_to_device (0.3.x force_patch_weights, saving) calls
    set_weight without return_weight: the rounded weight goes into the module, as stock."""
    model, m, pool = scaled_layer(8 << 20)
    m.scale_weight = torch.tensor(0.5)
    quant._bind_scaled(m, ScaledOp, FP8)
    w = torch.full((32, 64), 3.0)
    assert m.set_weight(w, seed=7) is None
    assert m.weight.dtype == FP8 and torch.equal(m.weight.float(), torch.full((32, 64), 6.0))
    pool.close()
