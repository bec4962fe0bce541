"""The CUDA backend's logic against a fake driver (no GPU here): budget from the driver's
free-memory reading, device OOM turned into an offload, one physical allocation per page,
synchronisation before unmapping, and a logged fallback when cuda-python is missing."""
import logging
import sys

import pytest

from fake_cuda_driver import fake_cuda_backend
from vbar_loaders.vram import Pool, make_backend

MB = 1 << 20


def test_budget_subtracts_what_others_use_and_headroom():
    backend = fake_cuda_backend(total=256 * MB, used_by_others=64 * MB)
    pool = Pool(backend, headroom=32 * MB, refresh_s=0)
    assert pool.budget() == 256 * MB - 64 * MB - 32 * MB
    backend.drv.others = 128 * MB          # another program allocated more
    assert pool.budget() == 256 * MB - 128 * MB - 32 * MB
    pool.close()


def test_device_running_out_means_offload_not_error():
    backend = fake_cuda_backend(total=64 * MB)
    pool = Pool(backend, refresh_s=3600)    # a stale reading: the pool thinks all 64 MiB are free
    v = pool.create_vbar("m", 32 * MB, page_size=2 * MB)
    s = v.alloc(16 * MB)
    backend.drv.others = 56 * MB           # someone took the memory since the last reading
    r = v.fault(s)
    assert not r.ok and v.stats()["offloaded"] == 1
    assert backend.drv.handles == {} and backend.drv.mapped == {}   # partial mapping undone
    backend.drv.others = 0
    pool._others_at = -1e9
    assert v.fault(s).ok
    v.unpin(s)
    pool.close()


def test_one_physical_allocation_per_page_and_sync_before_unmap():
    backend = fake_cuda_backend(total=256 * MB)
    pool = Pool(backend, budget=64 * MB)
    v = pool.create_vbar("m", 32 * MB, page_size=2 * MB)
    s = v.alloc(6 * MB)
    assert v.fault(s).ok
    assert len(backend.drv.handles) == 3 and len(backend.drv.mapped) == 3
    v.unpin(s)
    syncs = getattr(backend, "syncs", 0)
    assert v.free_memory(2 * MB) == 2 * MB
    assert backend.syncs == syncs + 1 and len(backend.drv.handles) == 2
    v.close()
    assert backend.drv.handles == {} and backend.drv.reserved == {}
    pool.close()


def test_missing_cuda_python_degrades_with_a_logged_reason(monkeypatch, caplog):
    for name in ("cuda", "cuda.bindings", "cuda.bindings.driver"):
        monkeypatch.setitem(sys.modules, name, None)
    with caplog.at_level(logging.WARNING, logger="vbar.cuda"):
        assert make_backend("cuda", 0) is None
    assert "cuda-python" in caplog.text and "stream" in caplog.text


def test_driver_errors_are_typed():
    from vbar_loaders.vram import BackendError

    backend = fake_cuda_backend(total=256 * MB)
    with pytest.raises(BackendError, match="cuMemAddressReserve"):
        backend.reserve(3 * 4096)          # not a multiple of the 2 MiB granularity


def test_a_backend_that_failed_is_tried_and_warned_about_once_per_device(monkeypatch, caplog):
    """A load asks for the pool once per model part: a driver that said no is not asked again."""
    from fake_cuda_driver import CUresult, FakeDriver
    from vbar_loaders import vram
    from vbar_loaders.vram import cuda_backend

    tried = []

    class NoVMMOnDevice0(FakeDriver):
        def cuDeviceGetAttribute(self, attr, dev):
            tried.append(dev)
            return (CUresult.CUDA_SUCCESS, 0 if dev == 0 else 1)

    monkeypatch.setattr(cuda_backend, "_driver", lambda: NoVMMOnDevice0())
    monkeypatch.setattr(vram, "_pools", {})        # a process that has asked for no pool yet
    monkeypatch.setattr(vram, "_failed", {})
    try:
        with caplog.at_level(logging.WARNING, logger="vbar.cuda"):
            for _ in range(3):                      # text encoder, model, VAE of one checkpoint
                assert vram.get_pool("cuda:0") is None
        assert tried == [0]
        warnings = [r for r in caplog.records if r.name == "vbar.cuda"]
        assert len(warnings) == 1 and "virtual memory management" in warnings[0].getMessage()
        pool = vram.get_pool("cuda:1")              # another device is its own decision
        assert pool is not None and tried == [0, 1]
        assert vram.get_pool("cuda:1") is pool and vram.get_pool("cuda:0") is None
        assert tried == [0, 1]
    finally:
        for p in vram.pools().values():
            p.close()
