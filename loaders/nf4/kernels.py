"""Device-agnostic torch kernels for bitsandbytes' 4-bit (nf4/fp4) and nested 8-bit formats.

Every rounding step mirrors bitsandbytes 0.50 on CPU, so results are bit-identical to
``dequantize_4bit`` / ``quantize_4bit`` there (see tests/test_nf4.py).
"""
import torch

from ..device_ops import mixed_dtype_ops_fuse

QUANT_TYPES = ("nf4", "fp4")
# bitsandbytes.functional.quantize_4bit / dequantize_4bit refuse anything else.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # quantize_4bit(compress_statistics=True) hardcodes it

# Same literals as bitsandbytes.functional.get_4bit_type; fp32 rounding happens in torch.tensor.
_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
# fp4 is sign + 2-bit exponent + 1-bit mantissa, listed in bit-pattern order, scaled by 1/12.
_FP4 = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]
# torch.argsort(fp4 code) as bitsandbytes computes it on CPU: ties (+0 / -0) resolved 0 before 8.
# Hardcoded so quantizing on another device cannot resolve the tie differently.
_FP4_ORDER = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3]

_cache = {}


def code_table(quant_type, device="cpu"):
    """The 16 fp32 values a 4-bit code stands for (before scaling by absmax)."""
    key = ("code", quant_type, str(device))
    if key not in _cache:
        if quant_type == "nf4":
            t = torch.tensor(_NF4, dtype=torch.float32)
        elif quant_type == "fp4":
            t = torch.tensor(_FP4, dtype=torch.float32) / 12.0
        else:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
        _cache[key] = t.to(device)
    return _cache[key]


def _pair_table(quant_type, device):
    # One gather per packed byte instead of two: entry b holds (code[b >> 4], code[b & 15])
    # as one 8-byte word. The int64 is only a carrier for two fp32 bit patterns.
    key = ("pair", quant_type, str(device))
    if key not in _cache:
        code = code_table(quant_type)
        b = torch.arange(256)
        pairs = torch.stack([code[b >> 4], code[b & 15]], 1).contiguous()
        _cache[key] = pairs.view(torch.int64).reshape(256).to(device)
    return _cache[key]


def dynamic_map():
    """bitsandbytes.functional.create_dynamic_map(): the 256-entry code of nested absmax."""
    if "dynamic" not in _cache:
        data = []
        # signed=True, max_exponent_bits=7, total_bits=8, so no "additional_items" region.
        for i in range(7):
            boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
            means = (boundaries[:-1] + boundaries[1:]) / 2.0
            data += ((10 ** (-6 + i)) * means).tolist()
            data += (-(10 ** (-6 + i)) * means).tolist()
        data += [0, 1.0]
        data.sort()
        _cache["dynamic"] = torch.tensor(data, dtype=torch.float32)
    return _cache["dynamic"]


def default_chunk(device):
    # CPU: ~1 MiB of fp32 per step stays in L2. Accelerators: bound the transient index +
    # gather buffers (6 bytes per output element) to ~24 MiB, small next to any weight.
    return 1 << 18 if torch.device(device).type == "cpu" else 1 << 22


def dequantize_4bit(packed, absmax, quant_type, numel, blocksize, dtype, out=None, chunk=None):
    """Flat dequant: ``out[i] = code[nibble(i)] * absmax[i // blocksize]`` in fp32, then cast.

    ``packed``: flat uint8, element 2k in the high nibble. ``absmax``: fp32 per block.
    Works block-wise on the flat index, like bitsandbytes' scalar and CUDA kernels.
    """
    device = packed.device
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=device)
    flat = out.view(-1)
    table = _pair_table(quant_type, device)
    split = not mixed_dtype_ops_fuse(torch.device(device))
    full_blocks = numel // blocksize
    step = max(1, (chunk or default_chunk(device)) // blocksize) * blocksize
    nbytes = min(step, full_blocks * blocksize) // 2
    if nbytes:
        # int32 indices: a quarter of the traffic int64 would cost.
        idx = torch.empty(nbytes, dtype=torch.int32, device=device)
        gathered = torch.empty(nbytes, dtype=torch.int64, device=device)
    for start in range(0, full_blocks * blocksize, step):
        stop = min(start + step, full_blocks * blocksize)
        m = (stop - start) // 2
        idx[:m].copy_(packed[start // 2: stop // 2])
        torch.index_select(table, 0, idx[:m], out=gathered[:m])
        vals = gathered[:m].view(torch.float32).view(-1, blocksize)
        scale = absmax[start // blocksize: stop // blocksize, None]
        dst = flat[start:stop].view(-1, blocksize)
        # Multiply in fp32 and round once into the output dtype, as bnb does. On CPU a
        # mixed-dtype op copies through a temporary: scaling in place, then one cast, is faster.
        if split and dst.dtype != torch.float32:
            dst.copy_(vals.mul_(scale))
        else:
            torch.mul(vals, scale, out=dst)
    rem = numel - full_blocks * blocksize
    if rem:
        tail = packed[full_blocks * blocksize // 2:].to(torch.int32)
        vals = table.index_select(0, tail).view(torch.float32)[:rem]
        flat[numel - rem:] = vals * absmax[full_blocks]
    return out


def dequantize_blockwise_8bit(codes, absmax, code, blocksize):
    """bitsandbytes.functional.dequantize_blockwise in fp32: ``code[q] * absmax[i // bs]``."""
    vals = code.index_select(0, codes.reshape(-1).to(torch.int32))   # a fresh tensor: scale in place
    n = vals.numel()
    full = n // blocksize * blocksize
    vals[:full].view(-1, blocksize).mul_(absmax[: full // blocksize, None])
    if full < n:
        vals[full:].mul_(absmax[full // blocksize])
    return vals


def _bounds(quant_type, device):
    key = ("bounds", quant_type, str(device))
    if key not in _cache:
        code = code_table(quant_type)
        order = torch.tensor(_FP4_ORDER) if quant_type == "fp4" else torch.arange(16)
        mid = (code[order[:-1]] + code[order[1:]]) / 2
        _cache[key] = (mid.to(device), order.to(torch.uint8).to(device))
    return _cache[key]


def quantize_4bit(weight, blocksize, quant_type, chunk=1 << 22):
    """Mirror of bitsandbytes' torch ``quantize_4bit`` kernel (the one its CPU path runs).

    Returns (packed uint8 of (numel + 1) // 2 bytes, fp32 absmax per block).
    """
    flat = weight.reshape(-1)
    n = flat.numel()
    full = n // blocksize * blocksize
    bounds, order = _bounds(quant_type, flat.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=flat.device)
    codes = torch.empty(n + (n & 1), dtype=torch.uint8, device=flat.device)
    step = max(1, chunk // blocksize) * blocksize
    for start in range(0, full, step):
        stop = min(start + step, full)
        blk = flat[start:stop].float().view(-1, blocksize)
        am = blk.abs().amax(dim=1)
        absmax[start // blocksize: stop // blocksize] = am
        # Reciprocal then multiply (not divide), and clamp: both as bnb does.
        scaled = torch.clamp(blk * (1.0 / am.clamp(min=1e-38)[:, None]), -1, 1)
        codes[start:stop] = torch.bucketize(scaled.view(-1), bounds, out_int32=True).to(torch.uint8)
    if full < n:
        tail = flat[full:].float()
        # bnb divides here, and stores the clamped absmax for the tail block only.
        am = tail.abs().max().clamp(min=1e-38)
        absmax[-1] = am
        scaled = torch.clamp(tail / am, -1, 1)
        codes[full:n] = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
    if n & 1:
        codes[n] = torch.bucketize(torch.zeros(1, device=flat.device), bounds, out_int32=True)[0]
    if quant_type == "fp4":
        codes = order[codes.to(torch.int32)]
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, absmax


def quantize_blockwise_8bit(x, blocksize=NESTED_BLOCKSIZE):
    """Mirror of bitsandbytes' native CPU ``quantize_blockwise`` with the dynamic map.

    bnb snaps each scaled value to one of 65536 grid points and looks the grid point's
    nearest code up in a table, rather than searching the code itself; reproduced here.
    Returns (uint8 codes, fp32 absmax per block).
    """
    code = dynamic_map().to(x.device)
    grid = torch.arange(65536, dtype=torch.float32, device=x.device)
    grid = -1.0 + (2.0 * grid) / 65535.0
    mid = 0.5 * (code[:-1] + code[1:])
    lut = torch.searchsorted(mid, grid, side="left").to(torch.uint8)

    flat = x.reshape(-1).float()
    n = flat.numel()
    nblocks = -(-n // blocksize)
    padded = torch.zeros(nblocks * blocksize, dtype=torch.float32, device=x.device)
    padded[:n] = flat
    blk = padded.view(nblocks, blocksize)
    absmax = blk.abs().amax(dim=1)  # zero padding cannot raise a block's max
    inv = 1.0 / absmax
    t = torch.clamp(blk * inv[:, None], -1.0, 1.0)
    # (t + 1) * 0.5 * 65535 + 0.5, truncated; fused or unfused multiply-add round alike here.
    g = (((t + 1.0) * 0.5) * 65535.0 + 0.5).to(torch.int32)
    q = lut[g.clamp(0, 65535)]
    q[absmax == 0] = 0
    return q.reshape(-1)[:n].contiguous(), absmax
