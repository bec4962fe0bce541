"""Backends the conformance suite runs against: host always, CUDA when a device is usable."""
import pytest


def cuda_backend_or_skip():
    try:
        import torch
    except ImportError:
        pytest.skip("torch not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from vbar_loaders.vram import make_backend

    backend = make_backend("cuda", 0)
    if backend is None:
        pytest.skip("cuda-python or CUDA VMM unavailable")
    return backend


def make_backend(kind):
    if kind == "cuda":
        return cuda_backend_or_skip()
    if kind == "fake-cuda":
        from fake_cuda_driver import fake_cuda_backend

        return fake_cuda_backend(total=1 << 30)
    from vbar_loaders.vram.host_backend import HostBackend

    return HostBackend()


def page_size_for(backend):
    # Small pages keep tests fast on the host; CUDA cannot go below its granularity.
    return max(backend.granularity, 16384) if backend.name == "host" else backend.granularity
