"""Size and bits per weight of a model as modelpress stores it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..formats.checkpoint import stored_state_dict
from ..nn import QUANT_LINEAR_CLASSES


@dataclasses.dataclass
class SizeReport:
    size_bytes: int          # bytes of every stored tensor (what model.safetensors holds)
    weights: int             # logical weight count (a quantized matrix counts in x out)
    bits_per_weight: float   # 8 * size_bytes / weights, all tensors
    linear_bits_per_weight: float  # the same over the decoder's linear layers alone


def model_size(model: torch.nn.Module) -> SizeReport:
    qtypes = tuple(QUANT_LINEAR_CLASSES.values())
    quant = {fqn: m for fqn, m in model.named_modules() if isinstance(m, qtypes)}
    linear = {fqn for fqn, m in model.named_modules()
              if isinstance(m, (torch.nn.Linear, *qtypes)) and not fqn.endswith("lm_head")}
    total_bytes = total_weights = lin_bytes = lin_weights = 0

    def add(fqn: str, nbytes: int, count: int) -> None:
        nonlocal total_bytes, total_weights, lin_bytes, lin_weights
        total_bytes, total_weights = total_bytes + nbytes, total_weights + count
        if fqn in linear:
            lin_bytes, lin_weights = lin_bytes + nbytes, lin_weights + count

    for fqn, m in quant.items():  # every tensor it stores counts; its weights count once
        add(fqn, sum(t.numel() * t.element_size() for t in m.state_dict().values()),
            m.in_features * m.out_features)
    for key, t in stored_state_dict(model).items():
        fqn = key.rpartition(".")[0]
        if not any(key.startswith(q + ".") for q in quant):
            add(fqn, t.numel() * t.element_size(), t.numel())
    return SizeReport(total_bytes, total_weights, 8 * total_bytes / total_weights,
                      8 * lin_bytes / max(lin_weights, 1))


def disk_bytes(path: str | Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
