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

        from .loaders.comfy_loaders import load_checkpoint

        return load_checkpoint(_path("checkpoints", ckpt_name),
                               embedding_directory=folder_paths.get_folder_paths("embeddings"))


class VBARDiffusionModelLoader:
    DESCRIPTION = ("Loads a diffusion model (UNet/DiT) whose layers fault their weights into "
                   "VRAM on use, within the VRAM budget.")

    @classmethod
    def INPUT_TYPES(cls):
        from .loaders.comfy_loaders import WEIGHT_DTYPES

        return {"required": {
            "unet_name": (_files("diffusion_models"),),
            "weight_dtype": (list(WEIGHT_DTYPES), {
                "tooltip": "The dtype the VRAM copy holds. fp8 halves VRAM use; '_fast' computes "
                           "like plain fp8 here."}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, unet_name, weight_dtype):
        from .loaders.comfy_loaders import load_diffusion_model

        return (load_diffusion_model(_path("diffusion_models", unet_name), weight_dtype),)


class VBARSetBudget:
    DESCRIPTION = ("Limits how much VRAM VBAR-loaded models may keep resident on the device this "
                   "model runs on. Layers beyond the budget stream through a temporary copy.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.25,
                                    "tooltip": "0 = the whole device (on CPU: VBAR_BUDGET or 8 GB)."}),
            "headroom_gb": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1024.0, "step": 0.25,
                                      "tooltip": "Kept free for activations and other programs."}),
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
            budget = pool._budget
        pool.set_budget(budget, int(headroom_gb * (1 << 30)))
        log.info("VBAR budget on %s: %.2f GB usable", model.load_device, pool.budget() / 2**30)
        return (model,)


NODE_CLASS_MAPPINGS = {
    "VBARCheckpointLoader": VBARCheckpointLoader,
    "VBARDiffusionModelLoader": VBARDiffusionModelLoader,
    "VBARSetBudget": VBARSetBudget,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "VBARCheckpointLoader": "VBAR Checkpoint Loader",
    "VBARDiffusionModelLoader": "VBAR Diffusion Model Loader",
    "VBARSetBudget": "VBAR Set Budget",
}
