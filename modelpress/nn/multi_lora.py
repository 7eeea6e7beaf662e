"""Many LoRA adapters on one frozen base layer, chosen per row of the input: the serving engine's
batches mix requests for different adapters (and for the base) in one step. Each row's update is
its adapter's, s_k * B_k A_k x, computed for the rows of each adapter present in the step and added
where they belong (gathered and scattered back, as Punica's / S-LoRA's batched kernels do, here
with torch products per adapter); rows of the base (-1) get none.

The engine's model runner says which adapter each row of the step's tokens uses (`row_adapters`);
outside it (no rows set) the layer computes the base alone."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch

_ROWS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("row_adapters", default=None)


@contextlib.contextmanager
def row_adapters(ids: torch.Tensor | None) -> Iterator[None]:
    """Within the block, the layers' input rows use the adapters `ids` (N,) (-1: the base)."""
    token = _ROWS.set(ids)
    try:
        yield
    finally:
        _ROWS.reset(token)


class MultiLoraLinear(torch.nn.Module):
    """`base_layer` (any linear storage) plus adapters by index: adapter k is (A_k (r, in), B_k
    (out, r), scaling_k), or None where adapter k leaves this layer alone."""

    def __init__(self, base_layer: torch.nn.Module, n_adapters: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.adapters: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_adapters

    def set_adapter(self, k: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        # B pre-scaled and both transposed once: the step multiplies rows by them
        self.adapters[k] = (a.detach().float().t().contiguous(), (b.detach().float() * scaling).t().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        ids = _ROWS.get()
        if ids is None:
            return y
        x2, y2 = x.reshape(-1, self.in_features), y.reshape(-1, self.out_features)
        if ids.numel() != x2.shape[0]:
            raise ValueError(f"{ids.numel()} row adapters set for an input of {x2.shape[0]} rows")
        for k in torch.unique(ids[ids >= 0]).tolist():
            adapter = self.adapters[k]
            if adapter is None:
                continue
            a_t, b_t = adapter
            rows = (ids == k).nonzero().squeeze(1)
            y2 = y2.index_add(0, rows, ((x2[rows].float() @ a_t) @ b_t).to(y2.dtype))
        return y2.reshape(y.shape)
