"""Integer grids: choose_qparams / quantize / dequantize for weight-only affine quantization.

Convention (one for every bit width):
    W: (out_features, in_features), grouped along the input dimension in runs of `group_size`
    (None = one group per output row, i.e. per-channel). A last partial group is padded with
    zeros for the statistics only; zeros change neither absmax nor the (0-including) min/max.
    codes: uint8 in [0, 2**bits - 1], one per weight
    scale: fp16 (out, n_groups); zero_point: uint8 (out, n_groups), or None when symmetric,
    where the zero point is implicitly 2**(bits-1)
    W_hat = (codes - zero_point) * scale
Symmetric: scale = absmax / (2**(bits-1) - 1), so -absmax..absmax maps onto -qmax..qmax and the
extra negative level -qmax-1 is only reached by clamping. Asymmetric: scale = (max - min) /
(2**bits - 1) over the range widened to include 0, zero_point = round(-min / scale).
Scales are rounded to fp16 before the codes are computed, so stored scales reproduce W_hat exactly.
"""
from __future__ import annotations

import math

import torch

SCALE_DTYPE = torch.float16
_MIN_SCALE = torch.finfo(torch.float16).tiny  # smallest normal fp16: a zero group stays exact


def n_groups(in_features: int, group_size: int | None) -> int:
    return 1 if group_size is None else math.ceil(in_features / group_size)


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(out, in) -> (out, n_groups, group) in fp32, zero-padding a last partial group."""
    out, inf = w.shape
    gs = inf if group_size is None else group_size
    pad = n_groups(inf, group_size) * gs - inf
    w = w.float()
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(out, -1, gs)


def choose_qparams(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest scale (fp16) and zero point (uint8 or None) for each (row, group)."""
    g = _grouped(w, group_size)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = g.abs().amax(-1) / qmax
        return scale.clamp(min=_MIN_SCALE).to(SCALE_DTYPE), None
    lo = g.amin(-1).clamp(max=0)
    hi = g.amax(-1).clamp(min=0)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp(min=_MIN_SCALE).to(SCALE_DTYPE)
    zero_point = torch.round(-lo / scale.float()).clamp(0, 2 ** bits - 1).to(torch.uint8)
    return scale, zero_point


def _expand(t: torch.Tensor, group_size: int | None, in_features: int) -> torch.Tensor:
    """(out, n_groups) -> (out, in_features), each group's value repeated along its columns."""
    gs = in_features if group_size is None else group_size
    return t.float().repeat_interleave(gs, dim=1)[:, :in_features]


def _zero(zero_point: torch.Tensor | None, bits: int) -> torch.Tensor | float:
    return float(2 ** (bits - 1)) if zero_point is None else zero_point


def quantize(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int,
             group_size: int | None) -> torch.Tensor:
    """Codes (uint8, same shape as w) for the given qparams."""
    inf = w.shape[1]
    s = _expand(scale, group_size, inf)
    z = _zero(zero_point, bits)
    z = _expand(z, group_size, inf) if isinstance(z, torch.Tensor) else z
    q = torch.round(w.float() / s) + z
    return q.clamp(0, 2 ** bits - 1).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
               bits: int, group_size: int | None) -> torch.Tensor:
    """W_hat (fp32) = (codes - zero_point) * scale."""
    inf = codes.shape[1]
    z = _zero(zero_point, bits)
    z = _expand(z, group_size, inf) if isinstance(z, torch.Tensor) else z
    return (codes.float() - z) * _expand(scale, group_size, inf)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest: (codes, scale, zero_point)."""
    scale, zero_point = choose_qparams(w, bits, group_size, symmetric)
    return quantize(w, scale, zero_point, bits, group_size), scale, zero_point


def activation_scales(x: torch.Tensor, granularity: str, input_scale: torch.Tensor | None) -> torch.Tensor:
    """W8A8's per-row activation scales (rows,) of x (rows, in): the static scale, or max |x| / 127 per
    token or per tensor (a zero max gives 1)."""
    if input_scale is not None:
        return input_scale.float().reshape(1).expand(x.shape[0])
    mx = x.abs().amax(-1) if granularity == "token" else x.abs().amax().expand(x.shape[0])
    return torch.where(mx > 0, mx / 127.0, torch.ones_like(mx))
