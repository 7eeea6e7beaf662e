"""GGUF block formats as pure functions: quantize / dequantize Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K,
Q3_K, Q4_K, Q5_K, Q6_K, byte for byte as llama.cpp's reference quantizers in ggml/src/ggml-quants.c
(`quantize_row_*_ref`, the searches `make_qx_quants`, `make_q3_quants`, `make_qkx2_quants`).

    data = quantize(w, "Q4_K")            # w: (rows, cols) fp32 -> uint8 (rows, cols / 256 * 144)
    w2 = dequantize(data, "Q4_K", cols)   # -> fp32 (rows, cols)

Vectorized over all blocks of a tensor; loops run only along the elements of one block, in the
C code's order, with every sum accumulated in fp32 in that order and every product grouped as the
C expression groups it, so that the searches take the same branches (ggml-base is built without
FMA contraction; nearest_int = round half to even = torch.round).

Byte layouts (little-endian; "fp16" = IEEE half; n = elements per block):
  Q4_0  n=32, 18 B: d fp16 | qs[16]: byte j = q[j] | q[j+16] << 4;   x = d * (q - 8)
  Q4_1  n=32, 20 B: d fp16 | m fp16 | qs[16] (as Q4_0);               x = d * q + m
  Q5_0  n=32, 22 B: d fp16 | qh u32 (bit k = bit 4 of q[k]) | qs[16] (low nibbles as Q4_0); x = d * (q - 16)
  Q5_1  n=32, 24 B: d fp16 | m fp16 | qh u32 | qs[16];               x = d * q + m
  Q8_0  n=32, 34 B: d fp16 | qs int8[32];                             x = d * q
  Q2_K  n=256, 84 B: scales[16] (low nibble scale, high nibble min, one per 16) | qs[64] | d fp16 | dmin fp16
        qs: for each half h of 128: byte 32h + l = q[128h+l] | q[+32] << 2 | q[+64] << 4 | q[+96] << 6
        x = d * sc * q - dmin * m
  Q3_K  n=256, 110 B: hmask[32] (bit b of byte m: high bit of q[32b + m]) | qs[64] (low 2 bits, as Q2_K)
        | scales[12] (16 6-bit scales, +32 offset: low nibbles in bytes 0-7, high 2 bits in 8-11) | d fp16
        x = d * (s - 32) * (q - 4)
  Q4_K  n=256, 144 B: d fp16 | dmin fp16 | scales[12] (8 6-bit scales and mins, get_scale_min_k4) | qs[128]
        qs: for each quarter c of 64: byte 32c + l = q[64c+l] | q[64c+l+32] << 4;  x = d * sc * q - dmin * m
  Q5_K  n=256, 176 B: d fp16 | dmin fp16 | scales[12] | qh[32] (bit 2c / 2c+1 of byte l: bit 4 of q[64c+l] /
        q[64c+l+32]) | qs[128] (low nibbles, as Q4_K)
  Q6_K  n=256, 210 B: ql[128] | qh[64] | scales int8[16] | d fp16; for each half h of 128, l < 32:
        ql[64h+l] = q[128h+l] & 15 | (q[128h+l+64] & 15) << 4, ql[64h+l+32] = q[+32] & 15 | (q[+96] & 15) << 4,
        qh[32h+l] = q[128h+l] >> 4 | q[+32] >> 4 << 2 | q[+64] >> 4 << 4 | q[+96] >> 4 << 6;  x = d * s * (q - 32)
Written by hand: no PyPI package quantizes the K types (the `gguf` package quantizes only the
legacy types and dequantizes all; it is the reference the tests compare against).
"""
from __future__ import annotations

import torch

from .kquant_search import (  # noqa: F401 (COMPILED, torch_reference, the searches: re-exported)
    _EPS,
    COMPILED,
    F32,
    _cols,
    _compiled,
    _div,
    _f,
    _first_absmax,
    _pos_max,
    _round,
    _sqrt,
    make_q3_quants,
    make_qkx2_quants,
    make_qp_quants,
    make_qx_quants,
    torch_reference,
)

BLOCK = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
         "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
TYPES = tuple(BLOCK)


# ---------------------------------------------------------------- bytes <-> numbers


def _half(v: torch.Tensor) -> torch.Tensor:
    """fp32 (n,) -> fp16 bytes (n, 2), rounded to nearest even as GGML_FP32_TO_FP16."""
    return v.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _unhalf(b: torch.Tensor) -> torch.Tensor:
    """fp16 bytes (n, 2) -> fp32 (n,)."""
    return b.contiguous().view(torch.float16).reshape(-1).to(F32)


def _u32(bits: torch.Tensor) -> torch.Tensor:
    """(n, 32) 0/1 -> (n, 4) little-endian bytes of sum bit_k << k."""
    w = (bits.to(torch.int64) << torch.arange(32)).sum(1)
    return torch.stack([(w >> (8 * i)) & 0xFF for i in range(4)], 1).to(torch.uint8)


def _bits32(b: torch.Tensor) -> torch.Tensor:
    """(n, 4) little-endian bytes -> (n, 32) bits."""
    w = sum(b[:, i].to(torch.int64) << (8 * i) for i in range(4))
    return (w[:, None] >> torch.arange(32)) & 1


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) -> (n, 16): byte j = q[j] | q[j + 16] << 4 (low nibbles only)."""
    return ((q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)).to(torch.uint8)


def _unnibbles(b: torch.Tensor) -> torch.Tensor:
    b = b.to(torch.int64)
    return torch.cat([b & 15, b >> 4], 1)


def _crumbs(q: torch.Tensor) -> torch.Tensor:
    """(n, 256) 2-bit values -> (n, 64) bytes (Q2_K / Q3_K order)."""
    q = q.to(torch.int64).reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | q[:, :, 1] << 2 | q[:, :, 2] << 4 | q[:, :, 3] << 6).reshape(-1, 64).to(torch.uint8)


def _uncrumbs(b: torch.Tensor) -> torch.Tensor:
    b = b.to(torch.int64).reshape(-1, 2, 1, 32)
    return ((b >> (2 * torch.arange(4).view(1, 1, 4, 1))) & 3).reshape(-1, 256)


# ---------------------------------------------------------------- legacy types (32 per block)


def _inv(d: torch.Tensor) -> torch.Tensor:
    """d ? 1/d : 0"""
    return torch.where(d != 0, _div(1, torch.where(d != 0, d, torch.ones_like(d))), torch.zeros_like(d))


def _zero_offset(x: torch.Tensor, nmax: int, qw: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 / Q5_0 (nmax 8 / 16): (d, codes in [0, 2 nmax)); with weights, make_qx_quants (the
    _impl variants), else d = max / -nmax and codes trunc(x / d + nmax + 0.5)."""
    if qw is not None:
        d, q = make_qx_quants(x, nmax, qw)
    else:
        d = _div(_first_absmax(x)[1], -nmax)
        q = torch.trunc(x * _inv(d)[:, None] + _f(nmax + 0.5)).clamp(max=2 * nmax - 1)
    return d, q.to(torch.int64)


def _q4_0(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    d, q = _zero_offset(x, 8, qw)
    return torch.cat([_half(d), _nibbles(q)], 1)


def _q5_0(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    d, q = _zero_offset(x, 16, qw)
    return torch.cat([_half(d), _u32(q >> 4), _nibbles(q)], 1)


def _min_offset(x: torch.Tensor, nmax: int, qw: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 / Q5_1: (d, m, codes); with weights, make_qkx3_quants' search (the _impl variants)."""
    if qw is not None:
        d, neg_min, q = make_qkx2_quants(x, qw, nmax, -0.9, 0.05, 36, use_mad=False)
        return d, -neg_min, q.to(torch.int64)
    lo, hi = x.amin(1), x.amax(1)
    d = _div(hi - lo, nmax)
    q = torch.trunc((x - lo[:, None]) * _inv(d)[:, None] + _f(0.5)).to(torch.int64)
    return d, lo, (q.clamp(max=15) if nmax == 15 else q & 0xFF)  # Q5_1: a (uint8_t) cast, no clamp


def _q4_1(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    d, m, q = _min_offset(x, 15, qw)
    return torch.cat([_half(d), _half(m), _nibbles(q)], 1)


def _q5_1(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    d, m, q = _min_offset(x, 31, qw)
    return torch.cat([_half(d), _half(m), _u32((q >> 4) & 1), _nibbles(q)], 1)


def _q8_0(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:  # no weighted variant
    d = _div(x.abs().amax(1), 127)
    v = x * _inv(d)[:, None]
    q = torch.where((v - torch.trunc(v)).abs() == 0.5, torch.trunc(v) + torch.sign(v), torch.round(v))  # roundf
    return torch.cat([_half(d), q.to(torch.int8).view(torch.uint8)], 1)


# ---------------------------------------------------------------- K types (256 per super-block)


def _pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """8 6-bit scales and mins (B, 8) -> 12 bytes, as quantize_row_q4_K_ref writes them."""
    sc = torch.zeros(ls.shape[0], 12, dtype=torch.int64)
    sc[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    sc[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    sc[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return sc.to(torch.uint8)


def _unpack_scale_min_k4(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """get_scale_min_k4 for j = 0..7: (scales (B, 8), mins (B, 8))."""
    b = b.to(torch.int64)
    ls = torch.cat([b[:, 0:4] & 63, (b[:, 8:12] & 0xF) | ((b[:, 0:4] >> 6) << 4)], 1)
    lm = torch.cat([b[:, 4:8] & 63, (b[:, 8:12] >> 4) | ((b[:, 4:8] >> 6) << 4)], 1)
    return ls, lm


def _seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Row sums accumulated left to right in fp32, as the reference's loops."""
    T = _cols(t)
    acc = torch.zeros(T.shape[1], dtype=t.dtype)
    for i in range(T.shape[0]):
        acc = acc + T[i]
    return acc


def _importance(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor, sub: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The _impl variants' weights qw * sqrt(sigma2 + x^2) per sub-block of `sub`, and their sums."""
    B = x.shape[0]
    xs = x.reshape(-1, sub)
    w = qw.reshape(-1, sub) * _sqrt(sigma2.repeat_interleave(xs.shape[0] // B)[:, None] + xs * xs)
    return w, _seq_sum(w)


def _requantize(x: torch.Tensor, L: torch.Tensor, d: torch.Tensor, dm: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor:
    """The final codes from the stored (fp16-rounded) sub-block scales d and offsets dm (B, S):
    nearest((x + dm) / d) (or x / d), clamped, where d != 0; L (from the search) elsewhere."""
    B, S = d.shape
    xs = x.reshape(B, S, -1)
    num = xs + dm[..., None] if dm is not None else xs
    q = _round(num / torch.where(d != 0, d, torch.ones_like(d))[..., None]).clamp(lo, hi)
    return torch.where((d != 0)[..., None], q - lo if lo < 0 else q, L.reshape(B, S, -1)).reshape(B, -1).to(torch.int64)


def _k_minmax(x: torch.Tensor, qw: torch.Tensor | None, nmax: int, rmin: float, rdelta: float, nstep: int) -> tuple:
    """Q4_K / Q5_K: sub-blocks of 32 searched by make_qkx2_quants (with weights: make_qkx3_quants
    and the 6-bit scales and mins by make_qp_quants), then the final codes: (head bytes, codes)."""
    B = x.shape[0]
    sub = x.reshape(B * 8, 32)
    if qw is None:
        w = _sqrt(_div(_seq_sum(sub * sub), 32))[:, None] + sub.abs()
        scales, mins, L = make_qkx2_quants(sub, w, nmax, rmin, rdelta, nstep, use_mad=False)
        scales, mins = scales.reshape(B, 8), mins.reshape(B, 8)
        max_scale, max_min = _pos_max(scales), _pos_max(mins)
        inv_scale = torch.where(max_scale > 0, _div(63, torch.where(max_scale > 0, max_scale, torch.ones_like(max_scale))), torch.zeros_like(max_scale))
        inv_min = torch.where(max_min > 0, _div(63, torch.where(max_min > 0, max_min, torch.ones_like(max_min))), torch.zeros_like(max_min))
        ls = _round(inv_scale[:, None] * scales)
        lm = _round(inv_min[:, None] * mins)
        dh, mh = _half(_div(max_scale, 63)), _half(_div(max_min, 63))
    else:
        w, sw = _importance(x, qw, _div(2 * _seq_sum(x * x), 256), 32)
        scales, mins, L = make_qkx2_quants(sub, w, nmax, -0.9, 0.05, 36, use_mad=False)
        d_block, ls = make_qp_quants(scales.reshape(B, 8), 63, sw.reshape(B, 8))
        m_block, lm = make_qp_quants(mins.reshape(B, 8), 63, sw.reshape(B, 8))
        dh, mh = _half(d_block), _half(m_block)
    ls = (ls.to(torch.int64) & 0xFF).clamp(max=63)
    lm = (lm.to(torch.int64) & 0xFF).clamp(max=63)
    d = _unhalf(dh)[:, None] * ls.to(F32)
    dm = _unhalf(mh)[:, None] * lm.to(F32)
    return torch.cat([dh, mh, _pack_scale_min_k4(ls, lm)], 1), _requantize(x, L, d, dm, 0, nmax)


def _q4_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    head, L = _k_minmax(x, qw, 15, -1.0, 0.1, 20)
    L = L.reshape(-1, 4, 2, 32)
    return torch.cat([head, (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128).to(torch.uint8)], 1)


def _q5_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    head, L = _k_minmax(x, qw, 31, -0.5, 0.1, 15)
    L = L.reshape(-1, 4, 2, 32)
    hi = (L >> 4) << (2 * torch.arange(4).view(1, 4, 1, 1) + torch.arange(2).view(1, 1, 2, 1))
    qh = hi.sum((1, 2)).to(torch.uint8)
    ql = ((L[:, :, 0] & 15) | ((L[:, :, 1] & 15) << 4)).reshape(-1, 128).to(torch.uint8)
    return torch.cat([head, qh, ql], 1)


def _q2_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    B = x.shape[0]
    sub = x.reshape(B * 16, 16)
    if qw is None:
        scales, mins, L = make_qkx2_quants(sub, sub.abs(), 3, -0.5, 0.1, 15, use_mad=True)
        scales, mins = scales.reshape(B, 16), mins.reshape(B, 16)
        max_scale, max_min = _pos_max(scales), _pos_max(mins)
        has_s, has_m = max_scale > 0, max_min > 0
        ls = torch.where(has_s[:, None], _round(_div(15, torch.where(has_s, max_scale, torch.ones_like(max_scale)))[:, None] * scales), torch.zeros_like(scales))
        lm = torch.where(has_m[:, None], _round(_div(15, torch.where(has_m, max_min, torch.ones_like(max_min)))[:, None] * mins), torch.zeros_like(mins))
        dh = _half(torch.where(has_s, _div(max_scale, 15), torch.zeros_like(max_scale)))
        mh = _half(torch.where(has_m, _div(max_min, 15), torch.zeros_like(max_min)))
    else:  # quantize_row_q2_K_impl
        w, sw = _importance(x, qw, _div(_seq_sum(x * x), 256), 16)
        scales, mins, L = make_qkx2_quants(sub, w, 3, -0.9, 0.05, 36, use_mad=False)
        dm, ls = make_qp_quants(scales.reshape(B, 16), 15, sw.reshape(B, 16))
        mm, lm = make_qp_quants(mins.reshape(B, 16), 15, sw.reshape(B, 16))
        dh, mh = _half(dm), _half(mm)
    sc = (ls.to(torch.int64) & 0xFF) | ((lm.to(torch.int64) << 4) & 0xFF)
    d = _unhalf(dh)[:, None] * (sc & 0xF).to(F32)
    dm = _unhalf(mh)[:, None] * (sc >> 4).to(F32)
    L = _requantize(x, L, d, dm, 0, 3)
    return torch.cat([sc.to(torch.uint8), _crumbs(L), dh, mh], 1)


def _q3_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    B = x.shape[0]
    if qw is None:
        scales, L = make_q3_quants(x.reshape(B * 16, 16), 4)
        scales = scales.reshape(B, 16)
        _, max_scale = _first_absmax(scales)
        has = max_scale != 0
        iscale = _div(-32, torch.where(has, max_scale, torch.ones_like(max_scale)))
        l6 = torch.where(has[:, None], _round(iscale[:, None] * scales).clamp(-32, 31) + 32, torch.zeros_like(scales))
        dh = _half(torch.where(has, _div(1, iscale), torch.zeros_like(iscale)))
        s6 = torch.where(has[:, None], l6 - 32, torch.zeros_like(l6))
    else:  # quantize_row_q3_K_impl
        w, sw = _importance(x, qw, _div(2 * _seq_sum(x * x), 256), 16)
        scales, L = make_qx_quants(x.reshape(B * 16, 16), 4, w)
        d_block, l6 = make_qx_quants(scales.reshape(B, 16), 32, sw.reshape(B, 16))
        dh = _half(d_block)
        s6 = l6 - 32
    l6 = l6.to(torch.int64)
    sc = torch.zeros(B, 12, dtype=torch.int64)
    sc[:, :8] = (l6[:, :8] & 0xF) | ((l6[:, 8:] & 0xF) << 4)
    sc[:, 8:] = ((l6 >> 4).reshape(B, 4, 4) << (2 * torch.arange(4).view(1, 4, 1))).sum(1)  # [j // 4, j % 4]
    L = _requantize(x, L, _unhalf(dh)[:, None] * s6.to(F32), None, -4, 3)
    hmask = ((L > 3).reshape(B, 8, 32).to(torch.int64) << torch.arange(8).view(1, 8, 1)).sum(1)
    return torch.cat([hmask.to(torch.uint8), _crumbs(torch.where(L > 3, L - 4, L)), sc.to(torch.uint8), dh], 1)


def _q6_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    B = x.shape[0]
    scales, L = make_qx_quants(x.reshape(B * 16, 16), 32, None if qw is None else qw.reshape(B * 16, 16))
    scales = scales.reshape(B, 16)
    amax, max_scale = _first_absmax(scales)
    zero = amax < _EPS
    iscale = _div(-128, torch.where(zero, torch.ones_like(max_scale), max_scale))
    dh = _half(_div(1, iscale))
    s8 = _round(iscale[:, None] * scales).clamp(max=127)
    L = _requantize(x, L, _unhalf(dh)[:, None] * s8, None, -32, 31).reshape(B, 2, 4, 32)
    ql = torch.stack([(L[:, :, 0] & 15) | ((L[:, :, 2] & 15) << 4), (L[:, :, 1] & 15) | ((L[:, :, 3] & 15) << 4)], 2)
    qh = (L >> 4) << (2 * torch.arange(4).view(1, 1, 4, 1))
    out = torch.cat([ql.reshape(B, 128).to(torch.uint8), qh.sum(2).reshape(B, 64).to(torch.uint8),
                     s8.to(torch.int8).view(torch.uint8), dh], 1)
    return torch.where(zero[:, None], torch.zeros_like(out), out)


_QUANT = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
          "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def _check(kind: str, cols: int) -> tuple[int, int]:
    if kind not in BLOCK:
        raise ValueError(f"unknown GGUF block type {kind!r}; known: {', '.join(TYPES)}")
    n, nbytes = BLOCK[kind]
    if cols % n:
        raise ValueError(f"{kind} needs rows whose length is a multiple of {n}; got {cols}")
    return n, nbytes


def quantize(w: torch.Tensor, kind: str, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """w (rows, cols) -> uint8 (rows, cols / n * block bytes), as llama.cpp's quantize_<kind>:
    the reference quantizer, or with `imatrix` (cols,) (mean squared activation per input
    column) the importance-weighted one (quantize_row_<kind>_impl; Q8_0 has none)."""
    rows, cols = w.shape
    n, nbytes = _check(kind, cols)
    x = w.detach().to(F32).contiguous()
    qw = None
    if imatrix is not None and kind != "Q8_0":
        if imatrix.shape != (cols,):
            raise ValueError(f"the importance matrix of a tensor with {cols} columns has {cols} entries; got {tuple(imatrix.shape)}")
        qw = imatrix.detach().to(F32).reshape(1, cols).expand(rows, cols).reshape(-1, n)
        if kind in LEGACY:  # weights qw * sqrt(sigma2 + x^2), sigma2 over the whole row
            sigma2 = _div(_seq_sum(x * x), cols).repeat_interleave(cols // n)
            xb = x.reshape(-1, n)
            qw = qw * _sqrt(sigma2[:, None] + xb * xb)
    fast = _compiled("quantize_legacy") if qw is None else None
    out = fast(x, kind, nbytes) if fast is not None else None  # the compiled reference quantizer, same bytes
    if out is not None:
        return out.view(rows, cols // n * nbytes)
    return _QUANT[kind](x.reshape(-1, n), qw).reshape(rows, cols // n * nbytes)


# ---------------------------------------------------------------- dequantization (ggml's dequantize_row_*)


# Every type decodes to an affine form: groups of GROUP[kind] weights, each w = scale * q + offset
# with q an unsigned code (< 2^8) and fp32 scale / offset. Each product and sum is exact in fp32
# (fp16 d times a 6-8 bit scale times a code of at most 6 bits stays within 24 bits), so
# scale * q + offset equals ggml's dequantize_row_* bit for bit, and a kernel can run on the codes.
GROUP = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32,
         "Q2_K": 16, "Q3_K": 16, "Q4_K": 32, "Q5_K": 32, "Q6_K": 16}


def _affine_legacy(b: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = _unhalf(b[:, 0:2])[:, None]
    if kind == "Q8_0":  # signed codes, stored + 128
        return (b[:, 2:].contiguous().view(torch.int8).to(torch.int64) + 128), d, -128 * d
    if kind in ("Q4_0", "Q5_0"):
        q = _unnibbles(b[:, -16:])
        if kind == "Q5_0":
            q = q | (_bits32(b[:, 2:6]) << 4)
        return q, d, -(8 if kind == "Q4_0" else 16) * d
    m = _unhalf(b[:, 2:4])[:, None]
    q = _unnibbles(b[:, -16:])
    if kind == "Q5_1":
        q = q | (_bits32(b[:, 4:8]) << 4)
    return q, d, m


def _affine_k(b: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B = b.shape[0]
    if kind in ("Q4_K", "Q5_K"):
        d, dmin = _unhalf(b[:, 0:2]), _unhalf(b[:, 2:4])
        ls, lm = _unpack_scale_min_k4(b[:, 4:16])
        ql = b[:, -128:].to(torch.int64).reshape(B, 4, 1, 32)
        q = (ql >> (4 * torch.arange(2).view(1, 1, 2, 1))) & 15                   # (B, 4, 2, 32)
        if kind == "Q5_K":
            qh = b[:, 16:48].to(torch.int64).reshape(B, 1, 1, 32)
            shift = 2 * torch.arange(4).view(1, 4, 1, 1) + torch.arange(2).view(1, 1, 2, 1)
            q = q + 16 * ((qh >> shift) & 1)
        return q.reshape(B, 256), d[:, None] * ls.to(F32), -(dmin[:, None] * lm.to(F32))
    if kind == "Q2_K":
        sc = b[:, :16].to(torch.int64)
        d, dmin = _unhalf(b[:, 80:82]), _unhalf(b[:, 82:84])
        q = _uncrumbs(b[:, 16:80])
        return q, d[:, None] * (sc & 0xF).to(F32), -(dmin[:, None] * (sc >> 4).to(F32))
    if kind == "Q3_K":  # codes -4..3, stored + 4
        hm = b[:, :32].to(torch.int64)
        high = (hm[:, None, :] >> torch.arange(8).view(1, 8, 1)) & 1                # (B, 8, 32): element 32k + m
        q = _uncrumbs(b[:, 32:96]) + 4 * high.reshape(B, 256)
        sc = b[:, 96:108].to(torch.int64)
        low = torch.cat([sc[:, :8] & 0xF, sc[:, :8] >> 4], 1)
        hi2 = (sc[:, 8:12][:, None, :] >> (2 * torch.arange(4).view(1, 4, 1))) & 3     # [j // 4, j % 4]
        scale = _unhalf(b[:, 108:110])[:, None] * ((low | (hi2.reshape(B, 16) << 4)) - 32).to(F32)
        return q, scale, -4 * scale
    # Q6_K: codes -32..31, stored + 32
    ql = b[:, :128].to(torch.int64).reshape(B, 2, 2, 32)                          # [half, 0/32, l]
    qh = b[:, 128:192].to(torch.int64).reshape(B, 2, 1, 32)
    lo = torch.stack([ql & 15, ql >> 4], 2).reshape(B, 2, 4, 32)                   # quarters 0, 1, 2, 3
    q = lo | (((qh >> (2 * torch.arange(4).view(1, 1, 4, 1))) & 3) << 4)
    scale = _unhalf(b[:, 208:210])[:, None] * b[:, 192:208].contiguous().view(torch.int8).to(F32)
    return q.reshape(B, 256), scale, -32 * scale


def affine(data: torch.Tensor, kind: str, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 (rows, row bytes) -> (codes uint8 (rows, cols), scale fp32 (rows, cols / g), offset
    fp32 (rows, cols / g)) with g = GROUP[kind]: weight = scale * code + offset, exactly."""
    n, nbytes = _check(kind, cols)
    rows, g = data.shape[0], GROUP[kind]
    b = data.reshape(-1, nbytes)
    q, scale, offset = (_affine_legacy if kind in LEGACY else _affine_k)(b, kind)
    return (q.to(torch.uint8).reshape(rows, cols), scale.reshape(rows, cols // g).contiguous(),
            offset.reshape(rows, cols // g).contiguous())


def dequantize(data: torch.Tensor, kind: str, cols: int) -> torch.Tensor:
    """uint8 (rows, row bytes) -> fp32 (rows, cols): ggml's dequantize_row_<kind>."""
    q, scale, offset = affine(data, kind, cols)
    g = GROUP[kind]
    rows = q.shape[0]
    w = q.reshape(rows, cols // g, g).to(F32) * scale[..., None] + offset[..., None]
    return w.reshape(rows, cols)


def rounded(w: torch.Tensor, kind: str) -> torch.Tensor:
    """w (rows, cols) as a GGUF tensor of type `kind` holds it, back in fp32: the reference quantizer's
    blocks dequantized (what llama.cpp computes with), or F16 / BF16 / F32 values."""
    if kind in BLOCK:
        return dequantize(quantize(w, kind), kind, w.shape[1]).reshape(w.shape)
    if kind == "F32":
        return w.detach().float().clone()
    return w.detach().to({"F16": torch.float16, "BF16": torch.bfloat16}[kind]).float()
