"""VRAM monitor: vram/report.py (snapshot, text, residency map), the node's glue in monitor.py,
and the live-panel pusher in routes.py, on a host pool with models in every state. No ComfyUI."""
import json
import math
import threading

import numpy as np
import pytest
import torch

from vbar_loaders import monitor, routes
from vbar_loaders import vram as vram_pkg
from vbar_loaders.vram import Pool, make_backend, report

PAGE = 1 << 16


def fault_all(vbar, slots):
    for s in slots:
        if vbar.fault(s).ok:
            vbar.unpin(s)


@pytest.fixture
def pool():
    """Budget 10 pages. 'big' (newest, top priority): 2 held + 10 slots of one page, of which
    only 8 pages fit -> held / resident / streamed. 'small': 4 half-page slots, all evicted."""
    p = Pool(make_backend("host", page_size=PAGE), budget=10 * PAGE, headroom=PAGE)
    small = p.create_vbar("small:clip", 4 * PAGE)
    ss = [small.alloc(PAGE // 2, name=f"s{i}") for i in range(4)]
    fault_all(small, ss)
    big = p.create_vbar("big.safetensors", 16 * PAGE)
    bs = [big.alloc(PAGE, name=f"b{i}") for i in range(12)]
    big.hold(bs[0])
    big.hold(bs[1])
    fault_all(big, bs[2:])
    p.test_vbars = {"big": (big, bs), "small": (small, ss)}
    yield p
    p.close()


# --- snapshot ---------------------------------------------------------------------------------
def test_snapshot_states_and_streamed_bytes(pool):
    st = report.pool_snapshot(pool)
    by = {v["name"]: v for v in st["vbars"]}
    big, small = by["big.safetensors"], by["small:clip"]
    # Budget 10 pages - 1 headroom = 9: 2 held + 7 resident; the small model was evicted.
    assert big["slot_states"] == "HH" + "R" * 7 + "SSS"
    assert small["slot_states"] == "SSSS"
    assert len(big["slot_states"]) == big["slots"] == 12
    assert big["streamed_bytes"] == 3 * PAGE            # three offloaded faults of one page
    assert st["streamed_bytes"] == big["streamed_bytes"] + small["streamed_bytes"]
    assert [v["name"] for v in st["vbars"]] == ["big.safetensors", "small:clip"]   # priority
    json.dumps(st)   # the route and the events send it as JSON


def test_slot_codes_agree_with_vbar_slot_states():
    """The snapshot reads a copy of the page map (short lock hold); it must say what
    VBAR.slot_states() says, for slots sharing pages too."""
    import random

    rng = random.Random(3)
    p = Pool(make_backend("host", page_size=PAGE), budget=12 * PAGE)
    vbars = []
    for m in range(3):
        v = p.create_vbar(f"m{m}", 40 * PAGE)
        slots = [v.alloc(rng.choice([PAGE // 3, PAGE, 2 * PAGE + 7]), name=str(i)) for i in range(20)]
        vbars.append((v, slots))
    for step in range(300):
        v, slots = rng.choice(vbars)
        s = rng.choice(slots)
        action = rng.random()
        if action < 0.05:
            v.prioritize()
        elif action < 0.1 and not s.held:
            try:
                v.hold(s)
            except Exception:  # noqa: BLE001 - budget full of held slots: fine here
                pass
        elif action < 0.15 and s.held:
            v.release(s)
        elif v.fault(s).ok:
            v.unpin(s)
        st = report.pool_snapshot(p)
        for vb, d in zip(p.vbars, st["vbars"]):
            want = "".join(report.STATE_CODES[state] for _, _, state in vb.slot_states())
            assert d["slot_states"] == want, f"step {step}"
    p.close()


def test_device_numbers_without_cuda_use_the_pool_budget(pool):
    st = report.pool_snapshot(pool)
    for dev in ("cpu", "cuda:0"):   # no CUDA context here: never creates one, falls back
        d = report.device_numbers(dev, st)
        assert d["source"] == "pool budget"
        assert d["total_bytes"] == 10 * PAGE
        assert d["free_bytes"] == 10 * PAGE - st["resident_bytes"]
        assert d["torch_allocated_bytes"] == d["torch_reserved_bytes"] == 0


def test_device_numbers_on_cuda_come_from_torch(pool, monkeypatch):
    """With a CUDA context already made (stand-in torch: no GPU here), the driver's numbers."""
    import sys
    import types

    calls = []
    cuda = types.SimpleNamespace(
        is_initialized=lambda: True,
        mem_get_info=lambda i: calls.append(i) or (3 << 30, 8 << 30),
        memory_allocated=lambda i: 1 << 30, memory_reserved=lambda i: 2 << 30)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    d = report.device_numbers("cuda:1", report.pool_snapshot(pool))
    assert calls == [1] and d["source"] == "cuda"
    assert (d["total_bytes"], d["free_bytes"]) == (8 << 30, 3 << 30)
    assert (d["torch_allocated_bytes"], d["torch_reserved_bytes"]) == (1 << 30, 2 << 30)
    cuda.is_initialized = lambda: False          # no context yet: the monitor must not make one
    assert report.device_numbers("cuda:1", report.pool_snapshot(pool))["source"] == "pool budget"
    assert calls == [1]


def test_collect_skips_closed_pools(pool):
    closed = Pool(make_backend("host", page_size=PAGE), budget=PAGE)
    closed.close()
    snap = report.collect({"cpu": pool, "cpu:1": closed})
    assert list(snap["pools"]) == ["cpu"] and list(snap["devices"]) == ["cpu"]


# --- text -------------------------------------------------------------------------------------
def test_text_report_shows_device_pool_and_every_model(pool):
    text = report.text_report(report.collect({"cpu": pool}))
    assert "cpu (host backend)" in text
    assert "budget 576.0 KiB" in text                    # 10 pages - 1 headroom
    assert "torch allocated 0 B" in text
    lines = {ln.split()[0]: ln.split() for ln in text.splitlines() if ln[:1] in "bs" and "  " in ln}
    big = lines["big.safetensors"]
    # reserved, resident, pinned, held, watermark, hits, misses, offloaded, evictions, ...
    assert big[1:5] == ["1.0", "MiB", "576.0", "KiB"]
    assert "first run" in text


def test_moved_since_previous_run(pool):
    s1 = report.collect({"cpu": pool})
    s2 = report.collect({"cpu": pool})
    moved = report.moved_since(s1, s2)
    assert moved[("cpu", "big.safetensors")] == {"mapped": 0, "streamed": 0}
    big, bs = pool.test_vbars["big"]
    fault_all(big, bs[2:])                               # all hits, and the same 3 stream
    s3 = report.collect({"cpu": pool})
    moved = report.moved_since(s2, s3)
    assert moved[("cpu", "big.safetensors")] == {"mapped": 0, "streamed": 3 * PAGE}
    small, ss = pool.test_vbars["small"]
    small.prioritize()
    fault_all(small, ss)                                 # evicts 'big' pages to map its own
    moved = report.moved_since(s3, report.collect({"cpu": pool}))
    assert moved[("cpu", "small:clip")]["mapped"] == 2 * PAGE
    # No previous snapshot: everything since load.
    assert report.moved_since(None, s1)[("cpu", "big.safetensors")]["mapped"] == 9 * PAGE


def test_moved_counts_from_zero_for_a_reloaded_model(pool):
    prev = report.collect({"cpu": pool})
    big, _ = pool.test_vbars["big"]
    big.close()
    again = pool.create_vbar("big.safetensors", 4 * PAGE)
    fault_all(again, [again.alloc(PAGE, name="x")])
    moved = report.moved_since(prev, report.collect({"cpu": pool}))
    assert moved[("cpu", "big.safetensors")] == {"mapped": PAGE, "streamed": 0}


def test_text_report_without_pools_or_models():
    assert "no VBAR pool yet" in report.text_report(report.collect({}))
    p = Pool(make_backend("host", page_size=PAGE), budget=PAGE)
    assert "no models loaded" in report.text_report(report.collect({"cpu": p}))
    p.close()


# --- residency map ----------------------------------------------------------------------------
def test_map_colours_each_slot_by_state(pool):
    snap = report.collect({"cpu": pool})
    img, labels = report.residency_map(snap, width=12 * 40 + 20, pad=10)
    assert img.dtype == np.uint8 and img.shape[2] == 3
    texts = [t for _, _, t, _, _ in labels]
    assert "big.safetensors" in texts and "small:clip" in texts
    assert any("2 held, 7 resident, 3 streamed of 12 slots" in t for t in texts)
    # First bar (highest priority = 'big'): 40 px per slot, sample each cell's middle.
    y_bar = [y for _, y, t, _, _ in labels if t == "big.safetensors"][0] + 16 + 9
    got = "".join({report.COLOURS[c]: c for c in "HRS"}[tuple(img[y_bar, 10 + 40 * i + 20])]
                  for i in range(12))
    assert got == "HH" + "R" * 7 + "SSS"
    assert tuple(img[y_bar, 10 + 40]) == report.BACKGROUND       # seam between wide cells
    # The legend has a swatch of each colour.
    for code in "HRS":
        assert (img[10:26, :] == report.COLOURS[code]).all(axis=2).any()


def test_map_samples_models_with_more_slots_than_pixels():
    p = Pool(make_backend("host", page_size=PAGE), budget=64 * PAGE)
    v = p.create_vbar("wide", 64 * PAGE)
    slots = [v.alloc(PAGE // 64, name=str(i)) for i in range(3000)]
    fault_all(v, slots[:1536])            # 64 slots a page: exactly the first 24 pages
    img, _ = report.residency_map(report.collect({"cpu": p}), width=300, pad=10)
    row = img[10 + 26 + 16 + 9, 10:290]
    edge = len(row) * 1536 // 3000
    assert (row[:edge] == report.COLOURS["R"]).all()
    assert (row[edge + 1:] == report.COLOURS["S"]).all()
    p.close()


def test_map_without_models():
    img, labels = report.residency_map(report.collect({}))
    assert img.shape[0] > 0 and any("no VBAR models" in t for _, _, t, _, _ in labels)


# --- the node's glue --------------------------------------------------------------------------
def test_any_type_matches_every_socket_type():
    # ComfyUI's link check: `not received_type != input_type` (comfy_execution/validation.py).
    for other in ("IMAGE", "MODEL", "LATENT", "*"):
        assert not (monitor.ANY != other)
    assert monitor.ANY == "*" and hash(monitor.ANY) == hash("*")


def test_run_monitor_returns_passthrough_text_and_image(pool):
    thing = object()
    out = monitor.run_monitor(thing, pools={"cpu": pool}, save=False, key="t1")
    passthrough, text, image = out["result"]
    assert passthrough is thing
    assert text == out["ui"]["text"][0] and "big.safetensors" in text
    assert "images" not in out["ui"]                     # nothing saved without ComfyUI
    assert image.dtype == torch.float32 and image.dim() == 4 and image.shape[0] == 1
    assert image.shape[3] == 3 and 0.0 <= image.min() and image.max() <= 1.0
    # The second run with the same key reports what moved in between: nothing.
    text2 = monitor.run_monitor(thing, pools={"cpu": pool}, save=False, key="t1")["result"][1]
    big_row = [ln for ln in text2.splitlines() if ln.startswith("big.safetensors")][0]
    assert big_row.split()[-4:] == ["0", "B", "0", "B"]


def test_labels_are_drawn_when_pillow_is_there(pool):
    pytest.importorskip("PIL")
    snap = report.collect({"cpu": pool})
    bare, labels = report.residency_map(snap)
    drawn = monitor.draw_map(snap)
    assert drawn.shape == bare.shape
    x, y = labels[3][:2]    # the first model's name, left-aligned
    assert (drawn[y:y + 14, x:x + 60] != bare[y:y + 14, x:x + 60]).any()


def test_node_class_without_comfyui(pool, monkeypatch):
    from vbar_loaders import nodes

    monkeypatch.setattr(vram_pkg, "_pools", {"cpu": pool})
    cls = nodes.NODE_CLASS_MAPPINGS["VBARVRAMMonitor"]
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["VBARVRAMMonitor"] == "VBAR VRAM Monitor"
    spec = cls.INPUT_TYPES()
    assert spec["required"] == {} and spec["optional"]["passthrough"][0] == "*"
    assert cls.OUTPUT_NODE and cls.RETURN_TYPES[1:] == ("STRING", "IMAGE")
    assert math.isnan(cls.IS_CHANGED())
    out = cls().report(passthrough=5, unique_id="7")
    assert out["result"][0] == 5 and "big.safetensors" in out["ui"]["text"][0]


# --- live panel -------------------------------------------------------------------------------
def test_pusher_sends_only_when_the_allocator_changed(pool, monkeypatch):
    monkeypatch.setattr(vram_pkg, "_pools", {"cpu": pool})
    sent = []
    pusher = routes.StatsPusher(lambda event, data: sent.append((event, data)))
    assert pusher.tick() and sent[-1][0] == "vbar.stats"
    data = sent[-1][1]
    assert data["pools"]["cpu"]["vbars"][0]["slot_states"] == "HH" + "R" * 7 + "SSS"
    assert data["devices"]["cpu"]["total_bytes"] == 10 * PAGE
    json.dumps(data)
    assert not pusher.tick()                             # idle: nothing sent
    big, bs = pool.test_vbars["big"]
    fault_all(big, bs[2:3])
    assert pusher.tick() and len(sent) == 2


def test_pusher_thread_stops(monkeypatch):
    monkeypatch.setattr(vram_pkg, "_pools", {})
    pusher = routes.StatsPusher(lambda *a: None, interval=0.01)
    pusher.start()
    pusher.stop()
    pusher.join(2)
    assert not pusher.is_alive()


def test_register_without_a_server():
    assert routes.register() is False


def test_snapshots_while_another_thread_faults(pool):
    """The panel's thread snapshots while sampling faults: every snapshot is self-consistent."""
    big, bs = pool.test_vbars["big"]
    small, ss = pool.test_vbars["small"]
    stop = threading.Event()
    errors = []

    def sample():
        try:
            while not stop.is_set():
                small.prioritize()
                fault_all(small, ss)
                big.prioritize()
                fault_all(big, bs)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=sample)
    t.start()
    try:
        for _ in range(200):
            st = report.collect({"cpu": pool})["pools"]["cpu"]
            assert st["resident_bytes"] == sum(v["resident_bytes"] for v in st["vbars"])
            assert all(len(v["slot_states"]) == v["slots"] for v in st["vbars"])
    finally:
        stop.set()
        t.join()
    assert not errors
