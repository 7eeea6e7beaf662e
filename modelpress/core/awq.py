"""AWQ numerics (Lin et al. 2023, arXiv:2306.00978), as AutoAWQ and llm-compressor compute them.

Scale search, for a group of "balance" layers that read the same input X (in channels):
    x_mean[c] = mean |X[:, c]|                      over the calibration tokens
    w_mean[c] = mean over the layers' rows of |W[r, c]| / max |W[r, group(c)]|   (group-normalized)
    s(r)      = x_mean^r / (w_mean^(1-r) + 1e-4)    (duo scaling; plain: x_mean^r), clamped >= 1e-4,
                then divided by sqrt(max s * min s)
for r on a grid of n_grid ratios in [0, 1]; the s whose Q(W * s) / s gives the parent module's
outputs the least mean squared error wins. The previous operation (a norm's weight, or the rows of
a linear layer) is divided by s, so the float model computes the same function.

Clip search (AutoAWQ `_compute_best_clip`), per output row and group: max |w| shrunk by
(1 - i / n_grid), i < max_shrink * n_grid, keeping the bound whose clamped-then-quantized group
reproduces x . w over sampled tokens with the least squared error.
"""
from __future__ import annotations

import torch

from . import grids


def search_grid(n_grid: int = 20, duo_scaling: bool = True) -> list[tuple[float, bool]]:
    """(ratio, duo) candidates: llm-compressor's order; with duo scaling (0, plain) comes first."""
    if duo_scaling:
        return [(0.0, False)] + [(i / (n_grid - 2), True) for i in range(n_grid - 1)]
    return [(i / (n_grid - 1), False) for i in range(n_grid)]


def weight_channel_mean(weights: list[torch.Tensor], group_size: int | None) -> torch.Tensor:
    """Per input channel mean of |W| normalized by its group's absmax, over all rows of all layers."""
    total, rows = 0.0, 0
    for w in weights:
        out, inf = w.shape
        gs = inf if group_size is None else group_size
        g = grids._grouped(w.abs(), gs)                               # (out, n_groups, gs)
        g = g / (g.amax(-1, keepdim=True) + 1e-6)
        total = total + g.reshape(out, -1)[:, :inf].sum(0, dtype=torch.float64)
        rows += out
    return (total / rows).float()


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, ratio: float, duo: bool) -> torch.Tensor:
    if duo:
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    else:
        s = x_mean.pow(ratio).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    s[torch.isinf(s) | torch.isnan(s)] = 1
    return s


def fake_quantize(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> torch.Tensor:
    """Round-to-nearest, dequantized (the quantizer AWQ searches against and finally applies)."""
    codes, scale, zp = grids.quantize_rtn(w, bits, group_size, symmetric)
    return grids.dequantize(codes, scale, zp, bits, group_size)


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                n_grid: int = 20, max_shrink: float = 0.5, n_tokens: int = 512, row_batch: int = 256) -> torch.Tensor:
    """Best clipping bound per (row, group): (out, n_groups). x: (tokens, in) inputs of the layer.

    AutoAWQ measures mean_t (x_t . w_g - x_t . q_g)^2 by running the sampled tokens through every
    candidate; the same number is d^T C_g d / T with d = w_g - q_g and C_g = sum_t x_tg x_tg^T,
    which costs group^2 instead of tokens x group per candidate (same result up to float order)."""
    out, inf = w.shape
    gs = inf if group_size is None else group_size
    if inf % gs:
        raise ValueError("clip search needs whole groups")
    G = inf // gs
    step = max(1, x.shape[0] // n_tokens)
    xs = x[::step][:n_tokens].float().reshape(-1, G, gs)                   # (T, G, gs)
    C = torch.einsum("tgi,tgj->gij", xs, xs) / xs.shape[0]                 # (G, gs, gs)
    best = torch.empty(out, G, device=w.device)
    for r0 in range(0, out, row_batch):
        wb = w[r0:r0 + row_batch].float().reshape(-1, G, gs)               # (R, G, gs)
        org_max = wb.abs().amax(-1, keepdim=True)                          # (R, G, 1)
        best_max, min_err = org_max.clone(), torch.full_like(org_max, float("inf"))
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)
            cur = torch.clamp(wb, -max_val, max_val)
            d = (wb - fake_quantize(cur.reshape(-1, gs), bits, None, symmetric).reshape(cur.shape)).transpose(0, 1)
            err = (torch.bmm(d, C) * d).sum(-1).transpose(0, 1).unsqueeze(-1)  # (R, G, 1)
            better = err < min_err
            min_err[better], best_max[better] = err[better], max_val[better]
        best[r0:r0 + row_batch] = best_max.reshape(-1, G)
    return best


def apply_clip(w: torch.Tensor, max_val: torch.Tensor, group_size: int | None) -> torch.Tensor:
    out, inf = w.shape
    gs = inf if group_size is None else group_size
    m = max_val.repeat_interleave(gs, dim=1)[:, :inf]
    return torch.max(torch.min(w, m), -m)
