"""LLM.int8() (arXiv:2208.07339): int8 row-wise weights, int8 activations with outlier columns in
fp32 (bitsandbytes' Linear8bitLt; BitsAndBytesConfig(load_in_8bit=True)).

    LLMInt8Config()               # threshold 6.0, as bitsandbytes
    LLMInt8Config(threshold=0.0)  # plain int8 weights and activations, no outlier columns
"""
from __future__ import annotations

import dataclasses
import math

import torch
from tqdm.auto import tqdm

from ..config import BaseConfig, option
from ..model.walker import iter_targets, replace
from ..nn import Int8LtLinear
from ..registry import register


@dataclasses.dataclass(frozen=True)
class LLMInt8Config(BaseConfig):
    """threshold: input magnitude from which a column runs in fp32 (0: none do)."""

    method = "int8"
    threshold: float = option(6.0, "input magnitude from which a column runs in fp32 (0: none)")

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, (int, float)) or self.threshold < 0 or not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number >= 0 (6.0 is LLM.int8's; 0 turns outlier "
                             f"columns off); got {self.threshold}")


@register(LLMInt8Config)
def quantize_llm_int8(model: torch.nn.Module, config: LLMInt8Config, calib: object = None) -> torch.nn.Module:
    targets = list(iter_targets(model, config.targets, config.ignore))
    for fqn, linear in tqdm(targets, desc="llm.int8", unit="layer", leave=False):
        replace(model, fqn, Int8LtLinear.from_linear(linear, config.threshold))
    return model
