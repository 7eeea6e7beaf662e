"""bitsandbytes' 4-bit formats: NF4 and FP4, blockwise absmax, optional double quantization.

    NF4Config(blocksize=64, double_quant=True)   # = BitsAndBytesConfig(load_in_4bit=True,
                                                 #   bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    FP4Config()
Bit-exact with bitsandbytes 0.50 (codes, absmax, nested constants); see core/codebook4.py and
core/dynamic8.py. Like transformers' bitsandbytes integration, the output head stays unquantized.
"""
from __future__ import annotations

import dataclasses

import torch
from tqdm.auto import tqdm

from ..config import BaseConfig, option
from ..core.codebook4 import BLOCKSIZES
from ..model.walker import iter_targets, replace
from ..nn import Code4Linear
from ..nn.code4_linear import COMPUTE_DTYPES
from ..registry import register


@dataclasses.dataclass(frozen=True)
class NF4Config(BaseConfig):
    """blocksize: consecutive weights sharing one absmax (32 to 4096, default 64).
    double_quant: quantize the absmax constants too (8-bit, blocks of 256): 4.5 -> 4.127 bits/weight.
    compute_dtype: "float32" or "bfloat16", the dtype the layer multiplies in."""

    method = "nf4"
    blocksize: int = option(64, "weights per absmax, 32 to 4096")
    double_quant: bool = option(False, "quantize the absmax constants too (8-bit, blocks of 256)")
    compute_dtype: str = option("float32", "the dtype the layers multiply in", choices=("float32", "bfloat16"))

    def __post_init__(self) -> None:
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))}; got {self.blocksize}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}; got {self.compute_dtype!r}")

    @property
    def quant_type(self) -> str:
        return self.method


@dataclasses.dataclass(frozen=True)
class FP4Config(NF4Config):
    """bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit); fields as NF4Config."""

    method = "fp4"


def quantize_code4(model: torch.nn.Module, config: NF4Config, calib: object = None) -> torch.nn.Module:
    targets = list(iter_targets(model, config.targets, config.ignore))
    for fqn, linear in tqdm(targets, desc=config.method, unit="layer", leave=False):
        replace(model, fqn, Code4Linear.from_linear(linear, config.quant_type, config.blocksize,
                                                    config.double_quant, config.compute_dtype))
    return model


register(NF4Config)(quantize_code4)
register(FP4Config)(quantize_code4)
