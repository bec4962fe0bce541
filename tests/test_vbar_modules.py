"""VBAR layers give the same outputs as plain torch layers at any budget."""
import copy

import pytest
import torch
import torch.nn as nn

from vbar_loaders.loaders.runtime.vbar_modules import execution_order, vbarize
from vbar_loaders.loaders.runtime.weight_store import WeightStore
from vbar_loaders.vram import Pool
from vbar_loaders.vram.host_backend import HostBackend

PAGE = 64 << 10


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 64, 3, padding=1)
        self.gn = nn.GroupNorm(8, 64)
        self.c2 = nn.Conv2d(64, 128, 3, padding=1, stride=2)
        self.up = nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1)
        self.c1d = nn.Conv1d(64, 96, 3, padding=1)
        self.t1d = nn.ConvTranspose1d(96, 32, 3, stride=2)
        self.c3d = nn.Conv3d(4, 16, 3, padding=1)

    def forward(self, x):
        h = torch.nn.functional.silu(self.gn(self.c1(x)))
        h = self.up(self.c2(h), output_size=[x.shape[-2], x.shape[-1]])
        s = self.t1d(self.c1d(h.flatten(2)))
        v = self.c3d(x.unsqueeze(2).expand(-1, -1, 3, -1, -1).contiguous())
        return torch.cat([s.flatten(1), v.flatten(1)], 1)


class Block(nn.Module):
    """A transformer block with real proportions (width 384, MLP 4x, vocab 1000)."""

    def __init__(self, d=384, vocab=1000):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.rms = nn.RMSNorm(d, eps=1e-6)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d, bias=False)
        self.heads = 6

    def forward(self, tokens):
        x = self.emb(tokens)
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        a = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                             v.transpose(1, 2))
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.rms(x))))


def weight_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def largest_layer(model):
    return max(sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
               for m in model.modules())


def budgets(model):
    return {"unlimited": 4 * weight_bytes(model) + (16 << 20),
            "half": weight_bytes(model) // 2,
            "below_largest": max(PAGE, largest_layer(model) // 2 // PAGE * PAGE)}


CASES = [
    (ConvNet, lambda: torch.randn(2, 4, 16, 16)),
    (Block, lambda: torch.randint(0, 1000, (2, 24))),
]


@pytest.mark.parametrize("model_cls,make_input", CASES, ids=["convnet", "transformer"])
@pytest.mark.parametrize("budget_name", ["unlimited", "half", "below_largest"])
def test_outputs_match_plain_torch(model_cls, make_input, budget_name):
    torch.manual_seed(0)
    ref_model = model_cls().eval()
    x = make_input()
    with torch.no_grad():
        ref = ref_model(x)
    model = copy.deepcopy(ref_model)
    pool = Pool(HostBackend(), budget=budgets(ref_model)[budget_name])
    store = WeightStore(budget_name, pool, page_size=PAGE)
    vbarize(model, store, order=execution_order(model, x))
    try:
        with torch.no_grad():
            for _ in range(3):
                assert torch.equal(model(x), ref)
        st = pool.stats()
        if budget_name == "unlimited":
            assert st["offloaded"] == 0 and st["hits"] > 0
            assert st["bytes_mapped"] <= 2 * weight_bytes(ref_model) + 2 * PAGE * len(store.handles)
        elif budget_name == "below_largest":
            assert st["offloaded"] > 0
        assert st["resident_bytes"] <= pool.budget()
        assert st["pinned_bytes"] == 0
    finally:
        pool.close()


def test_second_run_copies_nothing_when_resident():
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randint(0, 1000, (1, 8))
    pool = Pool(HostBackend(), budget=64 << 20)
    store = WeightStore("m", pool, page_size=PAGE)
    vbarize(model, store)
    copies = []
    for h in store.handles:
        h.source = _CountingSource(h.source, copies)
    with torch.no_grad():
        model(x)
        first = len(copies)
        model(x)
    assert first > 0 and len(copies) == first
    pool.close()


class _CountingSource(torch.Tensor):
    @staticmethod
    def __new__(cls, t, log):
        s = t.as_subclass(cls)
        s._log = log
        return s

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_ and len(args) > 1 and isinstance(args[1], _CountingSource):
            args[1]._log.append(1)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_patches_are_applied_and_cached_while_resident():
    torch.manual_seed(0)
    lin = nn.Linear(256, 256)
    x = torch.randn(3, 256)
    delta = torch.randn(256, 256) * 0.01
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, lin.weight + delta, lin.bias)
    calls = []

    def lora(w):
        calls.append(1)
        return w.add_(delta)

    for budget, expect_calls in ((8 << 20, 1), (PAGE, 3)):
        m = copy.deepcopy(lin)
        pool = Pool(HostBackend(), budget=budget)
        vbarize(m, WeightStore("m", pool, page_size=PAGE))
        m.weight_function = [lora]
        m.vbar_patch_key = "lora-1"
        calls.clear()
        with torch.no_grad():
            for _ in range(3):
                assert torch.allclose(m(x), ref, atol=1e-6)
        assert len(calls) == expect_calls, budget
        # the source in the file mapping is never written by a patch
        assert torch.equal(m.weight, lin.weight)
        m.vbar_patch_key = "lora-2"           # a new patch set invalidates the cached result
        with torch.no_grad():
            m(x)
        assert len(calls) == expect_calls + 1
        pool.close()


class _StoredPatch:
    """Stands for the ComfyUI patcher's patch (loaders/comfyui/lora.py): marked to receive the
    weight in the dtype it is stored in, and to return it in that dtype."""
    vbar_on_stored = True

    def __init__(self, delta):
        self.delta, self.seen = delta, []

    def __call__(self, w):
        self.seen.append(w.dtype)
        return (w.float() + self.delta).to(w.dtype)


@pytest.mark.parametrize("budget", [8 << 20, PAGE], ids=["resident", "streamed"])
def test_stored_dtype_patches_round_to_the_stored_dtype_then_cast(budget):
    """A float16 weight computing in float32 (ComfyUI's CLIP on a CPU): the patcher's patch
    sees the float16 weight and its float16 result is what the layer casts; while resident it
    is computed once and kept in the slot. A weight wrapper after it sees the float32 weight."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 256).half()
    lin.vbar_store_dtype = torch.float16
    x = torch.randn(3, 256)
    delta = torch.randn(256, 256) * 0.01
    wrapped = []

    def wrapper(w):
        wrapped.append(w.dtype)
        return w.mul_(2)

    patch = _StoredPatch(delta)
    m = copy.deepcopy(lin)
    pool = Pool(HostBackend(), budget=budget)
    vbarize(m, WeightStore("m", pool, page_size=PAGE))
    m.weight_function = [patch, wrapper]
    m.vbar_patch_key = "lora-1"
    want_w = (lin.weight.float() + delta).half().float() * 2   # rounded to float16, then cast
    with torch.no_grad():
        want = torch.nn.functional.linear(x, want_w, lin.bias.float())
        for _ in range(3):
            assert torch.equal(m(x), want)
    assert set(patch.seen) == {torch.float16} and set(wrapped) == {torch.float32}
    assert len(patch.seen) == (1 if budget > PAGE else 3)
    assert len(wrapped) == 3
    assert torch.equal(m.weight, lin.weight)    # the source is never written
    pool.close()


def test_to_does_not_move_vbar_weights():
    m = Block()
    pool = Pool(HostBackend(), budget=8 << 20)
    vbarize(m, WeightStore("m", pool, page_size=PAGE))
    m.to(torch.float16)
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert "fc1.weight" in m.state_dict()
    pool.close()


def test_no_pool_streams_everything():
    torch.manual_seed(0)
    m = Block().eval()
    x = torch.randint(0, 1000, (1, 8))
    with torch.no_grad():
        ref = m(x)
        vbarize(m, WeightStore("m", None))
        assert torch.equal(m(x), ref)


def test_held_weights_stay_resident_under_pressure():
    torch.manual_seed(0)
    model = Block().eval()
    pool = Pool(HostBackend(), budget=model.fc1.weight.numel() * 4 + 4 * PAGE)
    store = WeightStore("m", pool, page_size=PAGE)
    other = store.add("fc2.weight", model.fc2.weight.detach())
    held = store.add("fc1.weight", model.fc1.weight.detach(), hold=True)
    store.build()
    assert held.slot.held and held.slot.offset == 0       # held weights are allocated first
    with torch.no_grad():
        for _ in range(3):
            with store.use(other, "cpu", torch.float32) as t:
                assert torch.equal(t, model.fc2.weight)
            with store.use(held, "cpu", torch.float32) as t:
                assert torch.equal(t, model.fc1.weight)
    st = store.vbar.stats()
    assert st["held_bytes"] == held.nbytes and st["offloaded"] == 3
    states = {n: state for n, _, state in store.vbar.slot_states()}
    assert states == {"fc1.weight": "held", "fc2.weight": "streamed"}
    store.close()


def test_held_weights_that_cannot_fit_name_the_megabytes():
    from vbar_loaders.vram import BudgetExceeded

    pool = Pool(HostBackend(), budget=2 * PAGE)
    s = WeightStore("nf4-model", pool, page_size=PAGE)
    s.add("double_blocks.0.w", torch.zeros(1 << 20), hold=True)
    with pytest.raises(BudgetExceeded, match=r"need 4 MiB.*Pin fewer blocks"):
        s.build()
    assert pool.stats()["reserved_bytes"] == 0
