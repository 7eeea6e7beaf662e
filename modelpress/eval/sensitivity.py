"""Which layers are sensitive: for every decoder linear layer, the mean KL (nats per token) predicted
when only that layer is rounded to 4 bits (GGUF Q4_0, llama.cpp's reference rounding), from the
second-order expansion the auto method allocates with: 1/2 sum F * (w - q)^2, F the diagonal Fisher
information on calibration windows (methods/auto.py's fisher_diagonal). Shown by compare as a map
of blocks x projections (report.py's sensitivity plot)."""
from __future__ import annotations

import re

import torch

from ..methods.auto import fisher_diagonal, predicted_kl
from ..model.walker import dense_weight

KIND = "Q4_0"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


def layer_sensitivity(model: torch.nn.Module, calib: list[torch.Tensor], windows: int = 4,
                      progress: bool = False) -> dict[str, float]:
    """{layer fqn: predicted mean KL when only it is rounded to Q4_0} for the float decoder linears
    whose input width is a multiple of 32."""
    linears = {f: m for f, m in model.named_modules() if _LAYER.match(f) and isinstance(m, torch.nn.Linear)
               and m.in_features % 32 == 0}
    if not linears or not calib:
        return {}
    fisher = fisher_diagonal(model, [f"{f}.weight" for f in linears], calib[:windows], progress)
    return {fqn: predicted_kl(fisher[f"{fqn}.weight"], dense_weight(m), KIND) for fqn, m in linears.items()}


def grid(sens: dict[str, float]) -> tuple[list[int], list[str], list[list[float | None]]]:
    """(block indices, projection names in the model's order, values [block][projection] or None)."""
    blocks: dict[int, dict[str, float]] = {}
    names: list[str] = []
    for fqn, v in sens.items():
        m = _LAYER.match(fqn)
        if m:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = v
            if m.group(2) not in names:
                names.append(m.group(2))
    order = sorted(blocks)
    return order, names, [[blocks[b].get(n) for n in names] for b in order]
