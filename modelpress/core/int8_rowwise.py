"""LLM.int8() (Dettmers et al. 2022, arXiv:2208.07339) as bitsandbytes 0.50 computes it.

Weights, once: through fp16, one absmax per output row,
    SCB = max_j |fp16(W)[o, j]|        CB = round(fp16(W) * (127 / SCB))   int8 in -127..127
Activations, per call: a = fp16(x); with threshold t > 0 the input columns where any row has
|a| >= t are outliers and run in fp32 against the dequantized weight columns; every other value
is quantized row-wise like the weights (SCA, CA) and multiplied in integers:
    y = (CA @ CB^T) * (SCA * SCB) / 127^2  + bias  +  x[:, outliers] @ (CB[:, outliers] * SCB / 127)^T
threshold 0 means no outlier columns (plain int8 weights and activations).
"""
from __future__ import annotations

import torch

# bitsandbytes' constants: 1/127 and 1/127^2 as float literals
INV_127 = 7.874015718698502e-3
INV_127_SQ = 6.200124e-05
# int8 x int8 products summed over at most this many columns stay below 2^24, so fp32 holds the
# integer sums exactly whatever order a GEMM adds them in
_EXACT_FP32_COLS = 1040


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB int8 (rows, cols), SCB fp32 (rows,)) of a weight matrix, via fp16 as bitsandbytes does."""
    w16 = w.to(torch.float16)
    scb = w16.abs().amax(-1).float()
    cb = torch.round(w16 * (127.0 / scb.unsqueeze(-1))).to(torch.int8)
    return cb, scb


def dequantize_rows(cb: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    return cb * scb.view(-1, 1) * INV_127


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 a @ b^T for int8 a (m, k), b (n, k), with fp32 GEMMs on column slices short
    enough to be exact (torch._int_mm is exact too, but ~50x slower on CPUs without AVX-512)."""
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.int32)
    for j in range(0, a.shape[1], _EXACT_FP32_COLS):
        sl = slice(j, j + _EXACT_FP32_COLS)
        out += (a[:, sl].float() @ b[:, sl].float().t()).to(torch.int32)
    return out


def quantize_activations(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CA int8 (m, k), SCA fp32 (m,), outlier column indices) of 2-D activations."""
    a = x.to(torch.float16)
    cols = torch.empty(0, dtype=torch.int64)
    if threshold > 0.0:
        outliers = a.abs() >= threshold
        if outliers.any():
            cols = torch.argwhere(outliers.any(dim=0)).view(-1)
            a = a.masked_fill(outliers, 0)
    sca = a.abs().amax(-1).float()
    inv = torch.where(sca > 0, 127.0 / sca, torch.zeros_like(sca))  # an all-zero row stays zero
    ca = torch.round(a * inv.unsqueeze(-1)).to(torch.int8)
    if cols.numel():
        ca[:, cols] = 0
    return ca, sca, cols


def int8_linear(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None,
                threshold: float) -> torch.Tensor:
    """y = x @ W^T (+ bias) the LLM.int8() way; x (..., k) fp32 or bf16, output in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    ca, sca, cols = quantize_activations(x2, threshold)
    y = int_matmul(ca, cb) * (sca.unsqueeze(-1) * scb.unsqueeze(0)) * INV_127_SQ
    if bias is not None:
        y = y + bias
    y = y.to(x.dtype)
    if cols.numel():
        y = y.addmm(x2[:, cols], dequantize_rows(cb[:, cols], scb).to(x.dtype).t())
    return y.reshape(*shape[:-1], cb.shape[0])
