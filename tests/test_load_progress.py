"""The progress plumbing of loads, without ComfyUI: runtime/progress.py counts what a module
load does (also inside code we do not own) and stops it when the callback raises; the ComfyUI
callback (loaders/comfyui/progress.py) is exercised against fake comfy modules here and
against real ComfyUI in test_comfyui_load_progress.py."""
import sys
import threading
import types

import pytest
import torch

from vbar_loaders.loaders.comfyui.gguf import _plain_embeddings
from vbar_loaders.loaders.runtime.progress import LoadProgress, module_loads, parameters

GLOBAL_HOOKS = torch.nn.modules.module._global_module_registration_hooks


class Stop(Exception):
    pass


def small_net():
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3),
                               torch.nn.Sequential(torch.nn.Conv1d(3, 2, 1), torch.nn.BatchNorm1d(2)))


def test_load_progress_counts_clamps_extends_and_finishes():
    seen = []
    p = LoadProgress(lambda d, t: seen.append((d, t)), 10)
    p.start()
    p.add(4)
    p.add(0)                  # nothing done: nothing reported
    p.add(9)                  # more than the estimate: clamped until finish
    p.extend(5)
    p.add(1)
    p.finish()
    assert seen == [(0, 10), (4, 10), (10, 10), (14, 15), (15, 15)]


def test_module_loads_count_every_tensor_a_build_loads():
    """Modules built inside the block report their own tensors after load_state_dict: the
    total is the state dict's, whoever calls load_state_dict (here: not us)."""
    sd = small_net().state_dict()
    counts = []
    with module_loads(counts.append):
        net = small_net()
        net.load_state_dict(sd)
    # BatchNorm's num_batches_tracked is a persistent buffer: counted as a file tensor is
    assert sum(counts) == parameters(sd.values()) and len(counts) == 4
    assert not any(m._load_state_dict_post_hooks for m in net.modules())
    counts.clear()
    net.load_state_dict(sd)               # after the block: nothing reports any more
    assert counts == []


def test_a_raising_callback_stops_the_load_at_that_module_and_removes_every_hook():
    sd = small_net().state_dict()
    before = len(GLOBAL_HOOKS)
    calls = []

    def add(n):
        calls.append(n)
        if len(calls) == 2:
            raise Stop

    with pytest.raises(Stop):
        with module_loads(add):
            net = small_net()
            net.load_state_dict(sd)
    assert len(calls) == 2                # the later modules were not loaded
    assert torch.equal(net[0].weight, sd["0.weight"])
    assert not torch.equal(net[2][0].weight, sd["2.0.weight"])
    assert len(GLOBAL_HOOKS) == before
    assert not any(m._load_state_dict_post_hooks for m in net.modules())


def test_modules_of_other_threads_and_of_before_are_not_counted():
    sd = small_net().state_dict()
    old = small_net()
    counts, other = [], {}

    def build():
        other["net"] = small_net()

    with module_loads(counts.append):
        t = threading.Thread(target=build)
        t.start()
        t.join()
        old.load_state_dict(sd)
        other["net"].load_state_dict(sd)
    assert counts == []


def test_no_callback_is_a_no_op():
    before = len(GLOBAL_HOOKS)
    with module_loads(None):
        assert len(GLOBAL_HOOKS) == before
        small_net()


def test_embedding_tables_grow_the_total_and_count_as_converted():
    """The GGUF text encoder's post-build pass: its tables join the total, each counts once
    converted, and a stop between two tables leaves the second one as it was."""
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Embedding(6, 4))
    for m in model:
        m.vbar_store_dtype = torch.float16
    seen = []
    p = LoadProgress(lambda d, t: seen.append((d, t)), 100)
    _plain_embeddings(model, p)
    assert seen == [(40, 164), (64, 164)] and model[1].weight.dtype == torch.float16

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Embedding(6, 4))
    for m in model:
        m.vbar_store_dtype = torch.float16

    def stop_after_first(done, total):
        raise Stop

    with pytest.raises(Stop):
        _plain_embeddings(model, LoadProgress(stop_after_first, 1))
    assert model[0].weight.dtype == torch.float16 and model[1].weight.dtype == torch.float32


@pytest.fixture
def fake_comfy(monkeypatch):
    """comfy.model_management and comfy.utils, as much of them as comfy_progress uses."""
    state = {"interrupted": False, "sent": []}

    class Interrupted(Exception):
        pass

    def throw():
        if state["interrupted"]:
            state["interrupted"] = False
            raise Interrupted

    class Bar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None):
            state["sent"].append((value, total))

    mm = types.SimpleNamespace(throw_exception_if_processing_interrupted=throw,
                               InterruptProcessingException=Interrupted)
    utils = types.SimpleNamespace(ProgressBar=Bar)
    comfy = types.ModuleType("comfy")
    comfy.model_management, comfy.utils = mm, utils
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    monkeypatch.setitem(sys.modules, "comfy.utils", utils)
    return state, Interrupted


def test_comfy_progress_sends_first_last_and_at_most_bar_steps_between(fake_comfy):
    from vbar_loaders.loaders.comfyui.progress import BAR_STEPS, comfy_progress

    state, _ = fake_comfy
    progress = comfy_progress()
    for done in range(0, 10001):
        progress(done, 10000)
    sent = state["sent"]
    assert sent[0] == (0, 10000) and sent[-1] == (10000, 10000)
    assert len(sent) <= BAR_STEPS + 2


def test_comfy_progress_checks_the_interrupt_at_every_step(fake_comfy):
    from vbar_loaders.loaders.comfyui.progress import load_progress

    state, Interrupted = fake_comfy
    steps = load_progress(None, 1000)
    steps.add(1)                          # not sent to the bar (throttled), still checked
    state["interrupted"] = True
    with pytest.raises(Interrupted):
        steps.add(1)
    assert steps.done == 2 and state["sent"] == [(0, 1000)]
