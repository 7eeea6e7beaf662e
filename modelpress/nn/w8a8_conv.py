"""W8A8Conv2d: a 2-d convolution as W8A8 (nn/w8a8_linear.py) over its input patches (im2col, as
most int8 CPU convolutions do): the weight (out, in, kh, kw) flattened to (out, in * kh * kw) in
F.unfold's column order, one activation scale per tensor (static) or per output position
(dynamic, "token"), and an optional ReLU folded into the output (clamp at 0).

State dict: linear.weight int8 (out, in*kh*kw), linear.weight_scale (out, 1), linear.input_scale (1,)
(static), linear.bias (out,).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .w8a8_linear import W8A8Linear


class W8A8Conv2d(torch.nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int], dilation: tuple[int, int], static: bool = True,
                 granularity: str = "tensor", bias: bool = False, relu: bool = False) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation, self.relu = tuple(padding), tuple(dilation), relu
        k = in_channels * self.kernel_size[0] * self.kernel_size[1]
        self.linear = W8A8Linear(k, out_channels, static, granularity, bias)

    @classmethod
    def from_conv(cls, conv: torch.nn.Conv2d, input_scale: float | None, granularity: str = "tensor",
                  relu: bool = False) -> "W8A8Conv2d":
        if conv.groups != 1 or not isinstance(conv.padding, tuple) or conv.padding_mode != "zeros":
            raise ValueError(f"W8A8 convolutions take groups=1 and numeric zero padding; this one has groups="
                             f"{conv.groups}, padding={conv.padding!r}, padding_mode={conv.padding_mode!r}")
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                input_scale is not None, granularity, conv.bias is not None, relu)
        m.linear = W8A8Linear.from_weight(conv.weight.reshape(conv.out_channels, -1), conv.bias, input_scale,
                                          granularity)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (n, in*kh*kw, L)
        y = self.linear(cols.transpose(1, 2))                                           # (n, L, out)
        if self.relu:
            y = y.clamp_min(0)
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        return y.transpose(1, 2).reshape(n, self.out_channels, ho, wo)
