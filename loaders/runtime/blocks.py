"""Block pinning: keep a diffusion model's first blocks resident, the rest fault.

Two ways to choose them: Flux's first N double / M single blocks (the nodes'
``double_blocks_cuda_size`` / ``single_blocks_cuda_size``), or, for every family with repeated
blocks, the first N of the model's blocks in forward order (``first``), where what a block is
comes from one table (``BLOCK_LISTS``).

A pinned block's weights are VBAR slots held for the model's lifetime (allocated first, never
evicted, no copy per step) and every other layer faults within the budget. What a block is, how many a file
has, which layers to hold, and holding/releasing a store's pins; when to do so over a model's
life in ComfyUI is comfyui/pins.py's business.
"""
import re

# Flux.1 as ComfyUI's detection builds it: hidden 3072, MLP ratio 4, 24 heads of 128.
FLUX_HIDDEN = 3072
FLUX_MLP_RATIO = 4
FLUX_HEAD_DIM = 128
FLUX_DOUBLE_BLOCKS = 19
FLUX_SINGLE_BLOCKS = 38
NF4_BLOCKSIZE = 64

_BLOCK = re.compile(r"(?:^|\.)(double|single)_blocks\.(\d+)(?:\.|$)")


def flux_block_linears(hidden=FLUX_HIDDEN, mlp_ratio=FLUX_MLP_RATIO):
    """(out_features, in_features) of every Linear in one double and one single block."""
    h, mlp = hidden, int(hidden * mlp_ratio)
    stream = [(6 * h, h), (3 * h, h), (h, h), (mlp, h), (h, mlp)]   # mod.lin, qkv, proj, mlp.0, mlp.2
    return {"double": stream * 2,                                     # img_* and txt_*
            "single": [(3 * h + mlp, h), (h, h + mlp), (3 * h, h)]}  # linear1, linear2, modulation


def flux_block_bytes(hidden=FLUX_HIDDEN, mlp_ratio=FLUX_MLP_RATIO, head_dim=FLUX_HEAD_DIM):
    """Bytes one block occupies: {"double"|"single": {"bf16" | "nf4" | "q8_0" | "q4_k": n}}.

    NF4 is the bitsandbytes layout quantize-on-load writes (v2: fp32 absmax per 64 values);
    biases and QK-norm scales stay bf16 there. The GGUF types are as city96's converter writes
    them: weights in 34-byte blocks of 32 (Q8_0) or 144-byte blocks of 256 (Q4_K), 1-D tensors
    float32.
    """
    out = {}
    for kind, linears in flux_block_linears(hidden, mlp_ratio).items():
        weights = sum(o * i for o, i in linears)
        others = sum(o for o, _ in linears) + (4 if kind == "double" else 2) * head_dim
        out[kind] = {"bf16": 2 * (weights + others),
                     "nf4": weights // 2 + 4 * sum(-(-o * i // NF4_BLOCKSIZE) for o, i in linears)
                     + 2 * others,
                     "q8_0": weights // 32 * 34 + 4 * others,
                     "q4_k": weights // 256 * 144 + 4 * others}
    return out


_LABELS = {"bf16": "bf16", "nf4": "NF4", "q8_0": "Q8_0", "q4_k": "Q4_K"}


def block_size_text(formats=("bf16", "nf4")):
    """'double block: 648 MiB bf16 / 182 MiB NF4; single block: ...' for node tooltips."""
    b = flux_block_bytes()
    return "; ".join(f"{k} block: " + " / ".join(f"{b[k][f] / 2**20:.0f} MiB {_LABELS[f]}" for f in formats)
                     for k in ("double", "single"))


def _counts(indices):
    # Like ComfyUI's count_blocks: blocks 0, 1, 2... up to the first gap.
    n = 0
    while n in indices:
        n += 1
    return n


def count_blocks(names):
    """(double, single) Flux blocks among state-dict keys or module names."""
    found = {"double": set(), "single": set()}
    for name in names:
        m = _BLOCK.search(name)
        if m:
            found[m.group(1)].add(int(m.group(2)))
    return _counts(found["double"]), _counts(found["single"])


def check_block_counts(double, single, have_double, have_single, what="the model"):
    """Raise ValueError, naming the real counts, unless 0 <= double/single <= what the model has."""
    if not (0 <= double <= have_double and 0 <= single <= have_single):
        raise ValueError(
            f"{what} has {have_double} double and {have_single} single blocks, so "
            f"double_blocks_cuda_size can be 0..{have_double} and single_blocks_cuda_size "
            f"0..{have_single}; got {double} and {single}")


# What a block is, per family: the diffusion model's top-level lists of repeated blocks, in the
# order the forward pass runs them. The first row with any list present in the file applies.
BLOCK_LISTS = (
    ("double_blocks", "single_blocks"),                 # Flux, Chroma, HunyuanVideo
    ("double_stream_blocks", "single_stream_blocks"),   # HiDream
    ("joint_blocks",),                                  # SD3 / SD3.5 (ComfyUI's MMDiT)
    ("transformer_blocks",),                            # Qwen-Image, LTX-Video
    ("blocks",),                                        # Wan 2.x, Cosmos
    ("input_blocks", "output_blocks"),                  # SD1.x / SDXL UNets (middle_block: one)
)
_TOP = re.compile(r"^(?:model\.)?(?:diffusion_model\.)?([a-z_]+)\.(\d+)(?:\.|$)")


def block_lists(names):
    """[(list name, count)] of the model's repeated blocks in forward order (empty if none), from
    state-dict keys (bare or under model.diffusion_model.) or the diffusion model's module names.
    Counts are ComfyUI's: blocks 0, 1, 2 ... up to the first gap."""
    found = {}
    for name in names:
        m = _TOP.match(name)
        if m:
            found.setdefault(m.group(1), set()).add(int(m.group(2)))
    for row in BLOCK_LISTS:
        if any(found.get(k) for k in row):
            return [(k, _counts(found.get(k, ()))) for k in row]
    return []


def describe_blocks(lists):
    if not lists:
        return "no repeated blocks"
    return (f"{sum(n for _, n in lists)} repeated blocks ("
            + ", ".join(f"{k}: {n}" for k, n in lists) + ")")


def check_first_blocks(first, lists, what="the model"):
    """Raise ValueError, naming the file's blocks, unless 0 <= first <= their total."""
    total = sum(n for _, n in lists)
    if not 0 <= first <= total:
        raise ValueError(f"{what} has {describe_blocks(lists)}, so blocks_cuda_size can be "
                         f"0..{total}; got {first}")


def check_pins(names, double=0, single=0, first=0, what="the model"):
    """Validate the pinning inputs against a file's keys (or a model's module names)."""
    names = list(names)
    if first and (double or single):
        raise ValueError(f"{what}: set either blocks_cuda_size ({first}) or the Flux "
                         f"double/single_blocks_cuda_size ({double}/{single}), not both")
    if double or single:
        check_block_counts(double, single, *count_blocks(names), what)
    check_first_blocks(first, block_lists(names), what)


def first_blocks(lists, first):
    """{list name: how many of its blocks are among the first ``first`` in forward order}."""
    out = {}
    for k, n in lists:
        out[k] = min(n, first)
        first -= out[k]
    return out


def pin_blocks(model, double, single, what="the model", first=0):
    """Mark every layer of the blocks chosen (Flux's first ``double`` double and ``single``
    single blocks, or the first ``first`` blocks in forward order) of ``model``, a diffusion
    model, to be held resident by ``vbarize``. Returns the number of modules marked."""
    named = list(model.named_modules())
    check_pins([n for n, _ in named], double, single, first, what)
    if first:
        pattern, limit = _TOP.match, first_blocks(block_lists(n for n, _ in named), first)
    else:
        pattern, limit = _BLOCK.search, {"double": double, "single": single}

    def chosen(name):
        hit = pattern(name)
        return hit is not None and int(hit.group(2)) < limit.get(hit.group(1), 0)

    pinned = 0
    for name, m in named:
        if chosen(name):
            m.vbar_hold = True
            pinned += 1
    return pinned


# --- pins over a model's life ------------------------------------------------------------------
def release_pins(store, free=True):
    """Let the held slots of ``store`` be evicted again (and, with ``free``, evict them now)."""
    v = store.vbar
    if v is None or v.closed:
        return
    for h in store.handles:
        if h.held and h.slot is not None and h.slot.held:   # released already: nothing to drop
            v.release(h.slot)
    if free:
        store.free_memory()


def restore_pins(store):
    """Hold ``store``'s pinned slots again (after release_pins), unless the store was retired.

    Raises vram.BudgetExceeded naming the MiB if they no longer fit."""
    v = store.vbar
    if v is None or v.closed or getattr(store, "vbar_pins_retired", False):
        return
    held = [h for h in store.handles if h.held and h.slot is not None]
    try:
        for h in held:
            if not h.slot.held:      # ComfyUI loads a model that is loaded already: keep its hold
                v.hold(h.slot)
    except Exception as e:
        release_pins(store, free=False)
        raise store.pins_do_not_fit(e) from e
