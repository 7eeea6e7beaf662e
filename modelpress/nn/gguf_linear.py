"""GGUFLinear: a linear layer that keeps a GGUF tensor's blocks (any type of core/kquants) and
runs on them without an fp32 copy of the weight.

The blocks are decoded once, at first use, into the affine form every type shares
(kquants.affine: a uint8 code per weight and an fp32 scale and offset per group of 16 or 32):
few-row products (decode) go through the hand-written kernel mp_affine_gemv
(kernels/gemv.c) on those codes; many rows (prefill) expand one layer at a time to fp32
and call F.linear. `qdata` (the GGUF bytes, rows in the transformers order) stays as loaded, for
export and for `dequantize()`.

`with int8_activations():` (the serving engine's runner wraps its forward in it): inside it,
products with a Q8_0 / Q5_0 / Q4_K / Q6_K layer round the activations to int8 (per 32; per 256 for
Q4_K / Q6_K) and multiply on the stored blocks (mp_block_gemv), as llama.cpp's CPU path does and as
the engine's fused decode does, so that a prefill (or the recompute of a preempted sequence)
computes what the decode computed. Outside it, the model's own numbers (fp32 activations).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
import torch.nn.functional as F

from .. import kernels
from ..core import kquants
from ..kernels import ops
from .dense_linear import kernel_allowed
from .frozen import frozen_product, wants_input_grad

# GGUF types with a kernel on their stored blocks and int8 activations (kernels.KIND numbers)
BLOCK_KERNELS = {t: kernels.KIND[t] for t in ("Q8_0", "Q5_0", "Q4_K", "Q6_K")}


# products of up to this many rows take int8 activations (0: none); scoped by int8_activations()
_INT8_ROWS: contextvars.ContextVar[int] = contextvars.ContextVar("modelpress_int8_rows", default=0)


@contextlib.contextmanager
def int8_activations(rows: int = 1 << 62) -> Iterator[None]:
    """GGUFLinear products of up to `rows` rows round their activations to int8 inside this block
    (this thread only; a mode of the caller's, never left set on the modules)."""
    token = _INT8_ROWS.set(rows)
    try:
        yield
    finally:
        _INT8_ROWS.reset(token)


class GGUFLinear(torch.nn.Module):

    def __init__(self, in_features: int, out_features: int, kind: str, bias: bool = False) -> None:
        super().__init__()
        if kind not in kquants.BLOCK:
            raise ValueError(f"GGUF type {kind} is not one of {', '.join(kquants.TYPES)}")
        block, nbytes = kquants.BLOCK[kind]
        if in_features % block:
            raise ValueError(f"{kind} rows hold whole blocks of {block}; in_features {in_features} is not a multiple")
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        self.register_buffer("qdata", torch.zeros(out_features, in_features // block * nbytes, dtype=torch.uint8))
        self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None  # qwen2's q / k / v: fp32
        self._affine: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_blocks(cls, data: torch.Tensor, kind: str, in_features: int, bias: torch.Tensor | None = None
                    ) -> "GGUFLinear":
        m = cls.__new__(cls)
        torch.nn.Module.__init__(m)
        m.in_features, m.out_features, m.kind = in_features, data.shape[0], kind
        m.register_buffer("qdata", data)
        m.bias = None if bias is None else torch.nn.Parameter(bias.float(), requires_grad=False)
        m._affine = None
        return m

    def meta(self) -> dict[str, object]:
        """What the checkpoint manifest records to rebuild the module (formats/checkpoint.py)."""
        own = {"class": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features,
               "kind": self.kind}
        return {**own, "bias": True} if self.bias is not None else own

    def affine(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes uint8 (out, in), scale, offset fp32 (out, in / g)), decoded once."""
        if self._affine is None or self._affine[0].device != self.qdata.device:
            self._affine = kquants.affine(self.qdata.cpu(), self.kind, self.in_features)
            self._affine = tuple(t.to(self.qdata.device) for t in self._affine)
        return self._affine

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q, scale, offset = self.affine()
        g = kquants.GROUP[self.kind]
        lib = kernels.lib() if q.device.type == "cpu" else None
        if lib is not None:  # the same values, ~10x faster than the tensor expression (no temporaries)
            return ops.affine_dequant(lib, q, scale, offset, g).to(dtype)
        w = q.view(self.out_features, -1, g).float() * scale[..., None] + offset[..., None]
        return w.view(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if wants_input_grad(x):  # a frozen base under a training graph (nn/frozen.py)
            return frozen_product(self, x)
        y = self._product(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.kind in BLOCK_KERNELS and kernel_allowed(x, rows, _INT8_ROWS.get()) and x.dtype == torch.float32:
            y = self.int8_product(x.reshape(rows, self.in_features))
            if y is not None:
                return y.reshape(*x.shape[:-1], self.out_features)
        if kernel_allowed(x, rows) and x.dtype == torch.float32:
            lib = kernels.lib()
            if lib is not None:
                q, scale, offset = self.affine()
                x2 = x.reshape(rows, self.in_features).contiguous()
                y = ops.affine_gemv(lib, x2, q, scale, offset, kquants.GROUP[self.kind])
                return y.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dequantize(x.dtype))

    def int8_product(self, x: torch.Tensor) -> torch.Tensor | None:
        """x (rows, in) fp32 on a CPU times the stored blocks with x rounded to int8 (per 32; per 256 for
        the K types; mp_block_gemv), or None where the type has no such kernel or the kernels did not
        build."""
        lib = kernels.lib() if self.kind in BLOCK_KERNELS else None
        if lib is None:
            return None
        q = self.qdata if self.qdata.is_contiguous() else self.qdata.contiguous()
        x = x.contiguous()
        return ops.block_gemv(lib, x, q, BLOCK_KERNELS[self.kind], self.out_features, self.in_features)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        self._affine = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, type={self.kind}"
