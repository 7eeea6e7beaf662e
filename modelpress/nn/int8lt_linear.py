"""Int8LtLinear: LLM.int8() weights and matmul (bitsandbytes' Linear8bitLt); see core/int8_rowwise.py.

State dict, as transformers writes a bitsandbytes 8-bit layer:
    weight          int8 (out, in)  CB, row-wise codes
    SCB             fp32 (out,)     row absmax
    weight_format   uint8 ()        0 ("row": the only layout bitsandbytes still writes)
    bias            as the original layer

Forward: up to 8 rows (decode; nn.dense_linear.kernel_allowed) run in one call of the hand-written kernel
(activation quantization, outlier columns, integer dot products and scaling together); larger
inputs run core/int8_rowwise.int8_linear. Both follow bitsandbytes' arithmetic.
"""
from __future__ import annotations

import torch

from .. import kernels
from ..core import int8_rowwise
from ..errors import ModelpressError
from ..kernels import ops
from .dense_linear import kernel_allowed
from .frozen import frozen_product, wants_input_grad


class Int8LtLinear(torch.nn.Module):
    def __init__(self, in_features: int, out_features: int, threshold: float = 6.0, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.threshold = in_features, out_features, float(threshold)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("SCB", torch.zeros(out_features))
        self.register_buffer("weight_format", torch.tensor(0, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, threshold: float = 6.0) -> "Int8LtLinear":
        m = cls(linear.in_features, linear.out_features, threshold, bias=linear.bias is not None)
        m.weight, m.SCB = int8_rowwise.quantize_rows(linear.weight.detach())
        if linear.bias is not None:
            m.bias = linear.bias.detach().float().clone()
        return m

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return int8_rowwise.dequantize_rows(self.weight, self.SCB).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if wants_input_grad(x):  # a frozen base under a training graph (nn/frozen.py)
            return frozen_product(self, x)
        rows = x.numel() // self.in_features
        lib = kernels.lib() if kernel_allowed(x, rows) else None
        if lib is None:
            return int8_rowwise.int8_linear(x, self.weight, self.SCB, self.bias, self.threshold)
        x2 = x.reshape(rows, self.in_features).float().contiguous()
        y = ops.int8_linear(lib, x2, self.weight, self.SCB, self.bias, self.threshold)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        key = prefix + "weight_format"
        if key in state_dict and int(state_dict[key]) != 0:
            raise ModelpressError(f"{key} is {int(state_dict[key])}; only the row-major layout (0) is supported")
        if key not in state_dict:  # older bitsandbytes files may lack it
            state_dict[key] = torch.tensor(0, dtype=torch.uint8)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, threshold={self.threshold}"

    def meta(self) -> dict:
        """What a checkpoint records to rebuild this module before loading its tensors."""
        return {"class": type(self).__name__, "in_features": self.in_features,
                "out_features": self.out_features, "threshold": self.threshold, "bias": self.bias is not None}
