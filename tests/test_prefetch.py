"""Prefetch: same outputs, learned order, out-of-order graphs, clean shutdown, no leaked pins."""
import copy
import random

import pytest
import torch
import torch.nn as nn

from vbar_loaders.loaders.runtime.vbar_modules import vbarize
from vbar_loaders.loaders.runtime.weight_store import WeightStore
from vbar_loaders.vram import Pool
from vbar_loaders.vram.host_backend import HostBackend

PAGE = 64 << 10


def mlp(n=8, width=256):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(n)]).eval()


def weights(model):
    return sum(p.numel() * 4 for p in model.parameters())


@pytest.mark.parametrize("fraction", [4.0, 0.5, 0.05])
@pytest.mark.parametrize("copy_streams", [False, True])
def test_outputs_equal_with_prefetch(fraction, copy_streams):
    ref_model = mlp()
    x = torch.randn(4, 256)
    with torch.no_grad():
        ref = ref_model(x)
    model = copy.deepcopy(ref_model)
    pool = Pool(HostBackend(), budget=max(PAGE, int(weights(ref_model) * fraction)))
    store = WeightStore("m", pool, page_size=PAGE, copy_streams=copy_streams)
    vbarize(model, store)
    store.enable_prefetch(depth=2)
    with torch.no_grad():
        for _ in range(4):
            assert torch.equal(model(x), ref)
    st = store.prefetch_stats()
    assert st["prefetch_hits"] > 0
    assert pool.stats()["prefetch_hits"] == st["prefetch_hits"]
    store.close()
    assert pool.stats()["resident_bytes"] == 0 and pool.stats()["pinned_bytes"] == 0


def test_streamed_temporaries_are_reused_on_the_host():
    """Once warm, streamed weights are copied into a few recycled buffers, not fresh ones."""
    model = mlp(8)
    x = torch.randn(4, 256)
    with torch.no_grad():
        ref = model(x)
    pool = Pool(HostBackend(), budget=PAGE)          # everything streams
    store = WeightStore("m", pool, page_size=PAGE, copy_streams=True)
    vbarize(model, store)
    store.enable_prefetch(depth=2)
    seen = set()
    real = store._stream

    def spy(h, device, dtype, patches, count=True, temp=None):
        if temp is not None:
            seen.add(temp.data_ptr())
        return real(h, device, dtype, patches, count, temp)

    store._stream = spy
    with torch.no_grad():
        for _ in range(5):
            assert torch.equal(model(x), ref)
    assert store.prefetch_stats()["prefetch_hits"] >= 30
    assert len(seen) <= 2 + 3, len(seen)           # depth + 1 spares, plus two in flight
    store.drop_prefetched()
    assert not store.prefetcher._spare
    store.close()
    pool.close()


def test_out_of_order_calls_stay_correct_and_count_waste():
    model = mlp(6)
    pool = Pool(HostBackend(), budget=weights(model) // 2)
    store = WeightStore("m", pool, page_size=PAGE, copy_streams=True)
    vbarize(model, store)
    store.enable_prefetch(depth=1)
    x = torch.randn(2, 256)
    layers = list(model)
    rng = random.Random(0)
    with torch.no_grad():
        for _ in range(20):
            order = layers[:]
            rng.shuffle(order)
            for layer in order:
                ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
                assert torch.equal(layer(x), ref)
    st = store.prefetch_stats()
    assert st["prefetch_wasted"] > 0 and st["prefetch_hits"] > 0
    worker = store.prefetcher.worker
    store.enable_prefetch(0)           # stops the worker and releases what it prepared
    assert not worker.is_alive()
    assert pool.stats()["pinned_bytes"] == 0
    store.close()


def test_prefetch_never_evicts_a_pinned_page_and_respects_budget():
    model = mlp(8)
    pool = Pool(HostBackend(), budget=3 * PAGE * 4)
    store = WeightStore("m", pool, page_size=PAGE)
    vbarize(model, store)
    store.enable_prefetch(depth=3)
    x = torch.randn(2, 256)
    with torch.no_grad():
        for _ in range(5):
            model(x)
            st = pool.stats()
            assert st["resident_bytes"] <= st["budget_bytes"]
    store.close()


def test_errors_while_preparing_reach_the_caller():
    model = mlp(3)
    pool = Pool(HostBackend(), budget=8 << 20)
    calls = {"n": 0}

    def check(key):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError(f"file changed ({key})")

    store = WeightStore("m", pool, page_size=PAGE, source_check=check)
    vbarize(model, store)
    store.enable_prefetch(1)
    x = torch.randn(2, 256)
    with torch.no_grad(), pytest.raises(RuntimeError, match="file changed"):
        for _ in range(3):
            for h in store.handles:
                h.sig = None            # force copies so the check runs every time
            model(x)
    store.close()
    assert pool.stats()["pinned_bytes"] == 0


def test_prefetch_inside_inference_mode_twice():
    """ComfyUI samples under inference mode, other callers do not: slot views are written by the
    worker and the caller in both modes, run after run."""
    model = mlp(4)
    x = torch.randn(2, 256)
    with torch.no_grad():
        ref = model(x)
    pool = Pool(HostBackend(), budget=weights(model) // 2)
    store = WeightStore("m", pool, page_size=PAGE, copy_streams=True)
    vbarize(model, store)
    store.enable_prefetch(2)
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode, torch.no_grad):
        with mode():
            assert torch.equal(model(x), ref)
        store.drop_prefetched()
        pool.make_room(pool.budget())     # evict: the next run copies into the same views
    store.close()
