"""Round-to-nearest weight-only integers: the baseline every calibrated method must beat."""
from __future__ import annotations

import dataclasses

import torch
from tqdm.auto import tqdm

from ..config import GROUP_SIZE_HELP, BaseConfig, option
from ..model.walker import iter_targets, replace
from ..nn import IntxLinear
from ..registry import register

BITS = (2, 3, 4, 8)


@dataclasses.dataclass(frozen=True)
class RTNConfig(BaseConfig):
    """bits: 2, 3, 4 or 8. group_size: input columns sharing one scale (a last partial group is
    allowed), or None for one scale per output channel (the usual choice for int8).
    symmetric: scale from absmax with an implied zero point; otherwise min/max with a stored one.

        RTNConfig(bits=4, group_size=64)              # int4, groups of 64, asymmetric
        RTNConfig(bits=8, group_size=None, symmetric=True)  # int8 per output channel
    """

    method = "rtn"
    bits: int = option(4, "2, 3, 4 or 8")
    group_size: int | None = option(64, GROUP_SIZE_HELP, none="channel")
    symmetric: bool = option(False, "a symmetric grid, no stored zero point")

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise ValueError(f"group size must be a positive number of input columns (e.g. 64 or 128), "
                             f"or none for one group per output channel; got {self.group_size}")


@register(RTNConfig)
def quantize_rtn(model: torch.nn.Module, config: RTNConfig, calib: object = None) -> torch.nn.Module:
    targets = list(iter_targets(model, config.targets, config.ignore))
    for fqn, linear in tqdm(targets, desc=f"rtn int{config.bits}", unit="layer", leave=False):
        replace(model, fqn, IntxLinear.from_linear(linear, config.bits, config.group_size, config.symmetric))
    return model
