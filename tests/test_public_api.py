"""vram/'s public snapshot API (``vram.pools()``, ``Pool.limit``, ``report.collect()``), what the
surface does with it (VBAR Set Budget, the monitor, the live panel), and when the environment
variables are read. No ComfyUI."""
import ast
import pathlib
import types

import pytest

from vbar_loaders import nodes, routes
from vbar_loaders import vram as vram_pkg
from vbar_loaders.vram import BadCall, Pool, get_pool, pools, report
from vbar_loaders.vram.host_backend import HostBackend

ROOT = pathlib.Path(__file__).resolve().parent.parent
GiB = 1 << 30
PAGE = 1 << 16


class CardBackend(HostBackend):
    """The host backend with a capacity, as a CUDA card has one."""

    def capacity(self):
        return 4 * GiB


@pytest.fixture
def no_pools(monkeypatch):
    """A process with no pools yet; the pools made here are closed afterwards."""
    monkeypatch.setattr(vram_pkg, "_pools", {})
    for var in ("VBAR_BUDGET", "VBAR_HEADROOM"):
        monkeypatch.delenv(var, raising=False)
    yield
    for p in vram_pkg._pools.values():
        p.close()


def test_pools_lists_what_get_pool_made_as_a_copy(no_pools):
    assert pools() == {}
    pool = get_pool("cpu")
    listed = pools()
    assert listed == {"cpu": pool}
    listed.clear()
    assert pools() == {"cpu": pool} and get_pool("cpu") is pool
    pool.close()
    assert pools() == {"cpu": pool} and pools()["cpu"].closed   # listed, marked closed
    assert report.collect()["pools"] == {}                     # ... and left out of snapshots


def test_collect_defaults_to_every_pool(no_pools):
    pool = get_pool("cpu", budget=8 * PAGE)
    v = pool.create_vbar("m", 4 * PAGE, page_size=PAGE)
    s = v.alloc(PAGE)
    assert v.fault(s).ok
    snap = report.collect()
    assert list(snap["pools"]) == ["cpu"]
    assert snap["pools"]["cpu"]["vbars"][0]["slot_states"] == "R"
    assert routes.snapshot()["pools"]["cpu"]["resident_bytes"] == PAGE


def test_limit_is_what_set_budget_was_given():
    host = Pool(HostBackend(), budget=2 * GiB, headroom=GiB // 4)
    assert host.limit == 2 * GiB and host.budget() == 2 * GiB - GiB // 4
    host.set_budget(GiB, headroom=None)        # headroom None keeps it
    assert host.limit == GiB and host.headroom == GiB // 4
    with pytest.raises(BadCall):
        host.set_budget(None)                  # a host pool has no card to default to
    assert host.limit == GiB
    host.close()
    card = Pool(CardBackend())
    assert card.limit is None and card.budget() == 4 * GiB
    card.set_budget(6 * GiB)                   # over the card: the card wins
    assert card.limit == 6 * GiB and card.budget() == 4 * GiB
    card.close()


def test_environment_is_read_once_when_the_pool_is_made(no_pools, monkeypatch):
    monkeypatch.setenv("VBAR_BUDGET", "3G")
    monkeypatch.setenv("VBAR_HEADROOM", "512M")
    pool = get_pool("cpu")
    assert pool.limit == 3 * GiB and pool.headroom == GiB // 2
    monkeypatch.setenv("VBAR_BUDGET", "1G")
    monkeypatch.setenv("VBAR_HEADROOM", "0")
    assert get_pool("cpu") is pool and pool.limit == 3 * GiB and pool.headroom == GiB // 2


def test_environment_defaults_and_zero_headroom(no_pools, monkeypatch):
    assert get_pool("cpu").limit == 8 * GiB and get_pool("cpu").headroom == 0
    monkeypatch.setattr(vram_pkg, "_pools", {})
    monkeypatch.setenv("VBAR_HEADROOM", "0")   # the default, written out: accepted
    assert get_pool("cpu").headroom == 0
    monkeypatch.setattr(vram_pkg, "_pools", {})
    monkeypatch.setenv("VBAR_BUDGET", "0")     # a budget of nothing is refused, naming the value
    with pytest.raises(BadCall, match="'0'"):
        get_pool("cpu")


# --- VBAR Set Budget --------------------------------------------------------------------------
def apply_budget(device, budget_gb, headroom_gb):
    model = types.SimpleNamespace(load_device=device)
    out = nodes.VBARSetBudget().apply(model, budget_gb, headroom_gb)
    assert out == (model,)


def test_set_budget_on_a_host_pool(no_pools):
    pool = get_pool("cpu")                      # 8 GiB simulated card (VBAR_BUDGET unset)
    apply_budget("cpu", 2.0, 0.5)
    assert pool.limit == 2 * GiB and pool.budget() == 1.5 * GiB
    # 0 on a host pool means the simulated card's default (VBAR_BUDGET, else 8 GiB), not
    # whatever an earlier run set; headroom applies.
    apply_budget("cpu", 0.0, 1.0)
    assert pool.limit == 8 * GiB and pool.budget() == 7 * GiB
    # headroom above the budget leaves nothing: every weight streams.
    apply_budget("cpu", 0.5, 1.0)
    assert pool.budget() == 0


def test_set_budget_zero_on_a_card_means_the_whole_card(no_pools, monkeypatch):
    monkeypatch.setenv("VBAR_BUDGET", "1G")
    monkeypatch.setattr(vram_pkg, "make_backend", lambda kind, *a, **k: CardBackend())
    pool = get_pool("cuda:0")
    assert pool.limit == GiB
    apply_budget("cuda:0", 0.0, 1.0)            # 0 drops VBAR_BUDGET's limit too
    assert pool.limit is None and pool.budget() == 3 * GiB
    apply_budget("cuda:0", 2.0, 0.0)
    assert pool.limit == 2 * GiB and pool.budget() == 2 * GiB


def test_set_budget_without_an_allocator_says_why(no_pools, monkeypatch):
    monkeypatch.setattr(vram_pkg, "make_backend", lambda kind, *a, **k: None)
    with pytest.raises(RuntimeError, match="no VBAR allocator for cuda:0"):
        apply_budget("cuda:0", 1.0, 0.0)


def test_live_panel_sees_a_budget_change(no_pools):
    sent = []
    pusher = routes.StatsPusher(lambda event, data: sent.append(data))
    get_pool("cpu")
    assert pusher.tick() and not pusher.tick()
    apply_budget("cpu", 1.0, 0.0)
    assert pusher.tick() and sent[-1]["pools"]["cpu"]["budget_bytes"] == GiB


# --- no reach-ins -----------------------------------------------------------------------------
def vram_private_names():
    """Underscore names vram/ defines: module globals, functions, methods and attributes."""
    names = set()
    for path in (ROOT / "vram").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_the_surface_uses_only_vrams_public_names():
    private = vram_private_names()
    assert {"_pools", "_budget"} <= private          # the check looks at the right things
    offenders = []
    for name in ("nodes.py", "monitor.py", "routes.py", "__init__.py", "demo.py"):
        tree = ast.parse((ROOT / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and "vram" in (node.module or ""):
                offenders += [f"{name}:{node.lineno} imports {a.name}" for a in node.names
                              if a.name.startswith("_")]
            elif isinstance(node, ast.Attribute) and node.attr in private:
                offenders.append(f"{name}:{node.lineno} reads .{node.attr}")
    assert not offenders, "\n".join(offenders)


def test_pool_counters_outlive_a_closed_vbar():
    """The pool's event counts are the device's history (like torch.cuda.memory_stats): a model
    unloaded right after its run keeps its faults in them, while its own row goes."""
    pool = Pool(HostBackend(), budget=PAGE)
    try:
        big = pool.create_vbar("big", 4 * PAGE, page_size=PAGE)
        s = big.alloc(2 * PAGE)
        assert big.fault(s) is not None and pool.stats()["offloaded"] == 1   # over the budget
        small = pool.create_vbar("small", PAGE, page_size=PAGE)
        t = small.alloc(PAGE)
        small.fault(t)
        small.unpin(t)
        before = pool.stats()
        big.close()
        after = pool.stats()
        assert [v["name"] for v in after["vbars"]] == ["small"]
        for key in ("faults", "offloaded", "misses", "bytes_mapped"):
            assert after[key] == before[key], key
        small.fault(t)
        assert pool.stats()["faults"] == before["faults"] + 1
    finally:
        pool.close()
