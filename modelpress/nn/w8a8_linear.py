"""W8A8Linear: int8 weights (symmetric, one scale per output channel) times int8 activations
(symmetric: one static scale from calibration, or dynamic per token / per tensor), int32 sums.

State dict, as compressed-tensors' "int-quantized" layers name it (vLLM's W8A8 checkpoints):
    weight        int8 (out, in)        -127..127
    weight_scale  fp32 (out, 1)         W = weight * weight_scale
    input_scale   fp32 (1,)             static activations only: x ~ clamp(round(x / s), -128, 127) * s
                                        (vLLM's and compressed-tensors' int8 range)
    bias          fp32 (out,)           as the original layer
Forward: y = (q_x @ weight^T) * (s_x * weight_scale) + bias with exact integer sums: the C kernel
(kernels/gemm_int8.c, VNNI / AVX2 / plain; the variant `modelpress tune` chose for the shape) on a CPU, torch._int_mm on CUDA, a float64 product of
the integers elsewhere (exact below 2^53); the three give the same numbers.
"""
from __future__ import annotations

import torch

from .. import kernels
from ..core.grids import activation_scales
from ..kernels import ops, tune
from .frozen import frozen_product, wants_input_grad

GRANULARITIES = ("tensor", "token")


def quantize_activations(x2: torch.Tensor, granularity: str, input_scale: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s): the int8 values of x (rows, in) as floats, clamp(round(x / s), -128, 127), and the row
    scales (rows,)."""
    s = activation_scales(x2, granularity, input_scale)
    return torch.round(x2 / s[:, None]).clamp(-128, 127), s


class W8A8Linear(torch.nn.Module):
    def __init__(self, in_features: int, out_features: int, static: bool = True, granularity: str = "tensor",
                 bias: bool = False) -> None:
        super().__init__()
        if granularity not in GRANULARITIES or (static and granularity != "tensor"):
            raise ValueError(f"activations are static per tensor, or dynamic per tensor / token; got "
                             f"{'static' if static else 'dynamic'} per {granularity}")
        self.in_features, self.out_features, self.granularity = in_features, out_features, granularity
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, 1))
        self.register_buffer("input_scale", torch.ones(1) if static else None)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed: tuple[torch.Tensor, torch.Tensor, int] | None = None

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias: torch.Tensor | None, input_scale: float | None,
                    granularity: str = "tensor") -> "W8A8Linear":
        """From a float weight (out, in): symmetric per-channel int8; `input_scale` None: dynamic."""
        m = cls(w.shape[1], w.shape[0], input_scale is not None, granularity, bias is not None)
        w = w.detach().float()
        scale = w.abs().amax(1, keepdim=True) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        m.weight = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
        m.weight_scale = scale
        if input_scale is not None:
            m.input_scale = torch.tensor([float(input_scale)])
        if bias is not None:
            m.bias = bias.detach().float().clone()
        return m

    @property
    def static(self) -> bool:
        return self.input_scale is not None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale.float()).to(dtype)

    def _kernel_weights(self, lib) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        version = self.weight._version
        if self._packed is None or self._packed[2] != version:
            self._packed = (*ops.w8a8_pack(lib, self.weight.contiguous()), version)
        return self._packed[0], self._packed[1]

    def reference(self, x2: torch.Tensor) -> torch.Tensor:
        """The product without the CPU kernel: (rows, in) fp32 -> (rows, out) fp32."""
        q, s = quantize_activations(x2, self.granularity, self.input_scale)
        if x2.is_cuda and x2.shape[0] > 16 and self.in_features % 8 == 0 and self.out_features % 8 == 0:
            acc = torch._int_mm(q.to(torch.int8), self.weight.t())
        else:  # integers below 2^53: a float64 product sums them exactly
            acc = (q.double() @ self.weight.double().t()).to(torch.int32)
        y = acc.float() * (s[:, None] * self.weight_scale.float().reshape(1, -1))
        return y if self.bias is None else y + self.bias.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if wants_input_grad(x):  # a frozen base under a training graph (nn/frozen.py)
            return frozen_product(self, x)
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        lib = kernels.lib() if x.device.type == "cpu" else None
        if lib is None:
            y = self.reference(x2)
        else:  # the variant `modelpress tune` chose for this shape (kernels/tune.py), if any: same numbers
            packed, colsum = self._kernel_weights(lib)
            mode = "static" if self.static else self.granularity
            name = tune.choice(self.in_features, self.out_features, x2.shape[0]) or tune.DEFAULT
            y = tune.run_variant(name, x2, self.weight, packed, colsum, self.weight_scale.float().reshape(-1),
                                 self.bias, mode, self.input_scale)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def meta(self) -> dict:
        """What a checkpoint records to rebuild this module before loading its tensors."""
        return {"class": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features,
                "static": self.static, "granularity": self.granularity, "bias": self.bias is not None}

    def extra_repr(self) -> str:
        acts = "static per tensor" if self.static else f"dynamic per {self.granularity}"
        return f"{self.in_features} -> {self.out_features}, int8 weights per channel, int8 activations {acts}"
