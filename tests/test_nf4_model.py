"""NF4 models behind a VBAR: equal to the dequantized model at every budget, pinned Flux blocks
stay resident under pressure, malformed files and bad block counts fail clearly."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vbar_loaders.loaders.errors import NF4Error
from vbar_loaders.loaders.runtime.blocks import (
    block_size_text, count_blocks, flux_block_bytes, pin_blocks, release_pins, restore_pins,
)
from vbar_loaders.loaders.comfyui.pins import retire_pins, track_pins
from vbar_loaders.loaders.nf4.codec import nf4_state_dict_entries
from vbar_loaders.loaders.nf4.model import (
    attach_nf4, dequantized_state_dict, quantize_linears, split_nf4_state_dict,
)
from vbar_loaders.loaders.runtime.vbar_modules import vbarize
from vbar_loaders.loaders.runtime.weight_store import WeightStore
from vbar_loaders.vram import BudgetExceeded, Pool
from vbar_loaders.vram.host_backend import HostBackend

PAGE = 64 << 10
PATH = "tiny-flux-nf4.safetensors"
H, MLP, HEAD = 256, 1024, 64


# --- a Flux-shaped model with Flux's parameter names ---------------------------------------------
class QKNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.query_norm = nn.Module()
        self.query_norm.scale = nn.Parameter(torch.ones(HEAD))
        self.key_norm = nn.Module()
        self.key_norm.scale = nn.Parameter(torch.ones(HEAD))

    def forward(self, q, k):
        return (F.rms_norm(q, (HEAD,), self.query_norm.scale),
                F.rms_norm(k, (HEAD,), self.key_norm.scale))


class Modulation(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.lin = nn.Linear(H, n * H)

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None].chunk(self.lin.out_features // H, dim=-1)


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(H, 3 * H)
        self.norm = QKNorm()
        self.proj = nn.Linear(H, H)


def attention(q, k, v):
    b, n, _ = q.shape
    q, k, v = (t.view(b, -1, H // HEAD, HEAD).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, H)


class DoubleStreamBlock(nn.Module):
    def __init__(self):
        super().__init__()
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(6))
            setattr(self, f"{s}_attn", SelfAttention())
            setattr(self, f"{s}_mlp", nn.Sequential(nn.Linear(H, MLP), nn.GELU(approximate="tanh"),
                                                    nn.Linear(MLP, H)))

    def forward(self, img, txt, vec):
        qkv, mods = [], []
        for s, x in (("img", img), ("txt", txt)):
            m = getattr(self, f"{s}_mod")(vec)
            mods.append(m)
            a = getattr(self, f"{s}_attn")
            q, k, v = a.qkv(F.layer_norm(x, (H,)) * (1 + m[1]) + m[0]).chunk(3, -1)
            q, k = a.norm(q.unflatten(-1, (-1, HEAD)), k.unflatten(-1, (-1, HEAD)))
            qkv.append((q.flatten(-2), k.flatten(-2), v))
        n = txt.shape[1]
        att = attention(*(torch.cat([t, i], 1) for t, i in zip(qkv[1], qkv[0])))
        out = []
        for s, x, a, m in (("img", img, att[:, n:], mods[0]), ("txt", txt, att[:, :n], mods[1])):
            x = x + m[2] * getattr(self, f"{s}_attn").proj(a)
            out.append(x + m[5] * getattr(self, f"{s}_mlp")(F.layer_norm(x, (H,)) * (1 + m[4]) + m[3]))
        return out


class SingleStreamBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear1 = nn.Linear(H, 3 * H + MLP)
        self.linear2 = nn.Linear(H + MLP, H)
        self.norm = QKNorm()
        self.modulation = Modulation(3)

    def forward(self, x, vec):
        m = self.modulation(vec)
        qkv, mlp = self.linear1(F.layer_norm(x, (H,)) * (1 + m[1]) + m[0]).split([3 * H, MLP], -1)
        q, k, v = qkv.chunk(3, -1)
        q, k = self.norm(q.unflatten(-1, (-1, HEAD)), k.unflatten(-1, (-1, HEAD)))
        a = attention(q.flatten(-2), k.flatten(-2), v)
        return x + m[2] * self.linear2(torch.cat([a, F.gelu(mlp, approximate="tanh")], -1))


class MLPEmbedder(nn.Module):
    def __init__(self, n_in):
        super().__init__()
        self.in_layer = nn.Linear(n_in, H)
        self.out_layer = nn.Linear(H, H)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class TinyFlux(nn.Module):
    def __init__(self, depth=2, depth_single=3):
        super().__init__()
        self.img_in = nn.Linear(64, H)
        self.time_in = MLPEmbedder(256)
        self.vector_in = MLPEmbedder(96)
        self.txt_in = nn.Linear(128, H)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock() for _ in range(depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock() for _ in range(depth_single))
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(H, 64)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(H, 2 * H))

    def forward(self, img, txt, t, y):
        vec = self.time_in(t) + self.vector_in(y)
        img, txt = self.img_in(img), self.txt_in(txt)
        for b in self.double_blocks:
            img, txt = b(img, txt, vec)
        x = torch.cat([txt, img], 1)
        for b in self.single_blocks:
            x = b(x, vec)
        shift, scale = self.final_layer.adaLN_modulation(vec)[:, None].chunk(2, -1)
        return self.final_layer.linear(F.layer_norm(x[:, txt.shape[1]:], (H,)) * (1 + scale) + shift)


def inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 16, 64, generator=g), torch.randn(1, 8, 128, generator=g),
            torch.randn(1, 256, generator=g), torch.randn(1, 96, generator=g))


def bf16_state_dict(seed=0):
    torch.manual_seed(seed)
    model = TinyFlux()
    sd = {}
    for k, v in model.state_dict().items():
        sd[k] = (v * 4 if k.endswith(".bias") else v).to(torch.bfloat16)
    return sd


def nf4_file(layout, sd=None):
    """A state dict as a Flux NF4 file stores it: every Linear weight 4-bit, the rest bf16.
    A fresh dict each call (tests edit entries); the tensors are shared and never written."""
    if sd is None:
        if layout not in _files:
            _files[layout] = _quantize_file(layout, bf16_state_dict())
        return dict(_files[layout])
    return _quantize_file(layout, sd)


_files = {}


def _quantize_file(layout, sd):
    linears = {n + ".weight" for n, m in TinyFlux().named_modules() if isinstance(m, nn.Linear)}
    out = {}
    for k, v in sd.items():
        if k in linears:
            out.update(nf4_state_dict_entries(k[: -len(".weight")], v,
                                              compress_statistics=(layout == "v1")))
        else:
            out[k] = v
    return out


def reference(file_sd):
    """The dequantized model, computing in fp32 like ComfyUI on CPU."""
    model = TinyFlux()
    model.requires_grad_(False)
    model.load_state_dict(dequantized_state_dict(file_sd, PATH))
    return model.float().eval()


_refs = {}


def reference_output(layout):
    if layout not in _refs:
        with torch.no_grad():
            _refs[layout] = reference(nf4_file(layout))(*inputs())
    return _refs[layout]


def nf4_model(file_sd, pool, double=0, single=0, small_bytes=None, name="m"):
    with torch.device("meta"):
        model = TinyFlux()
    logical, weights = split_nf4_state_dict(file_sd, PATH)
    attach_nf4(model, weights, PATH)
    model.load_state_dict(logical, assign=True)
    model.float()      # the norm scales, as ComfyUI loads them into the model's dtype
    pin_blocks(model, double, single)
    kw = {} if small_bytes is None else {"small_bytes": small_bytes}
    store = WeightStore(name, pool, page_size=PAGE, **kw)
    vbarize(model.eval(), store)
    return model, store


def held_keys(store):
    return {h.key for h in store.handles if h.held}


# --- equality at every budget, pins hold -------------------------------------------------------
@pytest.mark.parametrize("layout", ["v1", "v2"])
@pytest.mark.parametrize("budget_name", ["unlimited", "pinned_plus_a_little", "pinned_only"])
def test_outputs_equal_dequantized_model(layout, budget_name):
    file_sd = nf4_file(layout)
    x = inputs()
    ref = reference_output(layout)
    probe, pstore = nf4_model(file_sd, Pool(HostBackend(), budget=1 << 30), 1, 1, small_bytes=0)
    pinned = pstore.vbar.stats()["resident_bytes"]       # right after build: the held pages
    total = pstore.vbar.stats()["allocated_bytes"]
    pstore.close()
    budget = {"unlimited": 2 * total + (16 << 20), "pinned_plus_a_little": pinned + (total - pinned) // 3,
              "pinned_only": pinned}[budget_name]
    pool = Pool(HostBackend(), budget=budget)
    model, store = nf4_model(file_sd, pool, 1, 1, small_bytes=0)
    try:
        with torch.no_grad():
            for _ in range(2):
                assert torch.equal(model(*x), ref)
        states = {name: state for name, _, state in store.vbar.slot_states()}
        held = held_keys(store)
        assert held and all(states[k] == "held" for k in held)
        # The pinned blocks are the first double and single block, packed codes and scales.
        assert "double_blocks.0.img_attn.qkv.weight" in held
        assert "double_blocks.0.img_attn.qkv.weight.absmax" in held
        assert "single_blocks.0.linear1.weight" in held
        assert not any(k.startswith(("double_blocks.1.", "single_blocks.1.", "img_in")) for k in held)
        st = pool.stats()
        assert st["resident_bytes"] <= pool.budget()
        if budget_name == "unlimited":
            assert st["offloaded"] == 0
        else:
            assert st["offloaded"] > 0      # the rest streams
            assert any(s == "streamed" for s in states.values())
    finally:
        pool.close()


def test_pinned_blocks_survive_eviction_and_a_competing_model():
    file_sd = nf4_file("v2")
    x = inputs()
    pool = Pool(HostBackend(), budget=64 << 20)
    model, store = nf4_model(file_sd, pool, 2, 3, small_bytes=0)
    held = [h for h in store.handles if h.held]
    with torch.no_grad():
        model(*x)
    # ComfyUI asking for all its memory back, then a second model taking the whole budget.
    store.vbar.free_memory(store.vbar.size)
    other = Pool.create_vbar(pool, "other", 64 << 20)
    grabbed = [other.alloc(PAGE) for _ in range(1000)]
    faults = [other.fault(s) for s in grabbed]
    assert sum(1 for f in faults if f.ok) < len(grabbed)     # the budget ran out ...
    vb = store.vbar
    for h in held:                                           # ... but not over our pins
        assert h.slot.held and all(vb.mapped[p] for p in range(h.slot.p0, h.slot.p1 + 1))
    before = {h.key: h.slot.faults for h in held}
    with torch.no_grad():
        assert torch.equal(model(*x), reference_output("v2"))
    assert all(h.slot.offloads == 0 for h in held)
    assert all(h.slot.faults > before[h.key] for h in held)
    assert vb.stats()["held_bytes"] == sum(h.nbytes for h in held)
    pool.close()


def test_zero_pins_hold_nothing():
    pool = Pool(HostBackend(), budget=1 << 20)
    model, store = nf4_model(nf4_file("v1"), pool, 0, 0)
    assert not held_keys(store) and store.vbar.stats()["held_bytes"] == 0
    with torch.no_grad():
        model(*inputs())
    assert pool.stats()["offloaded"] > 0
    pool.close()


def test_lora_patch_applies_after_dequant():
    file_sd = nf4_file("v2")
    ref = reference(file_sd)
    delta = torch.randn(3 * H + MLP, H) * 0.01
    with torch.no_grad():
        ref.single_blocks[1].linear1.weight += delta
        want = ref(*inputs())
    for budget in (1 << 30, 2 << 20):
        pool = Pool(HostBackend(), budget=budget)
        model, _ = nf4_model(file_sd, pool, 1, 1)
        model.single_blocks[1].linear1.weight_function = [lambda w: w.add_(delta)]
        with torch.no_grad():
            assert torch.allclose(model(*inputs()), want, atol=1e-5, rtol=1e-4)
        pool.close()


def test_quantize_on_load_matches_an_nf4_file():
    sd = bf16_state_dict()
    file_sd = nf4_file("v2", sd)
    model = TinyFlux()
    model.load_state_dict(sd)
    model.to(torch.bfloat16)
    weights = quantize_linears(model)
    _, from_file = split_nf4_state_dict(file_sd, PATH)
    assert set(weights) == set(from_file)
    for k, w in weights.items():
        assert torch.equal(w.packed, from_file[k].packed) and torch.equal(w.absmax, from_file[k].absmax)
        assert not w.nested and w.dtype == torch.bfloat16 and w.shape == from_file[k].shape
    n = attach_nf4(model, weights, PATH)
    assert n == len(weights)
    pool = Pool(HostBackend(), budget=16 << 20)
    vbarize(model.eval(), WeightStore("q", pool, page_size=PAGE))
    model.float()      # moves the norm scales only: VBAR weights stay as they are
    with torch.no_grad():
        assert torch.equal(model(*inputs()), reference_output("v2"))
    pool.close()


# --- block counts, budgets, re-runs -------------------------------------------------------------
def test_counts_above_the_model_are_rejected_with_the_real_counts():
    assert count_blocks(nf4_file("v2")) == (2, 3)
    assert count_blocks(["model.diffusion_model.double_blocks.0.x", "single_blocks.1.y"]) == (1, 0)
    with torch.device("meta"):
        model = TinyFlux()
    with pytest.raises(ValueError, match=r"has 2 double and 3 single blocks.*0\.\.2.*0\.\.3.*got 3 and 0"):
        pin_blocks(model, 3, 0, "tiny")
    with pytest.raises(ValueError, match="got 0 and 4"):
        pin_blocks(model, 0, 4)
    with pytest.raises(ValueError):
        pin_blocks(model, -1, 0)


def test_pins_that_do_not_fit_name_the_megabytes():
    pool = Pool(HostBackend(), budget=1 << 20)
    with pytest.raises(BudgetExceeded, match=r"pinned blocks need \d+ MiB.*budget is 1 MiB"):
        nf4_model(nf4_file("v2"), pool, 2, 3)
    assert pool.stats()["resident_bytes"] == 0      # nothing left behind
    pool.close()


def test_rerun_with_other_counts_releases_the_previous_pins():
    """A node loading again (ComfyUI still caching its previous MODEL) must not be refused
    because the previous load's pins still take the budget."""
    file_sd = nf4_file("v2")
    probe, pstore = nf4_model(file_sd, Pool(HostBackend(), budget=1 << 30), 2, 0)
    need = pstore.held_bytes()
    pstore.close()
    pool = Pool(HostBackend(), budget=need + need // 2)
    owner = ("node", 7)
    first, s1 = nf4_model(file_sd, pool, 2, 0, name="first")
    track_pins(s1, owner)
    with pytest.raises(BudgetExceeded):            # without retiring, both cannot be pinned
        nf4_model(file_sd, pool, 2, 0, name="second")
    retire_pins(owner)
    assert s1.vbar.stats()["held_bytes"] == 0 and s1.vbar.stats()["resident_bytes"] == 0
    second, s2 = nf4_model(file_sd, pool, 2, 0, name="second")
    track_pins(s2, owner)
    with torch.no_grad():                          # the old model still works: it streams
        assert torch.equal(first(*inputs()), second(*inputs()))
    restore_pins(s1)                               # retired: never pins again
    assert s1.vbar.stats()["held_bytes"] == 0
    release_pins(s2)                               # ComfyUI unloading the model ...
    assert s2.vbar.stats()["held_bytes"] == 0
    restore_pins(s2)                               # ... and loading it again
    assert s2.vbar.stats()["held_bytes"] == s2.held_bytes()
    pool.close()


def test_flux_block_sizes():
    b = flux_block_bytes()
    # 2 x (mod 6h + qkv 3h + proj h + mlp 4h) x h + mlp.2: 339.7 M weights per double block.
    assert b["double"]["bf16"] == 2 * (339_738_624 + 92_160 + 512)
    assert b["single"]["bf16"] == 2 * (141_557_760 + 33_792 + 256)
    assert b["double"]["nf4"] == 339_738_624 // 2 + 339_738_624 // 16 + 2 * (92_160 + 512)
    text = block_size_text()
    assert "double block: 648 MiB bf16 / 182 MiB NF4" in text and "single block: 270 MiB bf16" in text


# --- malformed files ------------------------------------------------------------------------------
QS = "double_blocks.1.img_mlp.0.weight.quant_state.bitsandbytes__nf4"


def _blob(d):
    return torch.tensor(list(json.dumps(d).encode()), dtype=torch.uint8)


def _edit_qs(sd, **changes):
    d = json.loads(bytes(sd[QS].tolist()))
    d.update(changes)
    sd[QS] = _blob(d)
    return sd


def test_missing_quant_state_names_the_tensor():
    sd = nf4_file("v1")
    del sd[QS]
    with pytest.raises(NF4Error, match=r"tensor 'double_blocks\.1\.img_mlp\.0\.weight'.*no quant_state"):
        split_nf4_state_dict(sd, PATH)


def test_unknown_quant_type():
    sd = nf4_file("v2")
    sd[QS.replace("__nf4", "__int3")] = sd.pop(QS)
    with pytest.raises(NF4Error, match="unknown 4-bit quant type"):
        split_nf4_state_dict(sd, PATH)
    sd = _edit_qs(nf4_file("v2"), quant_type="nf5")
    with pytest.raises(NF4Error, match="unknown quant_type 'nf5'"):
        split_nf4_state_dict(sd, PATH)


def test_wrong_blocksize():
    with pytest.raises(NF4Error, match=r"blocksize 100 is not one bitsandbytes supports"):
        split_nf4_state_dict(_edit_qs(nf4_file("v2"), blocksize=100), PATH)
    # A supported blocksize that disagrees with the stored scales
    with pytest.raises(NF4Error, match=r"absmax.*has \d+ entries, expected"):
        split_nf4_state_dict(_edit_qs(nf4_file("v2"), blocksize=128), PATH)


def test_shape_that_does_not_match_the_model():
    # Same number of values, so the file itself is consistent: only the model can tell.
    sd = _edit_qs(nf4_file("v2"), shape=[H, MLP])
    with torch.device("meta"):
        model = TinyFlux()
    _, weights = split_nf4_state_dict(sd, PATH)
    with pytest.raises(NF4Error, match=r"img_mlp\.0\.weight.*shape \[256, 1024\] does not match the "
                                       r"model's Linear \[1024, 256\]"):
        attach_nf4(model, weights, PATH)
    # A byte count that does not match the stated shape is caught in the file already
    with pytest.raises(NF4Error, match=r"holds \d+ bytes but shape \[1024, 512\] needs"):
        split_nf4_state_dict(_edit_qs(nf4_file("v2"), shape=[MLP, 2 * H]), PATH)


def test_4bit_weight_for_a_layer_the_model_lacks():
    sd = nf4_file("v2")
    for k in [k for k in sd if k.startswith("final_layer.linear.weight")]:
        sd[k.replace("final_layer.linear", "final_layer.norm_final")] = sd.pop(k)
    with torch.device("meta"):
        model = TinyFlux()
    _, weights = split_nf4_state_dict(sd, PATH)
    with pytest.raises(NF4Error, match="final_layer.norm_final.weight.*not have as a Linear"):
        attach_nf4(model, weights, PATH)
    with pytest.raises(NF4Error, match="outside the diffusion model"):
        attach_nf4(model, weights, PATH, prefix="model.diffusion_model.")


def test_logical_state_dict_describes_the_unquantized_model():
    sd = nf4_file("v1")
    logical, weights = split_nf4_state_dict(sd, PATH)
    plain = TinyFlux().state_dict()
    assert set(logical) == set(plain)
    for k, t in logical.items():
        assert t.shape == plain[k].shape and t.dtype == torch.bfloat16
        assert t.is_meta == (k[: -len(".weight")] in weights)
    assert sum(t.numel() for t in logical.values()) == sum(t.numel() for t in plain.values())
    assert math.prod(weights["img_in"].shape) == 64 * H


class _Stop(Exception):
    pass


def test_quantize_linears_reports_progress_in_parameters_and_stops_when_it_raises():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.Linear(64, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    out = quantize_linears(model, progress=lambda done, total: seen.append((done, total)))
    total = 64 * 128 + 128 * 64 + 64 * 32
    assert seen == [(0, total), (8192, total), (16384, total), (total, total)]
    assert sorted(out) == ["0", "2", "3"]

    calls = []

    def interrupt_at_two(done, total):
        calls.append(done)
        if len(calls) == 2:
            raise _Stop
    with pytest.raises(_Stop):
        quantize_linears(model, progress=interrupt_at_two)
    assert calls == [0, 8192]     # stopped right there: the other layers were not quantized
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
