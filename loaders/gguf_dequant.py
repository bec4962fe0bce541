"""GGUF block dequantization in plain torch, for any device.

Layouts and arithmetic follow ``gguf.quants`` (llama.cpp's reference) operation for
operation in float32, so a float32 result is bit-identical to the reference and a
half-precision result is the reference rounded once.

Why the code is shaped this way (measured on CPU, where eager torch is weakest):
* Every torch op costs a few microseconds however small, and a strided op pays again per
  row when its rows are short (< 32 values). So block headers (scales) are copied out
  once for the whole tensor and unpacked with a handful of long ops, and the quants are
  unpacked in long runs: nibble "planes" over whole rows, then one ``cat`` puts them in
  output order, then one uint8 -> float32 pass.
* Bit fields are unpacked on int16/int32 views, several quants per lane; no int64.
* float32 is exact and, on CPU, no slower than half arithmetic (torch widens bf16 to
  float32 internally anyway); the last op of each chunk writes the output dtype.
* On CPU the quants are processed in chunks that stay in L2; elsewhere chunks are large
  and only bound the scratch memory.
"""
import functools
import math

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from .errors import GGUFError

U8, I8, I16, I32, F16, F32 = torch.uint8, torch.int8, torch.int16, torch.int32, torch.float16, torch.float32
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# llama.cpp's non-linear 4-bit codebook shared by IQ4_NL and IQ4_XS.
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_CPU_CHUNK = 1 << 17   # output values per chunk: ~1.5 MiB of scratch, inside L2
_DEV_CHUNK = 1 << 24   # elsewhere: bounds the float32 scratch to 64 MiB


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


# ---- whole-tensor header unpacking: returns per-block tensors, first dim = blocks ----

def _hdr(blocks, start, stop):
    """Copy a byte range of every block header out contiguously, padded to whole int32s.

    One pass over the strided headers; everything after it reads a small dense array."""
    nb = blocks.shape[0]
    out = torch.zeros(nb, -(-(stop - start) // 4) * 4, dtype=U8, device=blocks.device)
    out[:, : stop - start].copy_(blocks[:, start:stop])
    return out


def _f16_at(h, start):
    return h[:, start:start + 2].view(F16).float()


def _pre_d(blocks):
    return (_f16_at(_hdr(blocks, 0, 2), 0),)


def _pre_dm(blocks):
    h = _hdr(blocks, 0, 4)
    return _f16_at(h, 0), _f16_at(h, 2)


def _pre_q5_0(blocks):
    h = _hdr(blocks, 0, 6)
    qh = torch.empty(blocks.shape[0], 4, dtype=U8, device=blocks.device)
    qh.copy_(h[:, 2:6])
    return _f16_at(h, 0), qh.view(I32).view(-1)


def _pre_q5_1(blocks):
    h = _hdr(blocks, 0, 8)
    return _f16_at(h, 0), _f16_at(h, 2), h.view(I32)[:, 1].contiguous()


def _pre_q2_k(blocks):
    sc, dd = _hdr(blocks, 0, 16), _hdr(blocks, 80, 84)
    d, dmin = _f16_at(dd, 0), _f16_at(dd, 2)
    dl = (sc & 0xF).float().mul_(d)
    ml = (sc >> 4).float().mul_(dmin)
    return dl, ml


def _pre_q3_k(blocks):
    h = _hdr(blocks, 96, 110)
    w = h.view(I32)  # w0, w1: low nibbles; w2: 2-bit high parts; w3: d
    sc = torch.empty_like(w)
    # scale t: low nibble from byte t % 8 (high half when t >= 8), bits 2*(t // 4) of byte 8 + t % 4
    for t, (src, nib, hs) in enumerate(((0, 0, 4), (1, 0, 2), (0, 4, 0), (1, 4, -2))):
        lo = (w[:, src] >> nib) & 0x0F0F0F0F if nib else w[:, src] & 0x0F0F0F0F
        hi = (w[:, 2] << hs) if hs > 0 else (w[:, 2] >> -hs) if hs < 0 else w[:, 2]
        torch.bitwise_or(lo, hi & 0x30303030, out=sc[:, t])
    dl = sc.view(U8).float().sub_(32).mul_(_f16_at(h, 12))
    return (dl,)


def _pre_k(blocks):
    """Q4_K/Q5_K: 6-bit scales and mins -> (nb, 2, 8) float32, [:, 0] = d*sc, [:, 1] = dmin*m."""
    h = _hdr(blocks, 0, 16)
    w = h.view(I32)  # w0: d, dmin; w1, w2: low 6 bits (+2 high bits); w3: 4-bit low parts
    sm = torch.empty_like(w)
    torch.bitwise_and(w[:, 1], 0x3F3F3F3F, out=sm[:, 0])
    torch.bitwise_and(w[:, 2], 0x3F3F3F3F, out=sm[:, 2])
    torch.bitwise_or(w[:, 3] & 0x0F0F0F0F, (w[:, 1] >> 2) & 0x30303030, out=sm[:, 1])
    torch.bitwise_or((w[:, 3] >> 4) & 0x0F0F0F0F, (w[:, 2] >> 2) & 0x30303030, out=sm[:, 3])
    dd = h[:, :4].view(F16).float().view(-1, 2, 1)
    return (sm.view(U8).view(-1, 2, 8).float().mul_(dd),)


def _pre_q6_k(blocks):
    h = _hdr(blocks, 192, 210)
    return (h[:, :16].view(I8).float().mul_(_f16_at(h, 16)),)


def _pre_iq4_xs(blocks):
    h = _hdr(blocks, 0, 8)
    dev = blocks.device
    # scale j: low nibble (j % 2) of byte 4 + j // 2, top 2 bits at bit 2j of the uint16 at 2
    lo = (h[:, 4:8].unsqueeze(-1) >> _const(dev, U8, (0, 4), (2,))) & 0xF
    hi = (h[:, 2:4].view(I16) >> _const(dev, I16, tuple(range(0, 16, 2)), (8,))) & 3
    sc = (lo.view(-1, 8).to(I16) | (hi << 4))
    return (sc.float().sub_(32).mul_(_f16_at(h, 0)),)


def _last(op, a, b, dst):
    """Final float op of a chunk. For half outputs it runs in place and then converts:
    torch would otherwise allocate a float32 temporary for the mixed-dtype ``out=``."""
    if dst.dtype == F32:
        op(a, b, out=dst)
    else:
        dst.copy_(op(a, b, out=a))


# ---- per-chunk bodies: b (n, ts) uint8 blocks, flat = b as 1-D; f, u, w scratch ----

def _planes(src, out):
    """Low nibbles into out[0], high nibbles into out[1] (uint8 shifts need no mask)."""
    torch.bitwise_and(src, 0xF, out=out[0])
    torch.bitwise_right_shift(src, 4, out=out[1])


def _legacy_nibbles(flat, n, ts, off, u, w):
    """Legacy/IQ4_NL blocks: quants 0-15 are the low nibbles of qs, 16-31 the high ones.

    The nibble ops run over the whole chunk (headers included) as one long row."""
    lh = w[: 2 * n * ts].view(2, n * ts)
    _planes(flat, lh)
    lh = lh.view(2, n, ts)
    u = u[: n * 32].view(n, 32)
    torch.cat((lh[0, :, off:], lh[1, :, off:]), dim=1, out=u)
    return u


def _high_bits_5(u, qh, w, n):
    """Q5_0/Q5_1: OR bit j of qh into bit 4 of quant byte j.

    Computed transposed (8 x n, long rows); a nibble times 0x02040810 drops its bit k at
    bit 4 of byte k without carries."""
    ht = w[: 32 * n].view(I32).view(8, n)
    torch.bitwise_right_shift(qh.view(1, n), _const(qh.device, I32, tuple(range(0, 32, 4)), (8, 1)), out=ht)
    ht &= 0xF
    ht *= 0x02040810
    ht &= 0x10101010
    u.view(I32).bitwise_or_(ht.t())


def _q8_0(b, flat, pre, f, u, w, dst):
    n = b.shape[0]
    q = f[: n * 34].view(n, 34)
    q.view(-1).copy_(flat.view(I8))  # whole chunk in one run; the d bytes are ignored
    _last(torch.mul, q[:, 2:], pre[0], dst)


def _q4_0(b, flat, pre, f, u, w, dst):
    n = b.shape[0]
    u = _legacy_nibbles(flat, n, 18, 2, u, w)
    f = f[: n * 32].view(n, 32)
    f.copy_(u)
    _last(torch.mul, f.sub_(8), pre[0], dst)


def _q4_1(b, flat, pre, f, u, w, dst):
    n = b.shape[0]
    u = _legacy_nibbles(flat, n, 20, 4, u, w)
    f = f[: n * 32].view(n, 32)
    f.copy_(u)
    _last(torch.add, f.mul_(pre[0]), pre[1], dst)


def _q5_0(b, flat, pre, f, u, w, dst):
    n = b.shape[0]
    u = _legacy_nibbles(flat, n, 22, 6, u, w)
    _high_bits_5(u, pre[1], w, n)
    f = f[: n * 32].view(n, 32)
    f.copy_(u)
    _last(torch.mul, f.sub_(16), pre[0], dst)


def _q5_1(b, flat, pre, f, u, w, dst):
    n = b.shape[0]
    u = _legacy_nibbles(flat, n, 24, 8, u, w)
    _high_bits_5(u, pre[2], w, n)
    f = f[: n * 32].view(n, 32)
    f.copy_(u)
    _last(torch.add, f.mul_(pre[0]), pre[1], dst)


def _iq4_lookup(u, f, w, n, bs):
    """Nibble bytes in u -> float32 codebook values in f, two at a time."""
    idx = w[: 2 * n * bs].view(I32)
    idx.copy_(u.view(I16).view(-1))
    f = f[: n * bs]
    torch.index_select(_iq4_pairs(u.device), 0, idx, out=f.view(torch.int64))
    return f


def _iq4_nl(b, flat, pre, f, u, w, dst):
    n = b.shape[0]
    u = _legacy_nibbles(flat, n, 18, 2, u, w)
    f = _iq4_lookup(u, f, w, n, 32)
    _last(torch.mul, f.view(n, 32), pre[0], dst)


def _iq4_xs(b, flat, pre, f, u, w, dst):
    n = b.shape[0]
    lh = w[: 2 * n * 128].view(2, n, 128)
    _planes(b[:, 8:], lh)
    # quant 32j + 16a + i is nibble a of qs[16j + i]
    u = u[: n * 256].view(n, 8, 32)
    torch.cat((lh[0].view(n, 8, 16), lh[1].view(n, 8, 16)), dim=2, out=u)
    f = _iq4_lookup(u, f, w, n, 256)
    _last(torch.mul, f.view(n, 8, 32), pre[0].unsqueeze(-1), dst.view(n, 8, 32))


def _q2_k(b, flat, pre, f, u, w, dst):
    n = b.shape[0]
    # quant 128g + 32s + i is bits 2s..2s+1 of qs[32g + i]
    q = u[: n * 256].view(I32).view(n, 2, 4, 8)
    torch.bitwise_right_shift(b[:, 16:80].view(I32).view(n, 2, 1, 8),
                              _const(b.device, I32, (0, 2, 4, 6), (4, 1)), out=q)
    q &= 0x03030303
    f = f[: n * 256].view(n, 16, 16)
    f.view(-1).copy_(u[: n * 256])
    dl, ml = pre
    _last(torch.sub, f.mul_(dl.unsqueeze(-1)), ml.unsqueeze(-1), dst.view(n, 16, 16))


def _q3_k(b, flat, pre, f, u, w, dst):
    n, dev = b.shape[0], b.device
    # 110-byte blocks: copy hmask + qs to an aligned buffer so they can be read as int32.
    hq = w[: n * 96].view(n, 96)
    hq.copy_(b[:, :96])
    hq = hq.view(I32)
    q = u[: n * 256].view(I32).view(n, 2, 4, 8)  # quant 128g + 32s + i: bits 2s of qs[32g + i]
    torch.bitwise_right_shift(hq[:, 8:].view(n, 2, 1, 8), _const(dev, I32, (0, 2, 4, 6), (4, 1)), out=q)
    q &= 0x03030303
    # bit j of hmask[i] belongs to quant 32j + i: move it to bit 2 of that byte
    hm = hq[:, :8].view(n, 1, 8)
    h = w[n * 96: n * 96 + n * 256].view(I32).view(n, 8, 8)
    torch.bitwise_left_shift(hm, _const(dev, I32, (2, 1), (2, 1)), out=h[:, :2])
    torch.bitwise_right_shift(hm, _const(dev, I32, tuple(range(6)), (6, 1)), out=h[:, 2:])
    h &= 0x04040404
    q.view(n, 64).bitwise_or_(h.view(n, 64))
    f = f[: n * 256].view(n, 16, 16)
    f.view(-1).copy_(u[: n * 256])
    _last(torch.mul, f.sub_(4), pre[0].unsqueeze(-1), dst.view(n, 16, 16))


def _k_nibbles(qs, u, w, n):
    """Q4_K/Q5_K: quant 64g + 32a + i is nibble a of qs[32g + i]."""
    lh = w[: 2 * n * 128].view(2, n, 128)
    _planes(qs, lh)
    u = u[: n * 256].view(n, 4, 64)
    torch.cat((lh[0].view(n, 4, 32), lh[1].view(n, 4, 32)), dim=2, out=u)
    return u


def _k_finish(u, f, pre, dst, n):
    f = f[: n * 256].view(n, 8, 32)
    f.view(-1).copy_(u.view(-1))
    sm = pre[0]
    _last(torch.sub, f.mul_(sm[:, 0].unsqueeze(-1)), sm[:, 1].unsqueeze(-1), dst.view(n, 8, 32))


def _q4_k(b, flat, pre, f, u, w, dst):
    n = b.shape[0]
    _k_finish(_k_nibbles(b[:, 16:], u, w, n), f, pre, dst, n)


def _q5_k(b, flat, pre, f, u, w, dst):
    n, dev = b.shape[0], b.device
    u = _k_nibbles(b[:, 48:], u, w, n)
    # bit j of qh[i] belongs to quant 32j + i: move it to bit 4 of that byte
    qh = b[:, 16:48].view(I32).view(n, 1, 8)
    h = w[: n * 256].view(I32).view(n, 8, 8)
    torch.bitwise_left_shift(qh, _const(dev, I32, (4, 3, 2, 1), (4, 1)), out=h[:, :4])
    torch.bitwise_right_shift(qh, _const(dev, I32, (0, 1, 2, 3), (4, 1)), out=h[:, 4:])
    h &= 0x10101010
    u.view(I32).view(n, 64).bitwise_or_(h.view(n, 64))
    _k_finish(u, f, pre, dst, n)


def _q6_k(b, flat, pre, f, u, w, dst):
    n, dev = b.shape[0], b.device
    # low 4 bits: quant 128g + 64a + c is nibble a of ql[64g + c]
    lh = w[: 2 * n * 128].view(2, n, 128)
    _planes(b[:, :128], lh)
    u = u[: n * 256].view(n, 2, 128)
    torch.cat((lh[0].view(n, 2, 64), lh[1].view(n, 2, 64)), dim=2, out=u)
    # high 2 bits: quant 128g + 32s + i is bits 2s..2s+1 of qh[32g + i]; move them to bits 4-5
    qh = b[:, 128:192].view(I16).view(n, 2, 1, 16)
    h = w[: n * 256].view(I16).view(n, 2, 4, 16)
    torch.bitwise_left_shift(qh, _const(dev, I16, (4, 2, 0), (3, 1)), out=h[:, :, :3])
    torch.bitwise_right_shift(qh, 2, out=h[:, :, 3:])
    h &= 0x3030
    u.view(I16).view(n, 128).bitwise_or_(h.view(n, 128))
    f = f[: n * 256].view(n, 16, 16)
    f.view(-1).copy_(u.view(-1))
    _last(torch.mul, f.sub_(32), pre[0].unsqueeze(-1), dst.view(n, 16, 16))


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
    """Bytes a tensor of logical ``shape`` occupies in GGUF as ``qtype``."""
    qt = QT(qtype)
    bs, ts = GGML_QUANT_SIZES[qt]
    shape = tuple(shape)
    if shape and shape[-1] % bs:
        raise GGUFError("<tensor>", f"row length {shape[-1]} is not a multiple of the "
                        f"{qt.name} block size {bs}")
    return math.prod(shape) // bs * ts


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
    bs, ts = QTYPE_BLOCK[qt]
    prep, body = _KERNELS[qt]
    nb = raw.numel() // ts
    blocks = raw.view(nb, ts)
    dst = out.view(nb, bs)
    pre = prep(blocks)
    ch = (_CPU_CHUNK if out.device.type == "cpu" else _DEV_CHUNK) // bs
    ch = min(max(4, ch - ch % 4), nb)  # a multiple of 4 blocks keeps every chunk int32-aligned
    dev = out.device
    f = torch.empty(ch * max(bs, ts), dtype=F32, device=dev)
    u = torch.empty(ch * bs, dtype=U8, device=dev)
    w = torch.empty(ch * max(2 * ts, 2 * bs), dtype=U8, device=dev)
    for s in range(0, nb, ch):
        e = min(nb, s + ch)
        body(blocks[s:e], raw[s * ts: e * ts], tuple(p[s:e] for p in pre), f, u, w, dst[s:e])
    return out


def dequantize(raw, qtype, shape, dtype=torch.float16):
    """GGUF bytes (uint8, any device) -> tensor of logical ``shape`` and ``dtype`` there."""
    if dtype not in OUT_DTYPES:
        raise TypeError(f"dequantize: dtype must be one of {OUT_DTYPES}, got {dtype}")
    out = torch.empty(tuple(shape), dtype=dtype, device=raw.device)
    return dequantize_into(out, raw, qtype)
