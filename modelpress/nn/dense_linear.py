"""DenseLinear: an nn.Linear (same parameters, same state dict) whose few-row fp32 products on a
CPU go through the hand-written streaming kernel (kernels/gemv.c, mp_f32_gemv).

Why: for decode-sized inputs MKL's GEMV reads weights at ~6.6 GB/s on this class of machine; the
tied 49152 x 576 output head of the default model takes 17 ms a token with F.linear and 7 ms with
the kernel (4 rows: 38 vs 11 ms). Many-row bf16 / fp16 products on a CPU without native instructions for them (torch's fallback
GEMM runs ~10x slower than fp32 there: a 512-token forward of the default model takes 17 s
against 3 s) are computed as fp32 products of the same values, rounded back: a product of two bf16
(or fp16) numbers is exact in fp32 and torch's own half GEMM accumulates in fp32 too, so only the
order of the sum differs. Everything else (other dtypes or devices, or when autograd needs the
graph) is nn.Linear's own forward.
"""
from __future__ import annotations

import functools

import torch

from .. import kernels
from ..kernels import ops

MAX_KERNEL_ROWS = 8


def kernel_allowed(x: torch.Tensor, rows: int, limit: int = MAX_KERNEL_ROWS) -> bool:
    """Whether a CPU kernel for up to `limit` rows may replace the differentiable path for input `x`."""
    return (rows <= limit and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and x.requires_grad))


@functools.cache
def native_half_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` matrices natively (oneDNN with the instructions for it)."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


class DenseLinear(torch.nn.Linear):
    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "DenseLinear":
        """Wrap `linear`'s own parameters (no copy: a tied weight stays tied)."""
        m = cls.__new__(cls)
        torch.nn.Module.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        m.weight, m.bias = linear.weight, linear.bias
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        w = self.weight
        if (kernel_allowed(x, rows) and x.dtype == torch.float32 and w.dtype == torch.float32
                and not (torch.is_grad_enabled() and w.requires_grad) and w.is_contiguous()):
            lib = kernels.lib()
            if lib is not None:
                x2 = x.reshape(rows, self.in_features).contiguous()
                y = ops.f32_gemv(lib, x2, w)
                if self.bias is not None:
                    y += self.bias
                return y.reshape(*x.shape[:-1], self.out_features)
        if (rows > MAX_KERNEL_ROWS and x.device.type == "cpu" and x.dtype == w.dtype
                and w.dtype in (torch.bfloat16, torch.float16) and not native_half_gemm(w.dtype)):
            b = None if self.bias is None else self.bias.float()
            return torch.nn.functional.linear(x.float(), w.float(), b).to(x.dtype)
        return super().forward(x)
