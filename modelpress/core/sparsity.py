"""Pruning criteria for one linear layer's weight W (out, in): magnitude, Wanda and SparseGPT, at an
unstructured sparsity or an N:M pattern (N zeros in every M consecutive inputs of a row: 2:4 is the
hardware format of sparse tensor cores).

- magnitude: the smallest |W_ij| go, over the whole layer (unstructured) or within each N:M group.
- Wanda (arXiv:2306.11695): score |W_ij| * ||X_j||_2 (X: the layer's calibration inputs), the lowest
  scores of each output row go (its per-output comparison group), or within each N:M group; no update.
- SparseGPT (arXiv:2301.00774, the authors' `fasterprune`): columns in lazy blocks of `blocksize`;
  in each block the mask keeps the weights of highest w^2 / [H^-1]_jj^2 (unstructured: one threshold
  over the block's rows and columns; N:M: per row and group, chosen when the sweep reaches the group),
  and each pruned (optionally also rounded) column's error is spread over the columns not yet reached
  through the Cholesky factor of H^-1 (H = 2 X^T X / n, core/hessian.py, damped as GPTQ's).
  With `bits`, each kept weight is also rounded in the same sweep (joint sparsity + quantization):
  asymmetric group parameters (RTN's min-max grid, core/grids.py) from W as the lazy updates left it
  when the sweep reaches the group (AutoGPTQ's choice; per channel: the whole W before the sweep, as
  the SparseGPT reference); a pruned weight rounds to its zero point's code, i.e. exactly 0.
"""
from __future__ import annotations

import dataclasses

import torch

from . import grids
from .hessian import inverse_cholesky, prepare


def _check(sparsity: float, n: int, m: int) -> None:
    if m:
        if not 0 < n < m:
            raise ValueError(f"an N:M pattern needs 0 < N < M, got {n}:{m}")
    elif not 0 <= sparsity < 1:
        raise ValueError(f"sparsity is the fraction of weights set to zero, in [0, 1); got {sparsity}")


def _nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where a weight goes: the n lowest scores of each run of m columns of each row."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"an {n}:{m} pattern needs a multiple of {m} input columns, got {cols}")
    s = score.reshape(rows, cols // m, m)
    idx = torch.topk(s, n, dim=-1, largest=False).indices
    return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True).reshape(rows, cols)


def magnitude_mask(w: torch.Tensor, sparsity: float = 0.5, n: int = 0, m: int = 0) -> torch.Tensor:
    """True where magnitude pruning zeroes w: the round(sparsity * size) smallest |w| of the layer, or
    the n smallest of every m in a row."""
    _check(sparsity, n, m)
    score = w.detach().float().abs()
    if m:
        return _nm_mask(score, n, m)
    k = int(score.numel() * sparsity)
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[torch.argsort(score.reshape(-1), stable=True)[:k]] = True
    return mask.reshape(score.shape)


def wanda_mask(w: torch.Tensor, x_norm: torch.Tensor, sparsity: float = 0.5, n: int = 0, m: int = 0) -> torch.Tensor:
    """True where Wanda zeroes w: score |w_ij| * x_norm_j (x_norm: the l2 norm of input column j over the
    calibration tokens), the int(sparsity * in) lowest of each row, or the n lowest of every m."""
    _check(sparsity, n, m)
    score = w.detach().float().abs() * x_norm.float().reshape(1, -1)
    if m:
        return _nm_mask(score, n, m)
    k = int(score.shape[1] * sparsity)
    idx = torch.sort(score, dim=-1, stable=True).indices[:, :k]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)


@dataclasses.dataclass
class SparseGPTResult:
    weight: torch.Tensor                  # (out, in) fp32, pruned (and rounded, with bits) weights
    mask: torch.Tensor                    # (out, in) bool, True where pruned
    loss: torch.Tensor                    # (out,) the OBS error per row, sum of (w - q)^2 / [H^-1]_jj^2 / 2
    codes: torch.Tensor | None = None     # with bits: (out, in) uint8 codes, scales and zero points per group
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None


def sparsegpt(w: torch.Tensor, H: torch.Tensor, sparsity: float = 0.5, n: int = 0, m: int = 0,
              blocksize: int = 128, damp: float = 0.01, bits: int | None = None,
              group_size: int | None = None) -> SparseGPTResult:
    """SparseGPT on w (out, in) with the layer's Hessian H (in, in); see the module docstring."""
    _check(sparsity, n, m)
    if m and blocksize % m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M = {m}")
    H, W = prepare(H, w.detach().float(), damp)
    Hinv = inverse_cholesky(H, damp)
    rows, cols = W.shape
    g = group_size or cols
    if bits is not None and blocksize % g and g % blocksize:
        raise ValueError(f"blocksize {blocksize} and group size {g} must divide one another")
    mask = torch.zeros_like(W, dtype=torch.bool)
    losses = torch.zeros(rows, dtype=W.dtype)
    n_groups = -(-cols // g)
    scale = torch.zeros(rows, n_groups) if bits is not None else None
    zero = torch.zeros(rows, n_groups) if bits is not None else None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1, L1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros_like(W1)
        d = torch.diag(Hinv1)
        if m:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:  # one threshold over the block's rows and columns (the reference's adaptive mask selection)
            tmp = W1 ** 2 / d.reshape(1, -1) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        for i in range(i2 - i1):
            col = W1[:, i]
            if m and i % m == 0:
                tmp = W1[:, i:i + m] ** 2 / d[i:i + m].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, n, dim=1, largest=False).indices, True)
            q = col.clone()
            q[mask1[:, i]] = 0
            if bits is not None:
                j = i1 + i
                if j % g == 0:  # this group's grid, from W as the lazy updates left it (AutoGPTQ's choice)
                    s, z = grids.choose_qparams(W[:, j:j + g], bits, None, symmetric=False)
                    scale[:, j // g], zero[:, j // g] = s.float().reshape(-1), z.float().reshape(-1)
                s, z = scale[:, j // g], zero[:, j // g]
                q = (torch.clamp(torch.round(q / s) + z, 0, 2 ** bits - 1) - z) * s
            Q1[:, i] = q
            L1[:, i] = (col - q) ** 2 / d[i] ** 2
            err = (col - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        losses += L1.sum(1) / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    out = SparseGPTResult(W, mask, losses)
    if bits is not None:
        out.scale, out.zero_point = scale.to(grids.SCALE_DTYPE), zero.to(torch.uint8)
        out.codes = grids.quantize(W, out.scale, out.zero_point, bits, group_size)
    return out


# ---- 2:4 storage: the kept half of the values and a 2-bit position for each --------------------------
# Per row, each group of 4 inputs keeps 2 values (ascending positions i0 < i1 in 0..3); the values are
# stored in order, (out, in / 2), and the positions as the metadata of sparse tensor cores
# (cuSPARSELt / torch's semi-structured layout, before its hardware-specific interleaving): 4 bits a
# group, i0 | i1 << 2, two groups a byte, the lower group in the low nibble: (out, in / 8) uint8.
# A group with fewer than 2 non-zeros keeps zeros at its first free positions, so any 2:4-sparse
# weight (including one with extra zeros) round-trips exactly.

def is_24(w: torch.Tensor) -> bool:
    """Whether every run of 4 inputs of every row of w holds at most 2 non-zeros."""
    return w.shape[-1] % 8 == 0 and bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def pack_24(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (out, in / 2) in w's dtype, meta (out, in / 8) uint8) of a 2:4-sparse w (out, in);
    ValueError where w is not 2:4 sparse or in is not a multiple of 8."""
    rows, cols = w.shape
    if cols % 8:
        raise ValueError(f"2:4 storage needs a multiple of 8 input columns, got {cols}")
    g = w.reshape(rows, cols // 4, 4)
    nz = g != 0
    if bool((nz.sum(-1) > 2).any()):
        raise ValueError("the weight is not 2:4 sparse (a group of 4 inputs holds more than 2 non-zeros); "
                         "prune it with --pattern 2:4 first")
    # the non-zeros first, then the first free positions; of these the first two, in ascending order
    key = (~nz).to(torch.int64) * 4 + torch.arange(4)
    pos = torch.sort(torch.sort(key, dim=-1).values[..., :2] % 4, dim=-1).values       # (rows, groups, 2)
    values = torch.gather(g, -1, pos).reshape(rows, cols // 2).contiguous()
    nib = (pos[..., 0] | (pos[..., 1] << 2)).reshape(rows, cols // 8, 2)
    meta = (nib[..., 0] | (nib[..., 1] << 4)).to(torch.uint8)
    return values, meta


def unpack_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense (out, in) weight that pack_24 stored."""
    rows, half = values.shape
    m = meta.to(torch.int64)
    nib = torch.stack([m & 15, m >> 4], -1).reshape(rows, half // 2)                  # one nibble a group
    pos = torch.stack([nib & 3, nib >> 2], -1)                                        # (rows, groups, 2)
    out = torch.zeros(rows, half // 2, 4, dtype=values.dtype, device=values.device)
    out.scatter_(-1, pos, values.reshape(rows, half // 2, 2))
    return out.reshape(rows, half * 2)
