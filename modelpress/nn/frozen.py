"""A frozen quantized linear layer inside a graph that trains (LoRA / QLoRA on a quantized base):
the forward runs the layer's own fast path without autograd, and the backward gives the input's
gradient from the weight dequantized again, dy @ W, so that no dequantized weight is kept between
forward and backward (bitsandbytes' MatMul4Bit does the same for QLoRA). The layer's weights get
no gradient: they are its storage, not parameters."""
from __future__ import annotations

import torch


def wants_input_grad(x: torch.Tensor) -> bool:
    """Whether autograd is recording a graph through `x` (then a frozen layer must pass gradients)."""
    return torch.is_grad_enabled() and x.requires_grad


class _FrozenProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:  # noqa: ANN001
        ctx.module = module
        ctx.x_dtype = x.dtype
        device = x.device.type
        autocast = torch.is_autocast_enabled(device)
        # the backward's product in the forward's compute type: bf16 under autocast (AMX / AVX-512 BF16
        # on a CPU: QLoRA's step 5.3 -> 3.9 s on the default model), else the input's
        ctx.dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
        with torch.no_grad():
            y = module(x)
        # under autocast an nn.Linear returns the autocast type; so does a frozen quantized layer, so that
        # what follows it (and what autograd keeps of it) is as small as after a float base
        return y.to(ctx.dtype) if autocast else y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        module = ctx.module
        w = module.dequantize(ctx.dtype)                # (out, in) in the layer's stored column order
        gx = grad.to(ctx.dtype) @ w                     # (..., in)
        perm = getattr(module, "perm", None)            # the layer computes on x[..., perm]
        if perm is not None:
            gx = gx.index_select(-1, torch.argsort(perm))
        return gx.to(ctx.x_dtype), None


def frozen_product(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) (bias included), differentiable with respect to `x` only."""
    return _FrozenProduct.apply(x, module)
