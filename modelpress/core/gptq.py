"""GPTQ (Frantar et al. 2022, arXiv:2210.17323), as AutoGPTQ / GPTQModel's `fasterquant` does it.

    result = gptq_quantize(W, H, config)

W: (out, in) weight; H: (in, in) = 2 X^T X / n (core/hessian.py), both worked on in fp32 (fp64
if given fp64, as the tests do); config: any object with
    bits (2, 3, 4, 8), group_size (int or None), symmetric, act_order, static_groups,
    damp (fraction of mean diag H), block_size (lazy-batch width, 128), mse (clipping search)
(methods/gptq.py's GPTQConfig is one). Steps, as in the reference:
 1. dead columns (H[i, i] == 0): H[i, i] = 1, W[:, i] = 0
 2. static groups: every group's qparams from the unmodified W, in the original column order
 3. act order: columns sorted by decreasing diag H; W and H permuted alike
 4. damping, then U = upper Cholesky factor of H^-1 (raised damping if H is not PD)
 5. sweep blocks of block_size columns: per column, at a group's first column -> qparams from
    W[:, col:col + group] as the lazy batch left it (earlier blocks' updates applied, this
    block's not: the reference's order); q = quantize(w); err = (w - q) / U[i, i]; update the
    block's remaining columns by err x U[i, i:]; after the block, all later columns at once
Quantization grid (AutoGPTQ's Quantizer): asymmetric: range [min(w, 0), max(w, 0)], scale =
range / maxq, zero = round(-min / scale); symmetric: scale = 2 max|w| / maxq, zero = (maxq + 1) / 2.
Scales are rounded to fp16 before use, so the stored scales reproduce the sweep's values exactly.
With mse, the range is shrunk by p = 1 - i/100, i < 80, keeping the p of least sum |w - q|^2.4.

Groups and column order: with act order and no static groups, the groups are runs of the
*permuted* columns. The result then holds the codes in permuted column order (`perm` given,
groups contiguous there, each group's columns in ascending original order, so that the
permutation follows from the groups alone); a layer computes y = W_perm @ x[perm]. Formats with
a g_idx (HF GPTQ) get g_idx[perm[j]] = j // group_size.
"""
from __future__ import annotations

import dataclasses

import torch

from . import hessian

_SCALE_DTYPE = torch.float16
_MIN_SCALE = torch.finfo(torch.float16).tiny


@dataclasses.dataclass
class GPTQResult:
    codes: torch.Tensor            # uint8 (out, in), columns in `perm` order when perm is given
    scale: torch.Tensor            # fp16 (out, n_groups)
    zero_point: torch.Tensor       # uint8 (out, n_groups) (symmetric: all (maxq + 1) / 2)
    perm: torch.Tensor | None      # int64 (in,): stored column j is original column perm[j]
    weight: torch.Tensor           # fp32 (out, in) dequantized, original column order
    loss: float                    # sum over columns of (w - q)^2 / U[i, i]^2 / 2, as GPTQ reports


def qparams(x: torch.Tensor, bits: int, symmetric: bool, mse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale (rows,) rounded to fp16, zero (rows,)), in x's dtype, for the rows of x (rows, cols)."""
    maxq = 2 ** bits - 1
    xmin = x.amin(1).clamp(max=0)
    xmax = x.amax(1).clamp(min=0)
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(both_zero, -1.0, xmin), torch.where(both_zero, 1.0, xmax)

    def grid(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = ((hi - lo) / maxq).clamp(min=_MIN_SCALE).to(_SCALE_DTYPE).to(x.dtype)
        zero = torch.full_like(scale, (maxq + 1) / 2) if symmetric else torch.round(-lo / scale).clamp(0, maxq)
        return scale, zero

    scale, zero = grid(xmin, xmax)
    if mse:
        best = torch.full_like(scale, float("inf"))
        for i in range(80):  # AutoGPTQ: grid 100, maxshrink 0.8, norm 2.4
            p = 1 - i / 100
            s1, z1 = grid(p * xmin, p * xmax)
            err = (dequant(quant(x, s1[:, None], z1[:, None], maxq), s1[:, None], z1[:, None]) - x).abs_().pow_(2.4).sum(1)
            better = err < best
            best, scale, zero = torch.where(better, err, best), torch.where(better, s1, scale), torch.where(better, z1, zero)
    return scale, zero


def quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def dequant(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, config) -> GPTQResult:  # noqa: ANN001 (duck-typed config)
    """Quantize W (out, in) against the Hessian H (in, in); see the module docstring."""
    bits, gs = config.bits, config.group_size
    maxq = 2 ** bits - 1
    rows, cols = W.shape
    gs = cols if gs is None else gs
    H, W = hessian.prepare(H, W, 0.0)  # step 1 (damping comes after the permutation, as in the reference)
    static = [qparams(W[:, g:g + gs], bits, config.symmetric, config.mse) for g in range(0, cols, gs)] \
        if config.static_groups else None                                           # step 2
    perm = None
    if config.act_order:                                                            # step 3
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(config.damp * torch.mean(torch.diag(H)))                      # step 4
    U = hessian.inverse_cholesky(H, config.damp)

    Q = torch.zeros_like(W)
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
    n_groups = -(-cols // gs)
    scales = torch.zeros(rows, n_groups, dtype=W.dtype, device=W.device)
    zeros = torch.zeros(rows, n_groups, dtype=W.dtype, device=W.device)
    losses = torch.zeros(rows, dtype=W.dtype, device=W.device)
    scale = zero = None
    for i1 in range(0, cols, config.block_size):                                    # step 5
        i2 = min(i1 + config.block_size, cols)
        W1 = W[:, i1:i2].t().clone()  # the block transposed: each column a contiguous row
        C1, Q1 = torch.empty_like(W1), torch.empty_like(W1)  # codes, dequantized
        Err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal().tolist()
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                scale, zero = static[(col if perm is None else int(perm[col])) // gs]
            elif col % gs == 0:  # from W, which holds the earlier blocks' updates but not this
                # block's (W1): the reference's order of operations, kept for fidelity
                scale, zero = qparams(W[:, col:col + gs], bits, config.symmetric, config.mse)
                scales[:, col // gs], zeros[:, col // gs] = scale, zero
            w = W1[i]
            C1[i] = quant(w, scale, zero, maxq)
            Q1[i] = dequant(C1[i], scale, zero)
            err = (w - Q1[i]).div_(d[i])
            W1[i:].addr_(U1[i, i:], err, alpha=-1)  # the block's remaining columns
            Err1[i] = err
        codes[:, i1:i2] = C1.t().to(torch.uint8)
        Q[:, i1:i2] = Q1.t()
        losses += Err1.square().sum(0)  # (w - q)^2 / U[i, i]^2 per column
        W[:, i2:] -= Err1.t() @ U[i1:i2, i2:]
    if static is not None:  # static groups stay in the original order: store codes that way too
        for g, (s, z) in enumerate(static):
            scales[:, g], zeros[:, g] = s, z
        if perm is not None:
            inv = torch.argsort(perm)
            codes, Q, perm = codes[:, inv], Q[:, inv], None
    if perm is not None:  # canonical order: groups in sweep order, inside a group ascending columns
        inv = torch.argsort(perm)
        g_idx = (torch.arange(cols, device=W.device) // gs)[inv]          # group of each original column
        canon = torch.argsort(g_idx, stable=True)
        codes, Q, perm = codes[:, inv][:, canon], Q[:, inv][:, canon], canon
    weight = Q if perm is None else Q[:, torch.argsort(perm)]
    return GPTQResult(codes, scales.to(_SCALE_DTYPE), zeros.to(torch.uint8), perm, weight.float(),
                      losses.sum().item() / 2)
