"""Folding a batch norm (inference statistics) into the convolution or linear layer before it, as
TensorRT's and PyTorch's Conv-BN fusion do:

    BN(y) = (y - mean) / sqrt(var + eps) * gamma + beta,  y = W x + b
          = (W * g) x + (b - mean) * g + beta,            g = gamma / sqrt(var + eps) per output channel
"""
from __future__ import annotations

import torch


def fold_batch_norm(weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor, var: torch.Tensor,
                    gamma: torch.Tensor | None, beta: torch.Tensor | None, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the layer computing BN(layer(x)); weight (out, ...), the rest (out,)."""
    g = torch.rsqrt(var.double() + eps)
    if gamma is not None:
        g = g * gamma.double()
    b = torch.zeros_like(mean, dtype=torch.float64) if bias is None else bias.double()
    b = (b - mean.double()) * g + (0.0 if beta is None else beta.double())
    w = weight.double() * g.reshape(-1, *([1] * (weight.dim() - 1)))
    return w.to(weight.dtype), b.to(weight.dtype)
