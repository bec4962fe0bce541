"""End to end against the loader people use today: the same GGUF workflow in one real ComfyUI,
through ComfyUI-GGUF's ``UnetLoaderGGUF`` and through the pack's VBAR GGUF loader.

Both pipelines sit in one prompt (same latent, same conditioning, same sampler settings; each
run changes the seed of both samplers), so the loaders stay cached and the runs interleave: each
prompt runs ComfyUI-GGUF's sampler and the pack's. One warm-up prompt first (loads, first
faults), then ``--runs`` timed ones. The time is the KSampler node's wall seconds as the harness
measures them (websocket 'executing' events). Printed: median seconds and pack / ComfyUI-GGUF;
the goal is 0.5 or lower.

Models: the harness's tiny Flux as a Q8_0 GGUF, and the tiny Wan 2.1 of tests/tiny_families.py
(2 blocks) as a Q8_0 GGUF laid out as ComfyUI-GGUF writes Wan (5-D F32 patch embedding); both
written with tests/gguf_helpers.write_comfyui_gguf into a scratch models folder.
``--floor`` adds a third pipeline: ComfyUI's stock UNETLoader on the GGUF's weights decoded
to float32 safetensors, i.e. the same model with no dequantization at all. On a CPU, where
both loaders keep every weight in the one memory and dequantize per use, that is the floor
neither GGUF loader can go below.
Budgets: unlimited, and a tenth of the GGUF file (VBAR Set Budget, headroom 0) for the pack;
ComfyUI-GGUF has no budget on CPU (it keeps the model where ComfyUI puts it), so it runs
unlimited in both rows.

    python benchmarks/bench_e2e_gguf.py --comfyui-gguf /work/comfy/ggufsrc   # COMFYUI_PATH set
    python benchmarks/bench_e2e_gguf.py --comfyui-gguf ... --quick           # smoke: tiny Wan only

ComfyUI-GGUF is installed into the harness's run directory as a custom node (a link); it is
never copied into this repository.
"""
import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def comfy_setup(args):
    comfy = os.path.abspath(args.comfyui or os.environ.get("COMFYUI_PATH") or "")
    if not os.path.isfile(os.path.join(comfy, "main.py")):
        sys.exit("set COMFYUI_PATH (or --comfyui) to a ComfyUI checkout")
    python = os.environ.get("COMFY_PYTHON") or os.path.join(os.path.dirname(comfy), "venv", "bin", "python")
    harness = os.environ.get("COMFY_HARNESS") or str(ROOT.parent / "shared" / "comfy_harness")
    base = os.environ.get("COMFY_HARNESS_MODELS") or os.path.join(os.path.dirname(comfy), "models")
    return comfy, python, harness, base


def write_models(models, comfy, python, base, families, floor=False):
    """{family: (gguf file name, bytes)} written into ``models``/diffusion_models (with
    ``floor``, each also as <name>.ref.safetensors: its weights decoded by gguf-py, float32)."""
    sys.path.insert(0, str(TESTS))
    from gguf import GGMLQuantizationType as QT
    from gguf_helpers import write_comfyui_gguf, write_reference_safetensors
    from safetensors.torch import load_file

    out = {}
    dm = pathlib.Path(models, "diffusion_models")
    dm.mkdir(parents=True, exist_ok=True)
    if "wan" in families:   # the safetensors is kept in ``base`` (written once per layout)
        import tiny_families

        unet = tiny_families.run_writer(python, comfy, base, only=["wan21"], blocks=2)["wan21"]["unet"]
        write_comfyui_gguf(dm / "bench_wan21_Q8_0.gguf",
                           load_file(os.path.join(base, "diffusion_models", unet)), QT.Q8_0)
        out["wan"] = "bench_wan21_Q8_0.gguf"
    if "flux" in families:
        write_comfyui_gguf(dm / "bench_flux_Q8_0.gguf",
                           load_file(os.path.join(base, "diffusion_models", "tiny_flux.safetensors")),
                           QT.Q8_0)
        out["flux"] = "bench_flux_Q8_0.gguf"
    if floor:
        for name in out.values():
            write_reference_safetensors(dm / name, dm / (name + ".ref.safetensors"))
    return {f: (name, (dm / name).stat().st_size) for f, name in out.items()}


# Per family: latent node, conditioning (tokens, dim, pooled), sampler settings.
FAMILY = {
    "flux": ({"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128,
                                                              "batch_size": 1}},
             (16, 4096, 768), ("euler", "simple", 1.0)),
    "wan": ({"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 256, "height": 256,
                                                                 "length": 17, "batch_size": 1}},
            (16, 4096, 0), ("euler", "simple", 1.0)),
}
QUICK_SIZE = {"flux": {"width": 64, "height": 64}, "wan": {"width": 64, "height": 64, "length": 5}}


def prompt(family, unet, budget_gb, steps, seed, quick, floor=False):
    latent, (tokens, dim, pooled), (sampler, scheduler, cfg) = FAMILY[family]
    latent = json.loads(json.dumps(latent))
    if quick:
        latent["inputs"].update(QUICK_SIZE[family])
    p = {
        "lat": latent,
        "cond": {"class_type": "ComfyHarnessRandomConditioning", "inputs": {
            "tokens": tokens, "dim": dim, "pooled_dim": pooled, "seed": 1, "scale": 1.0}},
        "g_load": {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": unet}},
        "v_load": {"class_type": "VBARGGUFDiffusionModelLoader", "inputs": {
            "unet_name": unet, "dequant_dtype": "default", "patch_dtype": "default"}},
        "v_budget": {"class_type": "VBARSetBudget", "inputs": {
            "model": ["v_load", 0], "budget_gb": budget_gb, "headroom_gb": 0.0}},
    }
    pipes = [("g", ["g_load", 0]), ("v", ["v_budget", 0])]
    if floor:
        p["s_load"] = {"class_type": "UNETLoader", "inputs": {
            "unet_name": unet + ".ref.safetensors", "weight_dtype": "default"}}
        pipes.append(("s", ["s_load", 0]))
    for tag, model in pipes:
        p[f"{tag}_ks"] = {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["cond", 0], "negative": ["cond", 0],
            "latent_image": ["lat", 0], "seed": seed, "steps": steps, "cfg": cfg,
            "sampler_name": sampler, "scheduler": scheduler, "denoise": 1.0}}
        p[f"{tag}_save"] = {"class_type": "SaveLatent", "inputs": {
            "samples": [f"{tag}_ks", 0], "filename_prefix": f"bench_{tag}"}}
    return p


def measure(srv, family, unet, budget_gb, steps, runs, quick, floor=False):
    times = {"g": [], "v": [], **({"s": []} if floor else {})}
    for i in range(runs + 1):                  # run 0: warm-up (loads, first faults)
        res = srv.run(prompt(family, unet, budget_gb, steps, 1000 + i, quick, floor))
        if res.status != "success":
            raise RuntimeError(f"{family} budget {budget_gb}: {res.errors}\n{srv.log_tail(40)}")
        if i:
            for tag in times:
                times[tag].append(res.node_seconds[f"{tag}_ks"])
    return {k: statistics.median(v) for k, v in times.items()}, times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui-gguf", required=True, help="a ComfyUI-GGUF checkout (read only)")
    ap.add_argument("--comfyui", help="ComfyUI checkout (default: COMFYUI_PATH)")
    ap.add_argument("--families", default="wan,flux")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny Wan, 64 px, 1 run of 2 steps")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--floor", action="store_true",
                    help="also time stock UNETLoader on the decoded float32 weights")
    args = ap.parse_args(argv)
    families = ["wan"] if args.quick else args.families.split(",")
    runs, steps = (1, 2) if args.quick else (args.runs, args.steps)
    gguf_src = os.path.abspath(args.comfyui_gguf)
    if not os.path.isfile(os.path.join(gguf_src, "nodes.py")):
        sys.exit(f"--comfyui-gguf {gguf_src}: no ComfyUI-GGUF checkout there (nodes.py missing)")
    comfy, python, harness, base = comfy_setup(args)
    sys.path.insert(0, harness)
    from harness import ComfyServer

    results = []
    with tempfile.TemporaryDirectory(prefix="bench_e2e_gguf_") as tmp:
        models = pathlib.Path(tmp, "models")
        files = write_models(models, comfy, python, base, families, args.floor)
        # A link named ComfyUI-GGUF in the run dir's custom_nodes (the harness links each path).
        link = pathlib.Path(tmp, "ComfyUI-GGUF")
        os.symlink(gguf_src, link)
        srv = ComfyServer(comfy, custom_nodes=[str(ROOT), str(link)], models_dir=str(models),
                          python=python, run_dir=str(pathlib.Path(tmp, "run")))
        srv.start()
        try:
            info = srv.get("/object_info")
            for need in ("UnetLoaderGGUF", "VBARGGUFDiffusionModelLoader"):
                if need not in info:
                    raise RuntimeError(f"{need} did not load in this ComfyUI:\n{srv.log_tail(60)}")
            for family in families:
                unet, size = files[family]
                for label, budget_gb in (("unlimited", 0.0), ("1/10 model", size / 10 / 2**30)):
                    med, raw = measure(srv, family, unet, budget_gb, steps, runs, args.quick,
                                       args.floor)
                    row = {"family": family, "budget": label, "model_bytes": size,
                           "comfyui_gguf_s": med["g"], "pack_s": med["v"],
                           "ratio": med["v"] / med["g"], "runs": raw}
                    floor_txt = ""
                    if args.floor:
                        row["floor_s"] = med["s"]
                        floor_txt = (f"  floor (stock, float32) {med['s']:7.3f} s = "
                                     f"{med['s'] / med['g']:.2f} of ComfyUI-GGUF")
                    results.append(row)
                    print(f"{family:5s} {label:11s} ComfyUI-GGUF {med['g']:7.3f} s  pack "
                          f"{med['v']:7.3f} s  pack/ComfyUI-GGUF {row['ratio']:.2f} "
                          f"(goal <= 0.50; KSampler, median of {runs}, {steps} steps){floor_txt}",
                          flush=True)
        finally:
            srv.stop()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
