"""Fake quantization for quantization-aware training (methods/qat.py).

FakeQuantLinear holds an fp32 weight that trains; its forward multiplies by that weight as a stored
format will hold it (`rounding(weight)`: the codes and scales the format's own quantizer writes,
dequantized: the same values the exported file computes with), its backward hands the gradient of
that product to the fp32 weight unchanged (the straight-through estimator, Bengio et al. 2013).
The weight is rounded again at every forward, so the codes follow the training.

With `rank` > 0 the weight is frozen and a low-rank update trains instead (QAT + LoRA): the forward
rounds the merged weight W + (alpha / rank) B A, so the model the format will hold after the merge is
the one that trained (not W's rounding plus an fp32 adapter beside it); only A and B (and their
optimizer state) are kept per step, B starts at zero, A as PEFT's Kaiming-uniform.

    layer = FakeQuantLinear(linear, functools.partial(kquants.rounded, kind="Q4_0"))
    layer.to_linear()            # the trained fp32 weight as a plain nn.Linear, for the real quantizer
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

Rounding = Callable[[torch.Tensor], torch.Tensor]  # fp32 (out, in) -> fp32 (out, in), as stored


class _StraightThrough(torch.autograd.Function):
    """Forward: the rounded weight exactly (w + (q - w).detach() would not give q's bits back in
    fp32); backward: the gradient to the unrounded weight."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return rounded

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return grad, None


def straight_through(weight: torch.Tensor, rounding: Rounding) -> torch.Tensor:
    """rounding(weight) in the forward, the identity's gradient in the backward."""
    with torch.no_grad():
        q = rounding(weight.detach().float()).to(weight.dtype)
    return _StraightThrough.apply(weight, q)


class FakeQuantLinear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear, rounding: Rounding, label: str = "", rank: int = 0,
                 alpha: float | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.nn.Parameter(linear.weight.detach().float().clone(), requires_grad=rank == 0)
        self.bias = (None if linear.bias is None else
                     torch.nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False))
        self.rounding, self.label, self.rank = rounding, label, rank
        if rank:
            self.scaling = (alpha if alpha is not None else rank) / rank
            self.lora_A = torch.nn.Parameter(torch.empty(rank, self.in_features))
            torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B = torch.nn.Parameter(torch.zeros(self.out_features, rank))

    def merged_weight(self) -> torch.Tensor:
        """The fp32 weight the format will round: W, or W + scaling * B A."""
        return self.weight if not self.rank else self.weight + self.scaling * (self.lora_B @ self.lora_A)

    def rounded_weight(self) -> torch.Tensor:
        """The weight as the format stores it now (fp32)."""
        with torch.no_grad():
            return self.rounding(self.merged_weight().detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = straight_through(self.merged_weight(), self.rounding)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def to_linear(self) -> torch.nn.Linear:
        """The trained fp32 weight (merged, with a rank) and bias as a plain nn.Linear."""
        lin = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        with torch.no_grad():
            lin.weight = torch.nn.Parameter(self.merged_weight().detach().clone(), requires_grad=False)
        if self.bias is not None:
            lin.bias = torch.nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.label}"
                + (f", rank={self.rank}" if self.rank else ""))
