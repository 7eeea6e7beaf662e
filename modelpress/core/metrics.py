"""Error and perplexity arithmetic."""
from __future__ import annotations

import math

import torch


def sqnr(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - approx|^2)."""
    ref, approx = ref.double(), approx.double()
    noise = (ref - approx).pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(ref.pow(2).sum().item() / noise)


def relative_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """|ref - approx| / |ref| in the Frobenius norm."""
    return ((ref.double() - approx.double()).norm() / ref.double().norm()).item()


def perplexity(nll_sum: float, count: int) -> float:
    """exp(mean negative log-likelihood) over `count` scored tokens."""
    return math.exp(nll_sum / count)
