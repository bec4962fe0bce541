"""The ComfyUI surface: node schemas, folder lists, and calls into loaders/. Nothing else."""
import logging

log = logging.getLogger("vbar")

CATEGORY = "loaders/vbar"
SAFETENSORS_EXT = (".safetensors", ".sft")


def _files(folder, exts=SAFETENSORS_EXT):
    import folder_paths

    return [f for f in folder_paths.get_filename_list(folder) if f.lower().endswith(exts)]


def _path(folder, name):
    import folder_paths

    return folder_paths.get_full_path_or_raise(folder, name)


class VBARCheckpointLoader:
    DESCRIPTION = ("Loads a .safetensors checkpoint whose MODEL, CLIP and VAE keep no weights in "
                   "VRAM: each layer faults its weight in on use, within the VRAM budget.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (_files("checkpoints"),
                                           {"tooltip": "A .safetensors checkpoint (pickled "
                                                       ".ckpt files are refused)."})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, ckpt_name):
        import folder_paths

        from .loaders.comfyui.loading import load_checkpoint

        return load_checkpoint(_path("checkpoints", ckpt_name),
                               embedding_directory=folder_paths.get_folder_paths("embeddings"))


class VBARDiffusionModelLoader:
    DESCRIPTION = ("Loads a diffusion model (UNet/DiT) whose layers fault their weights into "
                   "VRAM on use, within the VRAM budget.")

    @classmethod
    def INPUT_TYPES(cls):
        from .loaders.comfyui.loading import WEIGHT_DTYPES

        return {"required": {
            "unet_name": (_files("diffusion_models"),),
            "weight_dtype": (list(WEIGHT_DTYPES), {
                "tooltip": "The dtype the VRAM copy holds. fp8 halves VRAM use; '_fast' computes "
                           "like plain fp8 here."}),
        }, "optional": _first_blocks_input(), "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, unet_name, blocks_cuda_size=0):
        if not blocks_cuda_size:
            return True      # nothing pinned: the file is checked when it is loaded
        return _validate_blocks("diffusion_models", unet_name, 0, 0, blocks_cuda_size)

    def load(self, unet_name, weight_dtype, blocks_cuda_size=0, unique_id=None):
        from .loaders.comfyui.loading import load_diffusion_model

        return (load_diffusion_model(_path("diffusion_models", unet_name), weight_dtype,
                                     blocks_cuda_size,
                                     owner=("VBARDiffusionModelLoader", unique_id or id(self))),)


class VBARSetBudget:
    DESCRIPTION = ("Limits how much VRAM VBAR-loaded models may keep resident on the device this "
                   "model runs on: every VBAR model on that device, until the budget is set again. "
                   "Layers beyond the budget stream through a temporary copy.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.25,
                                    "tooltip": "0 = the whole card (this lifts a VBAR_BUDGET limit too). "
                                               "On a CPU-only ComfyUI, which has no card, 0 means "
                                               "the simulated card's default: VBAR_BUDGET, else 8 GB."}),
            "headroom_gb": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1024.0, "step": 0.25,
                                      "tooltip": "Taken off the budget (or the card), kept free for "
                                                  "activations and other programs."}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, budget_gb, headroom_gb):
        from .vram import get_pool

        pool = get_pool(str(model.load_device))
        if pool is None:
            raise RuntimeError(f"no VBAR allocator for {model.load_device}: see the log for why "
                               f"(e.g. cuda-python is not installed)")
        budget = int(budget_gb * (1 << 30)) or None
        if budget is None and pool.backend.capacity() is None:
            # 0 on a device without a capacity (CPU) means its default, as the tooltip says:
            # keeping the pool's current budget kept whatever an earlier run had set.
            import os

            from .vram import parse_bytes

            env = os.environ.get("VBAR_BUDGET")
            budget = parse_bytes(env) if env else 8 << 30
        pool.set_budget(budget, int(headroom_gb * (1 << 30)))
        log.info("VBAR budget on %s: %.2f GB usable", model.load_device, pool.budget() / 2**30)
        return (model,)


# --- VBAR VRAM Monitor -----------------------------------------------------------------------
from .monitor import ANY as _ANY  # noqa: E402 - the socket type is needed when the class is made


class VBARVRAMMonitor:
    DESCRIPTION = ("Shows the device's memory and, for every VBAR-loaded model, what is resident, "
                   "held, streamed, and how many bytes moved since this node last ran. Drop it "
                   "anywhere; wire any output through it to choose when it runs.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {},
                "optional": {"passthrough": (_ANY, {
                    "tooltip": "Anything: the monitor runs after it and passes it on unchanged."})},
                "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = (_ANY, "STRING", "IMAGE")
    RETURN_NAMES = ("passthrough", "report", "residency_map")
    OUTPUT_TOOLTIPS = ("The input, unchanged.", "The report as text.",
                       "One bar per model, one cell per layer: held, resident or streamed.")
    FUNCTION = "report"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")   # never cached: the numbers change on every run

    def report(self, passthrough=None, unique_id=None):
        from .monitor import run_monitor

        return run_monitor(passthrough, key=unique_id or "node")


# --- VBAR NF4 loaders (bitsandbytes NF4/FP4, Flux block pinning) ------------------------------
def _block_inputs(default=7, formats=("bf16", "nf4")):
    from .loaders.runtime.blocks import FLUX_DOUBLE_BLOCKS, FLUX_SINGLE_BLOCKS, block_size_text

    sizes = block_size_text(formats)
    tip = ("How many of the first {kind} blocks stay resident in VRAM for the whole run (pinned "
           "first, never evicted); every other layer faults in within the VRAM budget. 0 = none "
           "pinned. Flux has {n}. Per block: " + sizes + ".")
    return {
        "double_blocks_cuda_size": ("INT", {"default": default, "min": 0, "max": FLUX_DOUBLE_BLOCKS,
                                            "tooltip": tip.format(kind="double",
                                                                  n=FLUX_DOUBLE_BLOCKS)}),
        "single_blocks_cuda_size": ("INT", {"default": default, "min": 0, "max": FLUX_SINGLE_BLOCKS,
                                            "tooltip": tip.format(kind="single",
                                                                  n=FLUX_SINGLE_BLOCKS)}),
    }


def _first_blocks_input():
    # Optional, default 0: workflows saved before it existed load unchanged.
    return {"blocks_cuda_size": ("INT", {
        "default": 0, "min": 0, "max": 10000,
        "tooltip": "How many of the model's first blocks (in the order they run) stay resident "
                   "in VRAM for the whole run; every other layer faults in within the VRAM budget. "
                   "0 = none. Works for every family with repeated blocks (Flux/Chroma/HunyuanVideo "
                   "double then single blocks, HiDream, SD3, Qwen-Image, LTX-Video, Wan, SD1/SDXL "
                   "input then output blocks); a count above what the file has is refused when "
                   "the prompt is queued, naming the file's counts."})}


def _validate_blocks(folder, name, double, single, first=0):
    # Runs when the prompt is queued, before anything executes: a count above what the file
    # has is refused with the real counts instead of failing halfway through a run.
    import folder_paths

    from .loaders.comfyui.pins import validate_block_counts

    path = folder_paths.get_full_path(folder, name)
    if path is None:
        return f"Model in folder '{folder}' with filename '{name}' not found."
    return validate_block_counts(path, double, single, first)


class VBARNF4CheckpointLoader:
    DESCRIPTION = ("Loads a bitsandbytes NF4/FP4 checkpoint (Flux NF4 v1/v2 files) as MODEL, CLIP and "
                   "VAE. The 4-bit weights stay 4-bit in VRAM and are expanded per layer as it runs; "
                   "the first double/single Flux blocks can be pinned resident.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (_files("checkpoints"),
                                           {"tooltip": "A .safetensors NF4 checkpoint."}),
                             **_block_inputs()},
                "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, ckpt_name, double_blocks_cuda_size, single_blocks_cuda_size):
        return _validate_blocks("checkpoints", ckpt_name, double_blocks_cuda_size, single_blocks_cuda_size)

    def load(self, ckpt_name, double_blocks_cuda_size, single_blocks_cuda_size, unique_id=None):
        import folder_paths

        from .loaders.comfyui.nf4 import load_nf4_checkpoint

        return load_nf4_checkpoint(_path("checkpoints", ckpt_name), double_blocks_cuda_size,
                                   single_blocks_cuda_size,
                                   embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                   owner=("VBARNF4CheckpointLoader", unique_id or id(self)))


class VBARNF4DiffusionModelLoader:
    DESCRIPTION = ("Loads a diffusion model whose Linear weights are NF4 in VRAM: a bitsandbytes "
                   "NF4/FP4 file, or a bf16/fp16 one quantized on load. The first double/single Flux "
                   "blocks can be pinned resident; the rest fault in within the VRAM budget.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet_name": (_files("diffusion_models"),),
            **_block_inputs(),
            "quantize_on_load": ("BOOLEAN", {
                "default": True,
                "tooltip": "For a bf16/fp16 file: quantize every Linear weight of the diffusion model "
                           "to NF4 (bitsandbytes layout, blocksize 64) while loading; other weights "
                           "stay as they are. Ignored for files that are already 4-bit."}),
        }, "optional": _first_blocks_input(), "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, unet_name, double_blocks_cuda_size, single_blocks_cuda_size,
                        blocks_cuda_size=0):
        return _validate_blocks("diffusion_models", unet_name, double_blocks_cuda_size,
                                single_blocks_cuda_size, blocks_cuda_size)

    def load(self, unet_name, double_blocks_cuda_size, single_blocks_cuda_size, quantize_on_load,
             blocks_cuda_size=0, unique_id=None):
        from .loaders.comfyui.nf4 import load_nf4_diffusion_model

        return (load_nf4_diffusion_model(_path("diffusion_models", unet_name),
                                         double_blocks_cuda_size, single_blocks_cuda_size,
                                         quantize_on_load,
                                         owner=("VBARNF4DiffusionModelLoader", unique_id or id(self)),
                                         first_blocks=blocks_cuda_size),)


# --- VBAR GGUF loaders (quantized bytes in the VBAR, dequantized per use) ---------------------
GGUF_FOLDERS = {"diffusion_models": "vbar_unet_gguf", "text_encoders": "vbar_clip_gguf"}
_GGUF_DTYPES = ["default", "target", "float32", "float16", "bfloat16"]


def _gguf_files(folder):
    # A folder key of our own that shares the base key's path list (so folders added later,
    # e.g. by extra_model_paths.yaml, show up) but lists only .gguf files; ComfyUI's own keys
    # stay as they are, so stock loaders never list GGUF files they cannot read.
    import folder_paths

    key = GGUF_FOLDERS[folder]
    paths = folder_paths.folder_names_and_paths[folder][0]
    current = folder_paths.folder_names_and_paths.get(key)
    if current is None or current[0] is not paths:
        folder_paths.folder_names_and_paths[key] = (paths, {".gguf"})
    return folder_paths.get_filename_list(key)


def _clip_files():
    return sorted(set(_files("text_encoders")) | set(_gguf_files("text_encoders")))


def _clip_types(loader):
    import nodes as comfy_nodes   # ComfyUI's nodes module: its type lists, new types included

    return list(getattr(comfy_nodes, loader).INPUT_TYPES()["required"]["type"][0])


def _clip_options(device):
    if device != "cpu":
        return {}
    import torch

    return {"load_device": torch.device("cpu"), "offload_device": torch.device("cpu")}


class VBARGGUFDiffusionModelLoader:
    DESCRIPTION = ("Loads a GGUF diffusion model (Flux, SD1.x, SDXL, SD3 ...). The VRAM budget "
                   "holds the quantized bytes (Q8_0 to Q2_K: 2-6x smaller than bf16), so far more of "
                   "the model stays resident; each layer is dequantized on the device as it runs. "
                   "The first N blocks of any family (or Flux's first double/single blocks) can be "
                   "pinned resident.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet_name": (_gguf_files("diffusion_models"),
                          {"tooltip": ".gguf files in models/diffusion_models and models/unet."}),
            "dequant_dtype": (_GGUF_DTYPES, {
                "tooltip": "default: round to the dtype ComfyUI would keep this model's weights "
                           "in (same results as a stock load of the dequantized weights). "
                           "target: dequantize straight into the compute dtype. Otherwise: "
                           "dequantize in this dtype, then cast."}),
            "patch_dtype": (_GGUF_DTYPES, {
                "tooltip": "The dtype a LoRA-patched weight is kept in. default: the "
                           "dtype ComfyUI would store it in (the same result as a stock load); "
                           "target: the compute dtype; float32 is the most precise."}),
        },
            # Optional so that workflows saved before these inputs existed still load.
            "optional": {**_block_inputs(default=0, formats=("bf16", "q8_0", "q4_k")),
                         **_first_blocks_input()},
            "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, unet_name, double_blocks_cuda_size=0, single_blocks_cuda_size=0,
                        blocks_cuda_size=0):
        return _validate_blocks("diffusion_models", unet_name, double_blocks_cuda_size,
                                single_blocks_cuda_size, blocks_cuda_size)

    def load(self, unet_name, dequant_dtype="default", patch_dtype="default",
             double_blocks_cuda_size=0, single_blocks_cuda_size=0, blocks_cuda_size=0,
             unique_id=None):
        from .loaders.comfyui.gguf import load_gguf_diffusion_model

        return (load_gguf_diffusion_model(
            _path("diffusion_models", unet_name), dequant_dtype, patch_dtype,
            double_blocks_cuda_size, single_blocks_cuda_size,
            owner=("VBARGGUFDiffusionModelLoader", unique_id or id(self)),
            first_blocks=blocks_cuda_size),)


class VBARGGUFCLIPLoader:
    DESCRIPTION = ("Loads a text encoder from a .gguf (T5, CLIP, Qwen2/2.5-VL, Llama, Gemma) or "
                   ".safetensors file; the VRAM "
                   "budget holds the quantized bytes, dequantized per layer as it runs.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": (_clip_files(),),
                             "type": (_clip_types("CLIPLoader"),)},
                "optional": {"device": (["default", "cpu"], {"advanced": True})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, clip_name, type="stable_diffusion", device="default"):
        return _load_clip([clip_name], type, device)


class VBARGGUFDualCLIPLoader:
    DESCRIPTION = ("Loads two text encoders (e.g. Flux: CLIP-L + T5-XXL), each a .gguf or a "
                   ".safetensors file; quantized bytes stay quantized in the VRAM budget.")

    @classmethod
    def INPUT_TYPES(cls):
        files = _clip_files()
        return {"required": {"clip_name1": (files,), "clip_name2": (files,),
                             "type": (_clip_types("DualCLIPLoader"),)},
                "optional": {"device": (["default", "cpu"], {"advanced": True})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, clip_name1, clip_name2, type, device="default"):
        return _load_clip([clip_name1, clip_name2], type, device)


class _SeveralCLIPLoader:
    """N text-encoder files and no type: ComfyUI picks the model from the files, as its own
    Triple/QuadrupleCLIPLoader do."""
    COUNT = 0
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        files = _clip_files()
        return {"required": {f"clip_name{i}": (files,) for i in range(1, cls.COUNT + 1)},
                "optional": {"device": (["default", "cpu"], {"advanced": True})}}

    def load(self, device="default", **clip_names):   # ComfyUI passes inputs by name
        names = [clip_names[f"clip_name{i}"] for i in range(1, self.COUNT + 1)]
        return _load_clip(names, "stable_diffusion", device)


class VBARGGUFTripleCLIPLoader(_SeveralCLIPLoader):
    DESCRIPTION = ("Loads three text encoders (SD3 / SD3.5: CLIP-L, CLIP-G, T5-XXL), each a .gguf "
                   "or a .safetensors file; ComfyUI picks the model type from the three, as its "
                   "TripleCLIPLoader does.")
    COUNT = 3


class VBARGGUFQuadrupleCLIPLoader(_SeveralCLIPLoader):
    DESCRIPTION = ("Loads four text encoders (HiDream: CLIP-L, CLIP-G, T5-XXL, Llama 3.1 8B), each "
                   "a .gguf or a .safetensors file, as ComfyUI's QuadrupleCLIPLoader does.")
    COUNT = 4


def _load_clip(names, type, device):
    import folder_paths

    from .loaders.comfyui.gguf import load_text_encoders

    paths = [_path("text_encoders", n) for n in names]
    return (load_text_encoders(paths, type, folder_paths.get_folder_paths("embeddings"),
                               _clip_options(device)),)


NODE_CLASS_MAPPINGS = {
    "VBARCheckpointLoader": VBARCheckpointLoader,
    "VBARDiffusionModelLoader": VBARDiffusionModelLoader,
    "VBARSetBudget": VBARSetBudget,
    "VBARVRAMMonitor": VBARVRAMMonitor,
    "VBARNF4CheckpointLoader": VBARNF4CheckpointLoader,
    "VBARNF4DiffusionModelLoader": VBARNF4DiffusionModelLoader,
    "VBARGGUFDiffusionModelLoader": VBARGGUFDiffusionModelLoader,
    "VBARGGUFCLIPLoader": VBARGGUFCLIPLoader,
    "VBARGGUFDualCLIPLoader": VBARGGUFDualCLIPLoader,
    "VBARGGUFTripleCLIPLoader": VBARGGUFTripleCLIPLoader,
    "VBARGGUFQuadrupleCLIPLoader": VBARGGUFQuadrupleCLIPLoader,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "VBARCheckpointLoader": "VBAR Checkpoint Loader",
    "VBARDiffusionModelLoader": "VBAR Diffusion Model Loader",
    "VBARSetBudget": "VBAR Set Budget",
    "VBARVRAMMonitor": "VBAR VRAM Monitor",
    "VBARNF4CheckpointLoader": "VBAR NF4 Checkpoint Loader",
    "VBARNF4DiffusionModelLoader": "VBAR NF4 Diffusion Model Loader",
    "VBARGGUFDiffusionModelLoader": "VBAR GGUF Diffusion Model Loader",
    "VBARGGUFCLIPLoader": "VBAR GGUF CLIP Loader",
    "VBARGGUFDualCLIPLoader": "VBAR GGUF Dual CLIP Loader",
    "VBARGGUFTripleCLIPLoader": "VBAR GGUF Triple CLIP Loader",
    "VBARGGUFQuadrupleCLIPLoader": "VBAR GGUF Quadruple CLIP Loader",
}


# --- ComfyUI version floor --------------------------------------------------------------------
# The oldest ComfyUI the whole real-ComfyUI suite passes on (measured: 0.3.40, June 2025; also
# 0.3.64 and 0.33.0). On an older one the pack still loads, and every node says what it needs.
MIN_COMFYUI = (0, 3, 40)


def _version_tuple(text):
    """(major, minor, patch) from '0.3.41', '0.4', '0.3.41rc1'; None if it does not start so."""
    import re

    m = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(text))
    return tuple(int(g or 0) for g in m.groups()) if m else None


def comfyui_version():
    """The running ComfyUI's version string, or None outside ComfyUI (or before its
    comfyui_version module existed, which is older than the floor)."""
    try:
        import comfyui_version as v
    except ImportError:
        return None
    return getattr(v, "__version__", None)


def version_problem(version):
    """None if ``version`` meets the floor, else the message every node gives."""
    floor = ".".join(map(str, MIN_COMFYUI))
    got = _version_tuple(version) if version else None
    if got is not None and got >= MIN_COMFYUI:
        return None
    shown = version if version else "an unknown version older than 0.3"
    return (f"VBAR loaders need ComfyUI {floor} or newer; this is ComfyUI {shown}. "
            f"Update ComfyUI (e.g. git pull, or the Manager's 'Update ComfyUI').")


def _refusing(cls, message):
    """``cls`` as a node that shows ``message`` and refuses to run (never a traceback at load)."""
    def run(self, *args, **kwargs):
        raise RuntimeError(message)

    def input_types(klass):
        try:
            return cls.INPUT_TYPES()
        except Exception:  # noqa: BLE001 - an old ComfyUI may lack what the inputs list
            return {"required": {}}

    return type(cls.__name__, (cls,), {
        "DESCRIPTION": f"{message}\n\n{getattr(cls, 'DESCRIPTION', '')}",
        cls.FUNCTION: run, "INPUT_TYPES": classmethod(input_types), "__module__": __name__})


def guard_version(mappings, version):
    message = version_problem(version)
    if message is None:
        return mappings
    log.error(message)
    return {name: _refusing(cls, message) for name, cls in mappings.items()}


_running = comfyui_version()
if _running is not None or "comfy" in __import__("sys").modules:
    NODE_CLASS_MAPPINGS = guard_version(NODE_CLASS_MAPPINGS, _running)
