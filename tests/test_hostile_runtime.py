"""Files changing under a loaded model, and out-of-memory inside a layer."""
import subprocess
import sys
import textwrap

import pytest
import torch

from vbar_loaders.loaders.runtime.vbar_modules import vbarize
from vbar_loaders.loaders.runtime.weight_store import WeightStore
from vbar_loaders.vram import Pool
from vbar_loaders.vram.host_backend import HostBackend

SCENARIO = textwrap.dedent("""
    import os, sys
    import torch
    from safetensors.torch import save_file
    from vbar_loaders.loaders.files.safetensors_file import SafetensorsFile
    from vbar_loaders.loaders.errors import FileChangedError
    from vbar_loaders.loaders.runtime.vbar_modules import vbarize
    from vbar_loaders.loaders.runtime.weight_store import WeightStore
    from vbar_loaders.vram import Pool
    from vbar_loaders.vram.host_backend import HostBackend

    path = {path!r}
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)])
    save_file(model.state_dict(), path)
    f = SafetensorsFile(path)
    model.load_state_dict({{k: f.get_tensor(k) for k in f.keys()}}, assign=True)
    pool = Pool(HostBackend(), budget=1 << 20)      # less than one layer: everything streams
    vbarize(model, WeightStore("m", pool, page_size=65536, source_check=f.check_unchanged))
    x = torch.randn(2, 512)
    with torch.no_grad():
        model(x)
        {change}
        try:
            model(x)
        except FileChangedError as e:
            print("CLEAR:", e)
            sys.exit(0)
    print("NO ERROR")
    sys.exit(3)
""")

CHANGES = {
    "truncated": "os.truncate(path, 4096)",
    "rewritten": "open(path, 'r+b').write(b'x' * 16)",
    "replaced": ("os.replace(path + '', path + '.old'); "
                 "open(path, 'wb').write(open(path + '.old', 'rb').read())"),
    "deleted": "os.remove(path)",
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_changed_file_gives_clear_error_not_sigbus(tmp_path, change):
    path = str(tmp_path / "model.safetensors")
    code = SCENARIO.format(path=path, change=CHANGES[change])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr[-2000:])
    assert "CLEAR:" in out.stdout and "model.safetensors" in out.stdout


def test_out_of_memory_in_a_layer_frees_pages_and_retries_once(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    x = torch.randn(3, 256)
    with torch.no_grad():
        ref = model(x)
    pool = Pool(HostBackend(), budget=8 << 20)
    vbarize(model, WeightStore("m", pool, page_size=65536))
    with torch.no_grad():
        model(x)
    assert pool.stats()["resident_bytes"] > 0
    real_linear = torch.nn.functional.linear
    failures = [1]

    def flaky(*a, **k):
        if failures:
            failures.pop()
            raise torch.OutOfMemoryError("simulated")
        return real_linear(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "linear", flaky)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    assert pool.stats()["evictions"] > 0

    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("always")))
    with torch.no_grad(), pytest.raises(torch.OutOfMemoryError, match="Lower the VBAR budget"):
        model(x)
    pool.close()
