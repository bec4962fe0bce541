"""Run inside ComfyUI's interpreter (see test_comfyui_memory.py): the memory manager's view of
VBAR models. Prints one 'CHECK name ok' line per check; any failure raises."""
import os
import sys

comfy_dir, repo = sys.argv[1], sys.argv[2]
from comfy_boot import boot, check  # noqa: E402  (this script's folder is on sys.path)

boot(comfy_dir)

import comfy.model_management as mm  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
import torch  # noqa: E402

from vbar_loaders.loaders.comfyui.loading import load_checkpoint  # noqa: E402
from vbar_loaders.loaders.comfyui.patcher import dynamic_vram_active, stores_of  # noqa: E402
from vbar_loaders.vram import get_pool  # noqa: E402


ckpt = os.path.join(os.environ["COMFY_HARNESS_MODELS"], "checkpoints", "tiny_sd15.safetensors")
pool = get_pool("cpu", budget=8 << 30)
model, clip, vae = load_checkpoint(ckpt)
check("nothing resident after load", pool.stats()["resident_bytes"] == 0)
stores = stores_of(model)
check("model has one store", len(stores) == 1)
size = model.model_size()
weights = sum(h.nbytes for h in stores[0].handles)
check("model_size counts every weight in its device dtype", size >= weights, (size, weights))

cond = clip.encode_from_tokens_scheduled(clip.tokenize("a cube"))
lat = torch.zeros(1, 4, 8, 8)
comfy.sample.sample(model, comfy.sample.prepare_noise(lat, 1), 2, 7.0, "euler", "normal", cond,
                    cond, lat, seed=1, disable_pbar=True)
loaded = model.loaded_size()
check("loaded_size reports resident pages", 0 < loaded <= size, (loaded, size))
check("ComfyUI lists the model as loaded",
      any(lm.model is model for lm in mm.current_loaded_models))

freed = model.partially_unload(model.offload_device, 16 << 20)
check("partially_unload evicts and returns bytes freed", freed >= 16 << 20, freed)
check("loaded_size drops by what was freed", model.loaded_size() <= loaded - freed + (2 << 20))

clone = model.clone()
check("clones share the VBAR", stores_of(clone) == stores)
check("clone keeps the VBAR patcher class", type(clone) is type(model))

model.detach(unpatch_all=True)
check("detach gives every page back", stores[0].resident_bytes() == 0)

prio_before = [v.name for v in pool.vbars]
mm.load_models_gpu([model])
check("the model being loaded gets top priority", pool.vbars[0] is stores[0].vbar,
      (prio_before, [v.name for v in pool.vbars]))
check("dynamic VRAM is not active on this ComfyUI", dynamic_vram_active() is False)

del model, clone, clip, vae, cond
mm.unload_all_models()
import gc  # noqa: E402

gc.collect()
check("unloading and collecting returns every reservation",
      pool.stats()["reserved_bytes"] == 0, pool.stats()["reserved_bytes"])
print("ALL OK")
