"""One diffusion-model forward, in one ComfyUI process: the same GGUF through ComfyUI-GGUF's
loader and through the pack's, and the floor (ComfyUI's stock loader on the same weights decoded
to float32 by gguf-py: no dequantization at all). Rounds interleave the three after one warm-up
round, so a busy machine slows each alike; printed: median seconds and each / ComfyUI-GGUF.

On a CPU both GGUF loaders dequantize every weight at every use, so the floor is the best either
could do; the sampler time of bench_e2e_gguf.py is this forward times the steps, plus ComfyUI.

    python benchmarks/bench_gguf_forward.py --comfyui-gguf /path/to/ComfyUI-GGUF   # COMFYUI_PATH set

Run it with ComfyUI's interpreter (torchvision/torchaudio stubs on PYTHONPATH where ComfyUI
needs them). The model is the harness's tiny Flux (545 M parameters), written as a GGUF of
``--qtype`` with tests/gguf_helpers.py into ``--work`` (kept between runs).
"""
import argparse
import importlib.util
import os
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def load_city96(path):
    """ComfyUI-GGUF from its checkout, as a package of its own (it is never copied here)."""
    spec = importlib.util.spec_from_file_location("comfyui_gguf_ref", os.path.join(path, "__init__.py"),
                                                  submodule_search_locations=[path])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_gguf_ref"] = mod
    spec.loader.exec_module(mod)
    from comfyui_gguf_ref.loader import gguf_sd_loader
    from comfyui_gguf_ref.nodes import GGUFModelPatcher
    from comfyui_gguf_ref.ops import GGMLOps
    return gguf_sd_loader, GGMLOps, GGUFModelPatcher


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui-gguf", required=True, help="a ComfyUI-GGUF checkout (read only)")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="default: COMFYUI_PATH")
    ap.add_argument("--models", help="folder with diffusion_models/tiny_flux.safetensors "
                    "(default: <comfyui>/../models)")
    ap.add_argument("--qtype", default="Q8_0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "vbar_bench_forward"))
    args = ap.parse_args(argv)
    if not args.comfyui or not os.path.isfile(os.path.join(args.comfyui, "main.py")):
        sys.exit("set COMFYUI_PATH (or --comfyui) to a ComfyUI checkout")
    models = args.models or os.path.join(os.path.dirname(os.path.abspath(args.comfyui)), "models")
    src = os.path.join(models, "diffusion_models", "tiny_flux.safetensors")
    if not os.path.isfile(src):
        sys.exit(f"{src} is missing: write the harness's tiny models first (tiny_models.py)")

    from comfy_boot import boot
    boot(args.comfyui)
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    import torch
    from gguf import GGMLQuantizationType as QT
    from gguf_helpers import convert_safetensors, write_reference_safetensors
    from vbar_loaders.loaders.comfyui.gguf import load_gguf_diffusion_model

    os.makedirs(args.work, exist_ok=True)
    gguf = os.path.join(args.work, f"tiny_flux_{args.qtype}.gguf")
    ref = gguf[:-5] + ".ref.safetensors"
    if not os.path.exists(gguf):
        convert_safetensors(src, gguf + ".tmp", QT[args.qtype])
        os.replace(gguf + ".tmp", gguf)
    if not os.path.exists(ref):
        write_reference_safetensors(gguf, ref + ".tmp")
        os.replace(ref + ".tmp", ref)

    sd_loader, ops, patcher = load_city96(args.comfyui_gguf)
    models = {
        "ComfyUI-GGUF": patcher.clone(comfy.sd.load_diffusion_model_state_dict(
            sd_loader(gguf), model_options={"custom_operations": ops()})),
        "pack": load_gguf_diffusion_model(gguf),
        "floor (no dequant)": comfy.sd.load_diffusion_model_state_dict(comfy.utils.load_torch_file(ref)),
    }
    mm.load_models_gpu(list(models.values()))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 16, 16, generator=g)          # 128 px latent
    ctx, vec = torch.randn(1, 256, 4096, generator=g), torch.randn(1, 768, generator=g)
    t, guidance = torch.tensor([0.5]), torch.tensor([3.5])
    times = {k: [] for k in models}
    with torch.no_grad():
        for r in range(args.rounds + 1):          # round 0: warm-up (first faults, caches)
            for name, p in models.items():
                t0 = time.perf_counter()
                p.model.diffusion_model(x, t, ctx, y=vec, guidance=guidance)
                if r:
                    times[name].append(time.perf_counter() - t0)
    ref_s = statistics.median(times["ComfyUI-GGUF"])
    print(f"tiny Flux {args.qtype}, one forward, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:20s} median {med:6.2f} s  ({' '.join(f'{s:.2f}' for s in ts)})  "
              f"/ ComfyUI-GGUF {med / ref_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
