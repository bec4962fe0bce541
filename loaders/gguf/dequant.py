"""GGUF block dequantization in plain torch, for any device.

Layouts and arithmetic follow ``gguf.quants`` (llama.cpp's reference) operation for
operation in float32, so a float32 result is bit-identical to the reference and a
half-precision result is the reference rounded once.

Why the code is shaped this way (measured on CPU, where eager torch is weakest):
* Every torch op costs microseconds however small, and a strided op pays again per row
  when its rows are short (< 32 values). So block headers (scales) are unpacked with
  1-D column ops for several chunks at once, and quants in long runs (nibble "planes"
  over whole rows) that one ``cat`` puts in output order.
* Bit fields are unpacked on int16/int32 views, several quants per lane; offsets such
  as ``q - 8`` are applied to the packed bytes (uint8 wrap-around read back as int8).
* float32 is exact and, on CPU, no slower than half arithmetic (torch widens bf16 to
  float32 internally). On CPU each chunk is widened to float32, scaled in place and ends
  with one float32 -> output dtype copy: a CPU op whose operands or output differ in dtype
  makes temporary copies (measured: int8 * float32 -> bf16 in one call is 7x slower).
  On CUDA, elementwise kernels convert in registers, so the widening and the final copy
  fold into the scaling ops: Q8_0 becomes one kernel from the raw blocks.
* On CPU the quants are processed in chunks that stay in L2 (each of torch's intra-op
  threads gets a cache-sized share of every op); elsewhere chunks are large and only bound the
  scratch memory. Splitting a tensor between Python worker threads instead was measured
  1.3-1.9x slower on an idle 2-core box: every op hands the GIL over, and each handover waits
  for a thread wake-up.
"""
import functools
import math

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from ..device_ops import mixed_dtype_ops_fuse
from ..errors import GGUFError

U8, I8, I16, I32, F16, F32 = torch.uint8, torch.int8, torch.int16, torch.int32, torch.float16, torch.float32
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# llama.cpp's non-linear 4-bit codebook shared by IQ4_NL and IQ4_XS.
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# Output values per chunk and thread on CPU. Every op on a chunk is one parallel region whose
# threads must all be scheduled before it ends; on a busy CPU each region costs a time slice.
# Measured 2026-12-07, tiny Flux Q8_0 forward in ComfyUI 0.33 on a 2-core box at load ~11:
# 1 << 18 (3129 regions a forward) took 26-45 s against ComfyUI-GGUF's 12-19 s in the same
# process; 1 << 22, 16-19 s against 15-22 s; with one thread (no regions to wait for) 8-11 s
# against 10-12 s. Larger chunks cost little cache locality. A chunk is this many values times
# the thread count (8 M on 2 threads: ~40 MiB of scratch), never more than the weight itself.
_CPU_CHUNK = 1 << 22
_DEV_CHUNK = 1 << 23   # elsewhere: few launches, scratch bounded to ~50 MiB
# Headers are unpacked for this many chunks at once: few enough ops per value, and the
# blocks are still in cache when the chunk bodies read their quants.
_PREP_CHUNKS = 8


class UnsupportedQuantType(GGUFError):
    pass


@functools.lru_cache(maxsize=None)
def _const(device, dtype, values, shape):
    return torch.tensor(values, dtype=dtype, device=device).view(shape)


@functools.lru_cache(maxsize=None)
def _iq4_pairs(device):
    """int64 table: index lo | hi << 8 of two nibbles -> their two float32 codebook values.

    Looking up nibble pairs halves the gather count and writes float32 directly."""
    k = torch.tensor(IQ4_VALUES, dtype=F32).view(I32).to(torch.int64) & 0xFFFFFFFF
    lo, hi = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    table = torch.zeros(0x0F10, dtype=torch.int64)
    table[lo + (hi << 8)] = k[lo] | (k[hi] << 32)
    return table.to(device)


# ---- headers, per super-chunk of blocks: per-block tensors with blocks first ----
# Row-major on purpose: strided 1-D column ops over the header bytes are cheap, whereas
# transposing headers (or re-reading them in several passes) costs more than it saves.

def _f16(b, start):
    """fp16 field at byte ``start`` of each block, widened: (n, 1) float32."""
    return b[:, start:start + 2].view(F16).float()


def _pre_d(b):
    return (_f16(b, 0),)


def _pre_dm(b):
    return _f16(b, 0), _f16(b, 2)


def _pre_q5_0(b):
    # 22-byte blocks leave qh unaligned: assemble it from its two int16 halves.
    w = b.view(I16)
    qh = (w[:, 1].to(I32) & 0xFFFF) | (w[:, 2].to(I32) << 16)
    return _f16(b, 0), qh


def _pre_q5_1(b):
    return _f16(b, 0), _f16(b, 2), b[:, 4:8].view(I32).view(-1).contiguous()


def _pre_q2_k(b):
    sc = b[:, :16].contiguous()
    dl = (sc & 0xF).float().mul_(_f16(b, 80))
    ml = (sc >> 4).float().mul_(_f16(b, 82).neg_())  # negated: the bodies add it
    return dl, ml


def _pre_q3_k(b):
    n = b.shape[0]
    h = torch.empty(n, 12, dtype=U8, device=b.device)
    h.copy_(b[:, 96:108])  # 110-byte blocks: realign the scales to read them as int32
    w = h.view(I32)  # w0, w1: low nibbles of the 16 scales; w2: their top 2 bits
    sc = torch.empty(n, 4, dtype=I32, device=b.device)
    # scales 4k..4k+3: low nibbles from w[k % 2] (high nibbles when k >= 2), top bits at 2k
    for k in range(4):
        lo = w[:, k % 2] if k < 2 else w[:, k % 2] >> 4
        hi = w[:, 2] << (4 - 2 * k) if k < 2 else w[:, 2] >> (2 * k - 4)
        torch.bitwise_or(lo & 0x0F0F0F0F, hi & 0x30303030, out=sc[:, k])
    return (sc.view(U8).view(n, 16).float().sub_(32).mul_(_f16(b, 108)),)


def _pre_k(b):
    """Q4_K/Q5_K: 8 scales and 8 mins of 6 bits -> (n, 2, 8) float32 d*scale, -dmin*min.

    Bytes 4..15: j < 4 in the low 6 bits of bytes 4+j (scales) and 8+j (mins); j >= 4 as
    the nibbles of byte 8+j plus the top 2 bits of bytes j and 4+j."""
    n = b.shape[0]
    w = b[:, 4:16].view(I32)
    sm = torch.empty(n, 4, dtype=I32, device=b.device)
    torch.bitwise_and(w[:, 0], 0x3F3F3F3F, out=sm[:, 0])
    torch.bitwise_and(w[:, 1], 0x3F3F3F3F, out=sm[:, 2])
    torch.bitwise_or(w[:, 2] & 0x0F0F0F0F, (w[:, 0] >> 2) & 0x30303030, out=sm[:, 1])
    torch.bitwise_or((w[:, 2] >> 4) & 0x0F0F0F0F, (w[:, 1] >> 2) & 0x30303030, out=sm[:, 3])
    dd = torch.empty(n, 2, 1, dtype=F32, device=b.device)
    dd[:, 0, 0].copy_(b.view(F16)[:, 0])  # two long strided copies beat one of short rows
    dd[:, 1, 0].copy_(b.view(F16)[:, 1]).neg_()  # x - m is exactly x + (-m): bodies add it
    return (sm.view(U8).view(n, 2, 8).float().mul_(dd),)


def _pre_q6_k(b):
    return (b[:, 192:208].view(I8).float().mul_(_f16(b, 208)),)


def _pre_iq4_xs(b):
    n, dev = b.shape[0], b.device
    # 8 scales, 6 bits, minus 32: nibble j % 2 of byte 4 + j // 2, top 2 bits at bit 2j of
    # the uint16 at byte 2.
    lo = (b[:, 4:8].unsqueeze(-1) >> _const(dev, U8, (0, 4), (2,))) & 0xF
    hi = (b[:, 2:4].view(I16) >> _const(dev, I16, tuple(range(0, 16, 2)), (8,))) & 3
    sc = lo.view(n, 8).to(I16) | (hi << 4)
    return (sc.float().sub_(32).mul_(_f16(b, 0)),)


# ---- per-chunk bodies: b (n, ts) uint8 blocks, flat = b as 1-D, pre = header slices,
# ---- buf(name, numel, dtype) = reusable scratch. Each returns (q, scale, bias): quants
# ---- in output order (integer or float32) and the float32 terms of q * scale + bias.

def _planes(src, out):
    """Low nibbles into out[0], high nibbles into out[1] (uint8 shifts need no mask)."""
    torch.bitwise_and(src, 0xF, out=out[0])
    torch.bitwise_right_shift(src, 4, out=out[1])
    return out


def _in_order(lh, off, out, groups=1):
    """Planes -> output order: per group of each block, its low nibbles then its high ones."""
    lo, hi = lh[0, :, off:], lh[1, :, off:]
    n = lo.shape[0]
    torch.cat((lo.reshape(n, groups, -1), hi.reshape(n, groups, -1)), dim=2, out=out.view(n, groups, -1))
    return out


def _legacy_quants(flat, n, ts, buf, offset=0):
    """Legacy/IQ4_NL blocks -> quant bytes in output order (16 low nibbles, 16 high).

    ``cat`` moves bytes here: widening to float32 inside it costs more than a separate,
    contiguous uint8 -> float32 pass."""
    lh = _planes(flat, buf("planes", 2 * n * ts, U8).view(2, n * ts)).view(2, n, ts)
    u = _in_order(lh, ts - 16, buf("u", n * 32, U8).view(n, 32))
    if offset:
        u -= offset  # uint8 wrap-around: read as int8 this is q - offset
    return u


def _q8_0(b, flat, pre, buf):
    return b[:, 2:].view(I8), pre[0], None


def _q4_0(b, flat, pre, buf):
    return _legacy_quants(flat, b.shape[0], 18, buf, offset=8).view(I8), pre[0], None


def _q4_1(b, flat, pre, buf):
    return _legacy_quants(flat, b.shape[0], 20, buf), pre[0], pre[1]


def _q5(flat, n, ts, qh, offset, buf):
    u = _legacy_quants(flat, n, ts, buf)
    # OR bit j of qh into bit 4 of quant byte j. Computed transposed (8 x n, long rows); a
    # nibble times 0x02040810 drops its bit k at bit 4 of byte k without carries.
    ht = buf("bits", 8 * n, I32).view(8, n)
    torch.bitwise_right_shift(qh.view(1, n), _const(qh.device, I32, tuple(range(0, 32, 4)), (8, 1)), out=ht)
    ht &= 0xF
    ht *= 0x02040810
    ht &= 0x10101010
    u.view(I32).bitwise_or_(ht.t())
    if offset:
        u -= offset
    return u.view(I8)


def _q5_0(b, flat, pre, buf):
    return _q5(flat, b.shape[0], 22, pre[1], 16, buf), pre[0], None


def _q5_1(b, flat, pre, buf):
    return _q5(flat, b.shape[0], 24, pre[2], 0, buf), pre[0], pre[1]


def _iq4_lookup(u, buf):
    """Nibble bytes -> float32 codebook values, two at a time."""
    idx = buf("idx", u.numel() // 2, I32)
    idx.copy_(u.view(I16).view(-1))
    f = buf("f", u.numel(), F32)
    torch.index_select(_iq4_pairs(u.device), 0, idx, out=f.view(torch.int64))
    return f


def _iq4_nl(b, flat, pre, buf):
    u = _legacy_quants(flat, b.shape[0], 18, buf)
    return _iq4_lookup(u, buf).view(u.shape), pre[0], None


def _iq4_xs(b, flat, pre, buf):
    n = b.shape[0]
    lh = _planes(b[:, 8:], buf("planes", 2 * n * 128, U8).view(2, n, 128))
    # quant 32j + 16a + i is nibble a of qs[16j + i]
    u = _in_order(lh, 0, buf("u", n * 256, U8).view(n, 256), groups=8)
    return _iq4_lookup(u, buf).view(n, 8, 32), pre[0].unsqueeze(-1), None


def _q2_k(b, flat, pre, buf):
    n = b.shape[0]
    # quant 128g + 32s + i is bits 2s..2s+1 of qs[32g + i]
    u = buf("u", n * 256, U8)
    q = u.view(I32).view(n, 2, 4, 8)
    torch.bitwise_right_shift(b[:, 16:80].view(I32).view(n, 2, 1, 8),
                              _const(b.device, I32, (0, 2, 4, 6), (4, 1)), out=q)
    q &= 0x03030303
    return u.view(n, 16, 16), pre[0].unsqueeze(-1), pre[1].unsqueeze(-1)


def _q3_k(b, flat, pre, buf):
    n, dev = b.shape[0], b.device
    # 110-byte blocks: copy hmask + qs to an aligned buffer so they can be read as int32.
    hq = buf("hq", n * 96, U8).view(n, 96).copy_(b[:, :96]).view(I32)
    u = buf("u", n * 256, U8)
    q = u.view(I32).view(n, 2, 4, 8)  # quant 128g + 32s + i: bits 2s of qs[32g + i]
    torch.bitwise_right_shift(hq[:, 8:].view(n, 2, 1, 8), _const(dev, I32, (0, 2, 4, 6), (4, 1)), out=q)
    q &= 0x03030303
    # bit j of hmask[i] belongs to quant 32j + i: move it to bit 2 of that byte
    hm = hq[:, :8].view(n, 1, 8)
    h = buf("bits", n * 64, I32).view(n, 8, 8)
    torch.bitwise_left_shift(hm, _const(dev, I32, (2, 1), (2, 1)), out=h[:, :2])
    torch.bitwise_right_shift(hm, _const(dev, I32, tuple(range(6)), (6, 1)), out=h[:, 2:])
    h &= 0x04040404
    q.view(n, 64).bitwise_or_(h.view(n, 64))
    u -= 4
    return u.view(I8).view(n, 16, 16), pre[0].unsqueeze(-1), None


def _k_terms(q, pre):
    sm = pre[0]
    return q, sm[:, 0].unsqueeze(-1), sm[:, 1].unsqueeze(-1)


def _q4_k(b, flat, pre, buf):
    # quant 64g + 32a + i is nibble a of qs[32g + i]
    n = b.shape[0]
    lh = _planes(b[:, 16:], buf("planes", 2 * n * 128, U8).view(2, n, 128))
    x = _in_order(lh, 0, buf("f", n * 256, F32).view(n, 256), groups=4)
    return _k_terms(x.view(n, 8, 32), pre)


def _q5_k(b, flat, pre, buf):
    n, dev = b.shape[0], b.device
    lh = _planes(b[:, 48:], buf("planes", 2 * n * 128, U8).view(2, n, 128))
    u = _in_order(lh, 0, buf("u", n * 256, U8).view(n, 256), groups=4)
    # bit j of qh[i] belongs to quant 32j + i: move it to bit 4 of that byte
    qh = b[:, 16:48].view(I32).view(n, 1, 8)
    h = buf("bits", n * 64, I32).view(n, 8, 8)
    torch.bitwise_left_shift(qh, _const(dev, I32, (4, 3, 2, 1), (4, 1)), out=h[:, :4])
    torch.bitwise_right_shift(qh, _const(dev, I32, (0, 1, 2, 3), (4, 1)), out=h[:, 4:])
    h &= 0x10101010
    u.view(I32).view(n, 64).bitwise_or_(h.view(n, 64))
    return _k_terms(u.view(n, 8, 32), pre)


def _q6_k(b, flat, pre, buf):
    n, dev = b.shape[0], b.device
    # low 4 bits: quant 128g + 64a + c is nibble a of ql[64g + c]
    lh = _planes(b[:, :128], buf("planes", 2 * n * 128, U8).view(2, n, 128))
    u = _in_order(lh, 0, buf("u", n * 256, U8).view(n, 256), groups=2)
    # high 2 bits: quant 128g + 32s + i is bits 2s..2s+1 of qh[32g + i]; move them to bits 4-5
    qh = b[:, 128:192].view(I16).view(n, 2, 1, 16)
    h = buf("bits", n * 128, I16).view(n, 2, 4, 16)
    torch.bitwise_left_shift(qh, _const(dev, I16, (4, 2, 0), (3, 1)), out=h[:, :, :3])
    torch.bitwise_right_shift(qh, 2, out=h[:, :, 3:])
    h &= 0x3030
    u.view(I16).view(n, 128).bitwise_or_(h.view(n, 128))
    u -= 32
    return u.view(I8).view(n, 16, 16), pre[0].unsqueeze(-1), None


_KERNELS = {  # type -> (header unpacker, chunk body)
    QT.Q8_0: (_pre_d, _q8_0), QT.Q4_0: (_pre_d, _q4_0), QT.Q4_1: (_pre_dm, _q4_1),
    QT.Q5_0: (_pre_q5_0, _q5_0), QT.Q5_1: (_pre_q5_1, _q5_1),
    QT.Q2_K: (_pre_q2_k, _q2_k), QT.Q3_K: (_pre_q3_k, _q3_k), QT.Q4_K: (_pre_k, _q4_k),
    QT.Q5_K: (_pre_k, _q5_k), QT.Q6_K: (_pre_q6_k, _q6_k),
    QT.IQ4_NL: (_pre_d, _iq4_nl), QT.IQ4_XS: (_pre_iq4_xs, _iq4_xs),
}
_FLOATS = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}

QTYPE_BLOCK = {qt: GGML_QUANT_SIZES[qt] for qt in (*_FLOATS, *_KERNELS)}
"""Supported types -> (block_size in values, type_size in bytes)."""

_HINT = ("Supported: " + ", ".join(qt.name for qt in QTYPE_BLOCK)
         + ". Re-quantize the model to one of these types")


def _qtype(qtype):
    try:
        qt = QT(qtype)
    except ValueError:
        raise UnsupportedQuantType("<tensor>", f"unknown GGML quantization type {qtype!r}",
                                   hint=_HINT) from None
    if qt not in QTYPE_BLOCK:
        raise UnsupportedQuantType("<tensor>", f"quantization type {qt.name} is not supported",
                                   hint=_HINT)
    return qt


def quantized_nbytes(qtype, shape):
    """Bytes a tensor of logical ``shape`` occupies in GGUF as ``qtype`` (any GGML type)."""
    qt = QT(qtype)
    bs, ts = GGML_QUANT_SIZES[qt]
    shape = tuple(shape)
    if bs > 1 and (not shape or shape[-1] % bs):
        raise GGUFError("<tensor>", f"row length {shape[-1] if shape else '()'} is not a "
                        f"multiple of the {qt.name} block size {bs}")
    return math.prod(shape) // bs * ts


class _Scratch:
    """Per-call scratch buffers by name, sized by the first (largest) chunk, then reused."""

    def __init__(self, device):
        self.device, self.bufs = device, {}

    def __call__(self, name, numel, dtype):
        t = self.bufs.get(name)
        if t is None or t.numel() < numel:
            t = self.bufs[name] = torch.empty(numel, dtype=dtype, device=self.device)
        return t[:numel]


def _as_bytes(raw, device):
    raw = raw.reshape(-1)
    if raw.dtype != U8:
        raw = raw.contiguous().view(U8)
    raw = raw.to(device)
    # int32 views of the packed fields need 4-byte alignment.
    if raw.storage_offset() % 16 or raw.data_ptr() % 16:
        raw = raw.clone()
    return raw


def dequantize_into(out, raw, qtype):
    """Dequantize the GGUF bytes ``raw`` into the contiguous tensor ``out`` (its shape is
    the logical shape, its dtype float16/bfloat16/float32); returns ``out``."""
    qt = _qtype(qtype)
    if out.dtype not in OUT_DTYPES:
        raise TypeError(f"dequantize: output dtype must be one of {OUT_DTYPES}, got {out.dtype}")
    if not out.is_contiguous():
        raise ValueError("dequantize_into: out must be contiguous")
    need = quantized_nbytes(qt, out.shape)
    got = raw.numel() * raw.element_size()
    if got != need:
        raise GGUFError("<tensor>", f"{qt.name} data of shape {tuple(out.shape)} needs {need} "
                        f"bytes, got {got}",
                        hint="The file is truncated or the tensor's shape/type header is wrong")
    raw = _as_bytes(raw, out.device)
    if qt in _FLOATS:
        out.view(-1).copy_(raw.view(_FLOATS[qt]))
        return out
    if out.numel() == 0:
        return out
    _run(qt, raw, out)
    return out


def _finish(q, scale, bias, dst, buf, fused):
    """dst = q * scale (+ bias), computed in float32 and rounded once into dst's dtype."""
    out = dst.view(q.shape)
    if fused:
        if bias is None:
            return torch.mul(q, scale, out=out)
        x = torch.mul(q, scale, out=buf("f", q.numel(), F32).view(q.shape))
        return torch.add(x, bias, out=out)
    x = out if out.dtype == F32 else buf("f", q.numel(), F32).view(q.shape)
    if x.data_ptr() != q.data_ptr():   # Q4_K/IQ4 bodies already wrote float32 quants there
        # Q8_0's quants are a strided view (32 of every 34 bytes): widening it in one strided
        # copy ran 3.4x slower on CPU than packing the int8 bytes first, then widening
        # (measured, 3072x12288 Q8_0 -> float32: 1.77 s vs 0.49 s).
        x.copy_(q if q.is_contiguous() else q.contiguous())
    x.mul_(scale)
    if bias is not None:
        x.add_(bias)
    return out if x is out else out.copy_(x)


def _run(qt, raw, out):
    """Dequantize every block: headers per super-chunk, quants per chunk."""
    bs, ts = QTYPE_BLOCK[qt]
    prep, body = _KERNELS[qt]
    blocks, dst = raw.view(-1, ts), out.view(-1, bs)
    stop = blocks.shape[0]
    cpu = out.device.type == "cpu"
    # On CPU each of torch's intra-op threads gets _CPU_CHUNK values of a chunk (see there).
    ch = (_CPU_CHUNK * torch.get_num_threads() if cpu else _DEV_CHUNK) // bs
    ch = min(max(4, ch - ch % 4), stop)  # multiples of 4 blocks stay int32-aligned
    sup = ch * (_PREP_CHUNKS if cpu else 1)
    buf, fused = _Scratch(out.device), mixed_dtype_ops_fuse(out.device)
    for s0 in range(0, stop, sup):
        pre = prep(blocks[s0: min(stop, s0 + sup)])
        for s in range(s0, min(stop, s0 + sup), ch):
            e = min(stop, s + ch)
            terms = body(blocks[s:e], raw[s * ts: e * ts], tuple(p[s - s0: e - s0] for p in pre), buf)
            _finish(*terms, dst[s:e], buf, fused)


def dequantize(raw, qtype, shape, dtype=torch.float16):
    """GGUF bytes (uint8, any device) -> tensor of logical ``shape`` and ``dtype`` there."""
    if dtype not in OUT_DTYPES:
        raise TypeError(f"dequantize: dtype must be one of {OUT_DTYPES}, got {dtype}")
    out = torch.empty(tuple(shape), dtype=dtype, device=raw.device)
    return dequantize_into(out, raw, qtype)
