"""Memory pressure while a model runs: outputs stay exact, the budget is honoured."""
import copy

import pytest
import torch
import torch.nn as nn

from vbar_loaders.loaders.runtime.vbar_modules import vbarize
from vbar_loaders.loaders.runtime.weight_store import WeightStore
from vbar_loaders.vram import Pool
from vbar_loaders.vram.host_backend import HostBackend

PAGE = 64 << 10


def model_and_ref():
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Linear(384, 384) for _ in range(10)]).eval()
    x = torch.randn(5, 384)
    with torch.no_grad():
        return m, x, m(x)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_another_app_takes_memory_mid_run(prefetch):
    plain, x, ref = model_and_ref()
    model = copy.deepcopy(plain)
    pool = Pool(HostBackend(), budget=16 << 20)
    store = WeightStore("m", pool, page_size=PAGE)
    vbarize(model, store)
    store.enable_prefetch(prefetch)
    budgets = iter([3 << 20, 256 << 10, 64 << 10, 2 << 20, 16 << 20] * 10)

    def squeeze(module, args):
        # Between layers, another program grabs or returns memory: the budget moves.
        pool.set_budget(next(budgets))

    hooks = [layer.register_forward_pre_hook(squeeze) for layer in list(model)[::3]]
    with torch.no_grad():
        for _ in range(4):
            assert torch.equal(model(x), ref)
            st = pool.stats()
            assert st["resident_bytes"] <= max(st["budget_bytes"], st["pinned_bytes"])
    for h in hooks:
        h.remove()
    assert pool.stats()["evictions"] > 0 and pool.stats()["offloaded"] > 0
    store.close()


def test_budget_changes_between_runs_and_two_models_share_the_pool():
    plain, x, ref = model_and_ref()
    a, b = copy.deepcopy(plain), copy.deepcopy(plain)
    pool = Pool(HostBackend(), budget=8 << 20)
    sa, sb = WeightStore("a", pool, page_size=PAGE), WeightStore("b", pool, page_size=PAGE)
    vbarize(a, sa)
    vbarize(b, sb)
    with torch.no_grad():
        for budget in (8 << 20, 1 << 20, PAGE, 32 << 20, 2 << 20):
            pool.set_budget(budget)
            for model, store in ((a, sa), (b, sb), (a, sa)):
                store.vbar.prioritize()          # as ComfyUI's load does for the model it runs
                assert torch.equal(model(x), ref)
                assert pool.stats()["resident_bytes"] <= budget
    sa.close()
    sb.close()
    assert pool.stats()["reserved_bytes"] == 0
