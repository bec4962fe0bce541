"""The GPU check: everything a first CUDA machine should confirm, in one command and one table.

    python benchmarks/gpu_check.py [--comfyui-gguf PATH] [--sections a,b] [--strict]
    python benchmarks/gpu_check.py --selftest      # the same sections on the fake driver / CPU

Sections (each in a process of its own, with a time limit; all together under 8 minutes):
  conformance  tests/test_vram_conformance.py, test_vram_stateful.py and test_vram_pins.py, only their
               CUDA cases, under pytest against the real driver (pass/fail/skip counts)
  p2           VBAR hit and miss costs on the CUDA backend (bench_vram.py's functions)
  p4           step time at 50 % resident with the prefetcher (side stream) against the
               overlap bound max(compute, streamed bytes / copy bandwidth) (bench_overlap.py)
  gguf         GGUF dequant to bf16 on the GPU per type, bit-exact with gguf-py, and its speed
               against ComfyUI-GGUF's kernels when --comfyui-gguf names a checkout
               (bench_gguf_dequant.py)
  nf4          NF4 dequant on the GPU against bitsandbytes, bit-exact (bench_nf4.py)
  comfy        with COMFYUI_PATH: tiny SD1.5 checkpoint, tiny Flux and tiny Flux GGUF workflows
               in a ComfyUI started without --cpu, under a VBAR budget smaller than the model,
               compared byte for byte with the stock loaders' images

Exit status 1 when a section fails (a test fails, a result is not exact, an image differs, a
section crashes or runs out of time); a missed speed goal shows as MISS and fails only with
--strict. Without a CUDA device it says so and exits 0 at once: it probes the driver library
with ctypes (cuInit, cuDeviceGetCount: no context, no memory) before importing anything heavy.
``--selftest`` runs the sections on tests/fake_cuda_driver.py and the CPU at tiny sizes, in
this process; its numbers are host numbers and say nothing about a GPU (CI runs it). With
COMFYUI_PATH set, its comfy section runs the same workflows in a ComfyUI on the CPU (minutes).
See docs/gpu_check.md for what each row and column means.
"""
import argparse
import ctypes
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import traceback

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
TESTS = ROOT / "tests"
MARK = "GPU_CHECK_ROWS "
TOTAL_LIMIT_S = 470              # the whole check, env probe included: under 8 minutes
# Per section, sized for an H100/H200 with room to spare; the sum stays under TOTAL_LIMIT_S.
LIMITS_S = {"env": 20, "conformance": 60, "p2": 30, "p4": 50, "gguf": 60, "nf4": 25, "comfy": 215}
SECTIONS = ["conformance", "p2", "p4", "gguf", "nf4", "comfy"]
P4_GOAL = 1.15                   # step at 50 % resident with prefetch, over the overlap bound
HIT_GOAL_US = 3.0                # fault+unpin of a resident 1-page slot
STATEFUL_EXAMPLES = "60"         # hypothesis examples per stateful run on the real driver


def row(section, measure, value="", ref="", ratio="", verdict="info", note=""):
    return {"section": section, "measure": measure, "value": value, "ref": ref, "ratio": ratio,
            "verdict": verdict, "note": note}


def num(x):
    """Three significant figures, never in exponent form for the sizes in this table."""
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"


# --- no CUDA: say so before anything heavy is imported ---------------------------------------
def cuda_probe():
    """(device count, None) or (0, why not), from the driver library alone (no torch)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0, f"CUDA_VISIBLE_DEVICES={visible!r} hides every device"
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so"]
    lib = None
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return 0, "no CUDA driver library (libcuda) on this machine"
    rc = lib.cuInit(0)
    if rc != 0:
        return 0, f"cuInit failed with CUresult {rc} (100: no CUDA-capable device)"
    count = ctypes.c_int(0)
    rc = lib.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0 or count.value == 0:
        return 0, f"the driver reports no device (CUresult {rc}, count {count.value})"
    return count.value, None


# --- the context each section runs in -----------------------------------------------------
class Ctx:
    """Real: CUDA device 0 and the CUDA backend. Selftest: the fake driver and the CPU."""

    def __init__(self, selftest, comfyui_gguf=None):
        for p in (HERE, TESTS):
            if str(p) not in sys.path:
                sys.path.insert(0, str(p))
        import torch

        self.selftest = selftest
        self.comfyui_gguf = comfyui_gguf
        self.device = torch.device("cpu") if selftest else torch.device("cuda", 0)

    def new_backend(self):
        if self.selftest:
            from fake_cuda_driver import fake_cuda_backend

            return fake_cuda_backend(total=4 << 30)
        from vbar_loaders.vram import make_backend

        backend = make_backend("cuda", 0)
        if backend is None:
            raise RuntimeError("the CUDA backend did not start (cuda-python missing, or no virtual "
                               "memory management on this device): see the warning above")
        return backend

    def sync(self):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def time(self, fn, reps, warm=2):
        """Median seconds of one call of ``fn``, device work included."""
        import statistics

        for _ in range(warm):
            fn()
        out = []
        for _ in range(reps):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            out.append(time.perf_counter() - t)
        return statistics.median(out)


# --- sections -----------------------------------------------------------------------------
def section_env(ctx):
    import torch

    if ctx.selftest:
        return [row("env", "device", "fake CUDA driver + CPU (selftest)", note=f"torch {torch.__version__}")]
    if not torch.cuda.is_available():
        return [row("env", "device", "-", verdict="FAIL",
                    note=f"the driver sees a CUDA device but torch {torch.__version__} cannot use it "
                         f"(a CPU-only build?): install a CUDA build of torch")]
    p = torch.cuda.get_device_properties(0)
    versions = [f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
    for mod in ("cuda.bindings", "bitsandbytes", "gguf"):
        try:
            m = __import__(mod, fromlist=["_"])
            versions.append(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception:  # noqa: BLE001
            versions.append(f"{mod} missing")
    return [row("env", "device", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}",
                note=", ".join(versions))]


CONFORMANCE_FILES = ("test_vram_conformance.py", "test_vram_stateful.py", "test_vram_pins.py")
# The selftest checks this section's plumbing, not the allocator (the unit suite runs every
# fake-cuda case): a few quick cases keep it cheap in CI.
SELFTEST_KEYWORD = "fake and (reserving or close_returns or bad_calls_are_typed)"


def _junit_cases(path):
    """{test file stem: [(case id, outcome, message)]} from pytest's junit XML."""
    import xml.etree.ElementTree as ET

    out = {}
    for t in ET.parse(path).getroot().iter("testcase"):
        outcome, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            e = t.find(tag)
            if e is not None:
                outcome, msg = tag, e.get("message", "")
                break
        stem = t.get("classname", "").split(".")[0]
        out.setdefault(stem, []).append((f"{t.get('classname')}::{t.get('name')}", outcome, msg))
    return out


def section_conformance(ctx, keyword=None):
    """Only the CUDA cases, in one pytest run: -k selects node ids naming the backend
    (``[cuda]``, or a test class named for it); on the selftest, a few of the fake driver's."""
    keyword = keyword or (SELFTEST_KEYWORD if ctx.selftest else "cuda and not fake")
    backend = "fake-cuda" if ctx.selftest else "cuda"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1",
               VBAR_STATEFUL_EXAMPLES=os.environ.get("VBAR_STATEFUL_EXAMPLES", STATEFUL_EXAMPLES))
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CONFORMANCE_FILES,
               "-k", keyword, f"--junitxml={xml}", "-o", "junit_family=xunit2"]
        p = subprocess.run(cmd, cwd=TESTS, capture_output=True, text=True, env=env)
        if p.returncode not in (0, 1, 5) or not os.path.isfile(xml):
            return [row("conformance", f"pytest -k {keyword!r}", "-", verdict="FAIL",
                        note=f"pytest exited {p.returncode}: {(p.stdout + p.stderr)[-2000:]}")]
        cases = _junit_cases(xml)
    rows = []
    for name in CONFORMANCE_FILES:
        got = cases.get(name[:-3], [])
        label = f"{name} [{backend}]"
        if not got:
            rows.append(row("conformance", label, "0 cases", verdict="skip",
                            note=f"{name} has no case for this backend (-k {keyword!r}): "
                                 f"it is not parametrised over backends"))
            continue
        n = {k: sum(1 for c in got if c[1] == k) for k in ("passed", "failure", "error", "skipped")}
        bad = [c for c in got if c[1] in ("failure", "error")]
        skips = sorted({c[2] for c in got if c[1] == "skipped"})
        verdict, note = "PASS", ""
        if bad:
            verdict = "FAIL"
            note = "failed: " + "; ".join(f"{c[0]}: {c[2][:200]}" for c in bad[:8])
        elif not n["passed"]:
            verdict, note = "FAIL", "every case skipped: " + "; ".join(skips)
        elif skips:
            note = "skipped: " + "; ".join(skips)
        rows.append(row("conformance", label,
                        f"{n['passed']} passed, {len(bad)} failed, {n['skipped']} skipped",
                        verdict=verdict, note=note))
    return rows


def section_p2(ctx):
    import bench_vram as bv

    q = ctx.selftest
    nb = ctx.new_backend
    hb, hn = (3, 200) if q else (51, 5000)
    h1 = bv.bench_hit(hb, hn, pages=1, new_backend=nb)
    use_us = bv.bench_use_hit(hb, max(1, hn // 4), new_backend=nb)
    m = bv.bench_miss(2 if q else 9, 4 if q else 128, 2, new_backend=nb)
    r = bv.bench_reserve(2 if q else 10, 100 * bv.GiB, 32, new_backend=nb)
    ok = h1["hits"] > 0
    return [
        row("p2", "hit: fault+unpin, 1-page slot (us)", f"{h1['both']:.2f}", f"<= {HIT_GOAL_US:g}", "",
            ("PASS" if h1["both"] <= HIT_GOAL_US else "MISS") if ok else "FAIL",
            "" if ok else "no hit was counted: the resident slot faulted as a miss"),
        row("p2", "hit: WeightStore.use() resident (us)", f"{use_us:.2f}"),
        row("p2", "miss: map after eviction, 2 MiB pages (us/MiB)", f"{m['fault_us_per_mib']:.1f}", "",
            f"{m['gbps']:.1f} GB/s"),
        row("p2", "eviction: sync + unmap, 2 MiB pages (us/MiB)", f"{m['evict_us_per_mib']:.1f}"),
        row("p2", "reserve 100 GiB VBAR, 32 MiB pages (ms)", f"{r['ms']:.3f}"),
    ]


def section_p4(ctx):
    import bench_overlap as bo

    # Selftest: 1 MiB weights over 2 MiB pages, so half the model is a page and streams.
    width, layers, tokens, reps = (512, 6, 8, 2) if ctx.selftest else (4096, 16, 4096, 9)
    compute, bw, total, rows = bo.run(width, layers, tokens, reps, new_backend=ctx.new_backend)
    fraction, streamed, t_off, t_on, bound, hits, per_step = next(r for r in rows if r[0] == 0.5)
    what = f"{layers}x Linear({width}) fp32, {total / 2**20:.0f} MiB, {tokens} tokens"
    verdict, note = ("PASS" if t_on / bound <= P4_GOAL else "MISS"), ""
    if streamed == 0:
        verdict, note = "FAIL", "nothing streamed at 50 % resident: no overlap measured"
    elif hits == 0:
        verdict, note = "FAIL", "the prefetcher never delivered a weight ahead of its use"
    return [
        row("p4", "50% resident, prefetch: step (ms) vs bound", f"{t_on * 1e3:.2f}", f"{bound * 1e3:.2f}",
            f"{t_on / bound:.2f} (goal <= {P4_GOAL:g})", verdict, note),
        row("p4", "50% resident, no prefetch: step (ms) vs bound", f"{t_off * 1e3:.2f}", f"{bound * 1e3:.2f}",
            f"{t_off / bound:.2f}"),
        row("p4", f"  all resident step (ms); {what}", f"{compute * 1e3:.1f}"),
        row("p4", "  host->device copy (GB/s); streamed MiB/step", f"{bw / 1e9:.2f}",
            f"{streamed / 2**20:.0f} MiB", f"{per_step:.0f} streams/step"),
    ]


def section_gguf(ctx):
    import numpy as np
    import torch

    import bench_gguf_dequant as bg
    from vbar_loaders.loaders.gguf.dequant import QTYPE_BLOCK

    city = bg.load_city96(ctx.comfyui_gguf) if ctx.comfyui_gguf else None
    shape = (64, 1024) if ctx.selftest else (3072, 12288)
    check = (min(shape[0], 128), shape[1])      # exactness on the first rows: numpy is slow
    reps = 2 if ctx.selftest else 10
    out_bytes = shape[0] * shape[1] * 2
    rows, copy_s = [], None
    for qt in QTYPE_BLOCK:
        raw = bg.make_raw(qt, *shape, np.random.default_rng(int(qt)))
        fns = bg.methods(qt, raw, shape, city, ctx.device)
        small = fns if check == shape else bg.methods(qt, raw[:check[0]], check, city, ctx.device)
        ours = small["ours"]().cpu().contiguous()
        exact = torch.equal(ours.view(torch.int16), small["ref"]().contiguous().view(torch.int16))
        note = "" if exact else f"{qt.name}: differs from gguf-py's reference (bf16, bit for bit)"
        ours_gbs = out_bytes / ctx.time(fns["ours"], reps) / 1e9
        if copy_s is None:
            copy_s = ctx.time(fns["memcpy"], reps)
        c96 = [out_bytes / ctx.time(fns[k], reps) / 1e9 for k in ("city96", "city96/fp16") if k in fns]
        if c96:
            # information only: ComfyUI-GGUF computes in bf16 and rounds more than once
            ref = small["ref"]().float()
            diff = (small["city96"]().cpu().float() - ref).abs().max().item() / ref.abs().max().item()
            if diff:
                note += f"{'; ' if note else ''}{qt.name}: ComfyUI-GGUF's bf16 result differs from " \
                        f"gguf-py's by up to {diff:.2g} of the largest value"
        best = max(c96) if c96 else None
        rows.append(row("gguf", f"{qt.name} -> bf16 (GB/s), ref = ComfyUI-GGUF", num(ours_gbs),
                        num(best) if best else "-", f"{num(ours_gbs / best)}x" if best else "-",
                        "PASS" if exact else "FAIL", note))
    rows.append(row("gguf", f"  device copy of the output, {shape[0]}x{shape[1]} bf16 (GB/s)",
                    num(out_bytes / copy_s / 1e9),
                    note="" if city else "no --comfyui-gguf checkout: ComfyUI-GGUF not compared"))
    return rows


def section_nf4(ctx):
    import bench_nf4 as bn

    have = bn.have_bitsandbytes()
    shapes = [(256, 1024)] if ctx.selftest else [(3072, 3072), (3072, 12288)]
    rounds = 3 if ctx.selftest else 21
    rows = []
    for shape in shapes:
        for nested in (False, True):
            try:
                gbs = bn.measure(shape, nested, rounds, have, device=ctx.device, sync=ctx.sync)
            except AssertionError as e:
                rows.append(row("nf4", f"{shape[0]}x{shape[1]} {'v1' if nested else 'v2'}", "-",
                                verdict="FAIL", note=f"NF4 {shape}: {e} (ours vs bitsandbytes)"))
                continue
            b = gbs.get("bnb")
            label = f"{shape[0]}x{shape[1]} {'v1' if nested else 'v2'} -> bf16 (GB/s), ref = bnb"
            rows.append(row("nf4", label,
                            num(gbs["ours"]), num(b) if b else "-",
                            f"{num(gbs['ours'] / b)}x" if b else "-", "PASS" if b else "skip",
                            "" if b else "bitsandbytes not installed: no reference, not compared"))
    return rows


def section_comfy(ctx):
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        return [row("comfy", "ComfyUI workflows", "-", verdict="skip",
                    note="COMFYUI_PATH not set: ComfyUI workflows not run")]
    # The selftest keeps ComfyUI on the CPU (--cpu, the host pool): the same workflows and
    # comparisons, minutes long, for checking this section without a GPU.
    return comfy_workflows(comfy, gpu=not ctx.selftest)


# --- ComfyUI on the GPU -------------------------------------------------------------------
# (name, workflow kind, VBAR budget in GB, the model's size in GB, its file = its VBARs' name)
COMFY_CASES = [("SD1.5 checkpoint", "sd15", 0.03, 0.465, "tiny_sd15.safetensors"),
               ("Flux safetensors", "flux", 0.5, 1.09, "tiny_flux.safetensors"),
               ("Flux GGUF Q8_0", "flux_gguf", 0.25, 0.58, "tiny_flux_Q8_0.gguf")]


def comfy_paths(comfy):
    """As tests/comfy_env.py: the harness, ComfyUI's python and the tiny models."""
    if not os.path.isfile(os.path.join(comfy, "main.py")):
        raise FileNotFoundError(f"COMFYUI_PATH={comfy} has no main.py")
    harness = os.environ.get("COMFY_HARNESS") or str(ROOT.parent / "shared" / "comfy_harness")
    if not os.path.isfile(os.path.join(harness, "harness.py")):
        raise FileNotFoundError(f"comfy harness not found at {harness}: set COMFY_HARNESS")
    parent = os.path.dirname(os.path.abspath(comfy))
    python = os.environ.get("COMFY_PYTHON") or os.path.join(parent, "venv", "bin", "python")
    models = os.environ.get("COMFY_HARNESS_MODELS") or os.path.join(parent, "models")
    return harness, python, models


def comfy_server(harness, comfy, python, models, gpu):
    """The harness's ComfyServer; for the GPU started without its --cpu flag (the harness has no
    option for that; everything else, start-up, runs and stopping our own pid only, is its)."""
    sys.path.insert(0, harness)
    from harness import ComfyServer

    class GpuServer(ComfyServer):
        def command(self, extra_paths):
            return [a for a in super().command(extra_paths) if a != "--cpu"]

    srv = (GpuServer if gpu else ComfyServer)(comfy, custom_nodes=[str(ROOT)], models_dir=models,
                                              python=python)
    srv.harness_dir = harness
    srv.start(timeout=120)
    failures = [f for f in srv.import_failures() if str(ROOT) in str(f) or ROOT.name in str(f)]
    if failures:
        srv.stop()
        raise RuntimeError(f"the pack failed to import in ComfyUI: {failures}\n{srv.log_tail(40)}")
    return srv


def comfy_models(base, tmp):
    """A models folder: links to the tiny models, plus tiny Flux as GGUF Q8_0 and its gguf-py
    decoding as float32 safetensors (what the stock loader gets), as tests/test_comfyui_gguf.py."""
    from gguf import GGMLQuantizationType as QT
    from gguf_helpers import convert_safetensors, write_reference_safetensors

    for sub in ("checkpoints", "vae", "diffusion_models"):
        os.makedirs(os.path.join(tmp, sub))
    for rel in ("checkpoints/tiny_sd15.safetensors", "vae/tiny_flux_ae.safetensors",
                "diffusion_models/tiny_flux.safetensors"):
        os.symlink(os.path.join(base, rel), os.path.join(tmp, rel))
    q8 = os.path.join(tmp, "diffusion_models", "tiny_flux_Q8_0.gguf")
    convert_safetensors(os.path.join(base, "diffusion_models", "tiny_flux.safetensors"), q8, QT.Q8_0)
    write_reference_safetensors(q8, os.path.join(tmp, "diffusion_models", "tiny_flux_Q8_0_ref.safetensors"))


def comfy_workflow(srv, kind, vbar, budget):
    from comfy_env import add_budget
    from test_comfyui_checkpoint import load_wf

    wf = load_wf(srv, "sd15_tiny_api.json" if kind == "sd15" else "flux_tiny_api.json")
    if kind == "sd15" and vbar:
        wf["1"]["class_type"] = "VBARCheckpointLoader"
    elif kind == "flux" and vbar:
        wf["1"]["class_type"] = "VBARDiffusionModelLoader"
    elif kind == "flux_gguf":
        if vbar:
            wf["1"] = {"class_type": "VBARGGUFDiffusionModelLoader", "inputs": {
                "unet_name": "tiny_flux_Q8_0.gguf", "dequant_dtype": "default", "patch_dtype": "default"}}
        else:
            wf["1"]["inputs"]["unet_name"] = "tiny_flux_Q8_0_ref.safetensors"
    if vbar:
        wf["5"]["inputs"]["model"] = add_budget(wf, ["1", 0], budget)
    return wf


def vbar_counters(srv, model_file, gpu):
    """Summed counters of the model's VBARs on a CUDA pool (the host pool without ``gpu``), its
    text encoder and VAE too for a checkpoint, or None without such a pool. They count from the
    model's load."""
    pools = srv.get("/vbar/stats")["pools"]
    pool = next((v for k, v in pools.items() if k.startswith("cuda" if gpu else "cpu")), None)
    if pool is None:
        return None
    vbars = [v for v in pool["vbars"] if v["name"].startswith(model_file)]
    return {k: sum(v[k] for v in vbars) for k in ("hits", "misses", "offloaded")}


def comfy_workflows(comfy, gpu=True):
    import shutil

    from comfy_env import ensure_models
    from test_comfyui_checkpoint import digest

    harness, python, models = comfy_paths(comfy)
    ensure_models(harness, python, models, comfy)
    tmp = tempfile.mkdtemp(prefix="vbar_gpu_check_")
    rows = []
    try:
        comfy_models(models, tmp)
        srv = comfy_server(harness, comfy, python, tmp, gpu)
        try:
            for label, kind, budget, size, model_file in COMFY_CASES:
                stock = srv.run(comfy_workflow(srv, kind, False, budget), fresh_cache=True)
                ours = srv.run(comfy_workflow(srv, kind, True, budget), fresh_cache=True)
                c = vbar_counters(srv, model_file, gpu)
                measure = f"{label}, budget {budget:g} GB < {size:g} GB: wall s vs stock"
                try:
                    same = digest(ours) == digest(stock)
                except AssertionError as e:      # a run that did not succeed
                    rows.append(row("comfy", measure, "-", verdict="FAIL", note=f"{label}: {e}"))
                    continue
                problems = [] if same else ["the image differs from the stock loader's"]
                if c is None:
                    problems.append(f"no VBAR pool on {'a CUDA device' if gpu else 'the CPU'} "
                                    f"(cuda-python missing for {python}?)")
                else:
                    if not c["offloaded"]:
                        problems.append("nothing streamed: the budget did not bind")
                    if not c["hits"] + c["misses"]:
                        problems.append("no weight was resident")
                rows.append(row("comfy", measure, f"{ours.wall_seconds:.1f}", f"{stock.wall_seconds:.1f}",
                                f"{ours.wall_seconds / stock.wall_seconds:.2f}x",
                                "FAIL" if problems else "PASS",
                                f"{label}: " + "; ".join(problems) if problems else
                                f"{label}: image identical; {c['offloaded']} uses streamed, "
                                f"{c['hits'] + c['misses']} resident"))
        finally:
            srv.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


FUNCS = {"env": section_env, "conformance": section_conformance, "p2": section_p2, "p4": section_p4,
         "gguf": section_gguf, "nf4": section_nf4, "comfy": section_comfy}


def run_inprocess(name, ctx):
    """A section's rows; an exception becomes a FAIL row naming it."""
    try:
        return FUNCS[name](ctx)
    except Exception as e:  # noqa: BLE001 - reported in the table, exit status 1
        tb = traceback.format_exc(limit=-3)
        return [row(name, "section", "-", verdict="FAIL", note=f"{type(e).__name__}: {e}\n{tb}")]


# --- running sections in processes of their own ------------------------------------------
def run_child(cmd, limit, cwd=None):
    """Run ``cmd`` in its own process group for at most ``limit`` s. On time-out the whole group
    (a ComfyUI server it started included) gets SIGTERM, then SIGKILL.
    Returns (returncode or None on time-out, stdout, stderr, seconds)."""
    t = time.time()
    p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=limit)
        return p.returncode, out, err, time.time() - t
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                out, err = p.communicate(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                out, err = "", ""
        return None, out or "", err or "", time.time() - t


def run_isolated(name, args, limit):
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", name]
    if args.selftest:
        cmd.append("--selftest")
    if args.comfyui_gguf:
        cmd += ["--comfyui-gguf", args.comfyui_gguf]
    rc, out, err, secs = run_child(cmd, limit, cwd=ROOT)
    lines = [ln for ln in out.splitlines() if ln.startswith(MARK)]
    if rc is None:
        return [row(name, "section", "-", verdict="FAIL",
                    note=f"{name}: stopped after its time limit of {limit:.0f} s\n{err[-1500:]}")]
    if rc != 0 or not lines:
        return [row(name, "section", "-", verdict="FAIL",
                    note=f"{name}: exited {rc} without a result\n{(out + err)[-2500:]}")]
    return json.loads(lines[-1][len(MARK):])


def fmt_table(rows):
    heads = ["section", "measure", "value", "reference", "ratio", "verdict"]
    keys = ["section", "measure", "value", "ref", "ratio", "verdict"]
    w = [max(len(h), *(len(str(r[k])) for r in rows)) for h, k in zip(heads, keys)]
    align = "<<>><<"
    line = "  ".join(f"{{:{a}{n}}}" for a, n in zip(align, w))
    out = [line.format(*heads), "  ".join("-" * n for n in w)]
    out += [line.format(*(str(r[k]) for k in keys)) for r in rows]
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--comfyui-gguf", metavar="PATH", help="ComfyUI-GGUF checkout (or its dequant.py)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    ap.add_argument("--strict", action="store_true", help="a missed speed goal (MISS) fails too")
    ap.add_argument("--selftest", action="store_true",
                    help="fake CUDA driver and CPU, tiny sizes, in this process (CI)")
    ap.add_argument("--isolate", action="store_true",
                    help="with --selftest: each section in a process of its own, as on a GPU")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:      # one section in this process; rows as JSON on the last line
        # Stopped for its time limit: unwind, so a ComfyUI server and temporary files are cleaned up.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        rows = run_inprocess(args.child, Ctx(args.selftest, args.comfyui_gguf))
        print(MARK + json.dumps(rows), flush=True)
        return 0

    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if not args.selftest:
        count, why = cuda_probe()
        if not count:
            print(f"gpu_check: no CUDA device ({why}); nothing to check. "
                  f"`--selftest` runs the sections on the fake driver.")
            return 0
    isolate = args.isolate or not args.selftest
    ctx = None if isolate else Ctx(True, args.comfyui_gguf)
    start = time.time()
    rows = []
    for name in ["env"] + names:
        left = TOTAL_LIMIT_S - (time.time() - start)
        limit = min(LIMITS_S[name], left)
        t = time.time()
        if limit < 5:
            got = [row(name, "section", "-", verdict="FAIL", note=f"{name}: not run, out of time")]
        elif isolate:
            got = run_isolated(name, args, limit)
        else:
            got = run_inprocess(name, ctx)
        print(f"gpu_check: {name} took {time.time() - t:.1f} s", file=sys.stderr, flush=True)
        rows += got
        if name == "env" and any(r["verdict"] == "FAIL" for r in got):
            break
    env = [r for r in rows if r["section"] == "env"]
    table = [r for r in rows if r["section"] != "env"]
    for r in env:
        print(f"{'selftest' if args.selftest else 'GPU check'}: {r['value']}; {r['note']}")
    if table:
        print(fmt_table(table))
    notes = [f"[{r['section']}] {r['verdict']}: {r['note']}" for r in rows
             if r["note"] and r["section"] != "env" or r["verdict"] == "FAIL"]
    if notes:
        print("\nnotes:\n" + "\n".join(notes))
    failed = [r for r in rows if r["verdict"] == "FAIL" or (args.strict and r["verdict"] == "MISS")]
    print(f"\n{'FAILED: ' + str(len(failed)) + ' row(s)' if failed else 'all checks passed'}"
          f" ({time.time() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
