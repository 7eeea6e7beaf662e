"""Sparse24Linear: a 2:4-sparse linear layer stored as its kept half and a 2-bit position for each
(core/sparsity.py's pack_24: the metadata layout of sparse tensor cores), 17/32 of the fp32 bytes (9/16 of
bf16 / fp16 with the values in that dtype: a bf16 / fp16 model's pruned layers keep them so).

State dict (a modelpress checkpoint saves it; its manifest records the class):
    values   (out, in / 2) in the layer's dtype: the two kept values of every 4 inputs, in order
    indices  uint8 (out, in / 8): their positions, 4 bits a group (i0 | i1 << 2), low nibble first
    bias     as the original layer
Forward: up to 8 fp32 rows on a CPU (decode) through the hand-written kernel (kernels/gemv.c,
mp_sparse24_gemv), which reads the packed values (fp32, bf16 or fp16) and picks x's columns by their positions; other
inputs multiply the dense weight rebuilt from them (the same numbers up to the order of the sum).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels
from ..core import sparsity
from ..kernels import ops
from .dense_linear import kernel_allowed
from .frozen import frozen_product, wants_input_grad


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Sparse24Linear(torch.nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: str = "float32") -> None:
        super().__init__()
        if in_features % 8:
            raise ValueError(f"2:4 storage needs a multiple of 8 input features, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("values", torch.zeros(out_features, in_features // 2, dtype=getattr(torch, dtype)))
        self.register_buffer("indices", torch.zeros(out_features, in_features // 8, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features, dtype=getattr(torch, dtype)) if bias else None)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, dtype: torch.dtype | None = None) -> "Sparse24Linear":
        """The layer's weight packed, its values (and bias) in `dtype` (None: the weight's); ValueError
        where it is not 2:4 sparse."""
        w = linear.weight.detach()
        dtype = dtype or w.dtype
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, _name(dtype))
        values, m.indices = sparsity.pack_24(w)
        m.values = values.to(dtype)
        if linear.bias is not None:
            m.bias = linear.bias.detach().to(dtype).clone()
        return m

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return sparsity.unpack_24(self.values, self.indices).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if wants_input_grad(x):
            return frozen_product(self, x)
        rows = x.numel() // self.in_features
        lib = (kernels.lib() if kernel_allowed(x, rows) and x.dtype == torch.float32
               and self.values.dtype in ops.SPARSE24_KIND else None)
        if lib is None:
            return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        y = ops.sparse24_gemv(lib, x.reshape(rows, self.in_features).contiguous(), self.values, self.indices)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, 2:4 sparse, {_name(self.values.dtype)}"

    def meta(self) -> dict:
        """What a checkpoint records to rebuild this module before loading its tensors."""
        return {"class": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "dtype": _name(self.values.dtype)}
