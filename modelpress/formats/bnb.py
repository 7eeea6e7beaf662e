"""bitsandbytes' serialized layout, as transformers writes it: the quantization_config block of
config.json. The tensors themselves are the state dicts of nn.Code4Linear and nn.Int8LtLinear,
whose keys are bitsandbytes' own, so model.safetensors needs no conversion either way.

    config.json  "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true,
                 "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": true, ...}
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..config import BaseConfig
from ..errors import ModelpressError
from ..model.walker import iter_targets, replace
from ..nn import Code4Linear, Int8LtLinear
from ..nn.code4_linear import read_quant_state
from .registry import Format, describe_transformers, register_format

QUANT_METHOD = "bitsandbytes"
FOUR_BIT = ("nf4", "fp4")  # the methods stored as 4-bit codes (Code4Linear); "int8" is LLM.int8


def _skipped_linears(model: torch.nn.Module) -> list[str]:
    """Names of the linear layers left unquantized (transformers' llm_int8_skip_modules)."""
    names = [fqn for fqn, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return names or ["lm_head"]


def quantization_config(config: BaseConfig, model: torch.nn.Module) -> dict[str, Any] | None:
    """The quantization_config transformers expects for a bitsandbytes model, or None for methods
    that bitsandbytes does not have."""
    four = config.method in FOUR_BIT
    if not four and config.method != "int8":
        return None
    return {
        "_load_in_4bit": four, "_load_in_8bit": not four,
        "bnb_4bit_compute_dtype": config.compute_dtype if four else "float32",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": config.quant_type if four else "fp4",
        "bnb_4bit_use_double_quant": bool(four and config.double_quant),
        "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": _skipped_linears(model),
        "llm_int8_threshold": config.threshold if not four else 6.0,
        "load_in_4bit": four, "load_in_8bit": not four, "quant_method": QUANT_METHOD,
    }


def config_from_hf(qc: dict[str, Any], state: dict[str, torch.Tensor]) -> BaseConfig:
    """The modelpress config equivalent to a bitsandbytes quantization_config; the 4-bit
    blocksize is read from the tensors' quant_state, as bitsandbytes does."""
    blocksize = 64
    for key, t in state.items():
        if ".weight.quant_state.bitsandbytes__" in key:
            blocksize = read_quant_state(t)["blocksize"]
            break
    skip = qc.get("llm_int8_skip_modules") or ["lm_head"]
    ignore = tuple(rf"(^|\.){p}$" if "." not in p else rf"^{p}$" for p in skip)
    try:
        if qc.get("load_in_4bit"):
            method = qc.get("bnb_4bit_quant_type", "fp4")
            if method not in FOUR_BIT:
                raise ModelpressError(f"unknown bnb_4bit_quant_type {method!r}")
            dtype = qc.get("bnb_4bit_compute_dtype") or "float32"
            return BaseConfig.from_dict({"method": method, "ignore": ignore, "blocksize": blocksize,
                                         "double_quant": bool(qc.get("bnb_4bit_use_double_quant")),
                                         "compute_dtype": dtype if dtype in ("float32", "bfloat16") else "float32"})
        if qc.get("load_in_8bit"):
            return BaseConfig.from_dict({"method": "int8", "ignore": ignore,
                                         "threshold": float(qc.get("llm_int8_threshold", 6.0))})
    except ValueError as e:
        raise ModelpressError(f"unsupported bitsandbytes settings in config.json: {e}") from None
    raise ModelpressError("config.json names bitsandbytes but neither load_in_4bit nor load_in_8bit")


def skeleton(config: BaseConfig) -> Callable[[torch.nn.Module], None]:
    """prepare(model) for build_causal_lm: empty quantized layers where `config` quantizes, for
    load_state_dict to fill from bitsandbytes' keys."""

    def prepare(model: torch.nn.Module) -> None:
        for fqn, lin in list(iter_targets(model, config.targets, config.ignore)):
            bias = lin.bias is not None
            if config.method in FOUR_BIT:
                new = Code4Linear(lin.in_features, lin.out_features, config.quant_type, config.blocksize,
                                  config.double_quant, config.compute_dtype, bias=bias)
            else:
                new = Int8LtLinear(lin.in_features, lin.out_features, config.threshold, bias=bias)
            replace(model, fqn, new)

    return prepare


def from_hf(qc: dict[str, Any], state: dict[str, torch.Tensor]) -> tuple[BaseConfig, dict, Callable]:
    config = config_from_hf(qc, state)
    return config, state, skeleton(config)


# written by the modelpress format itself (its tensors and quantization_config are bitsandbytes')
register_format(Format("bitsandbytes", "bitsandbytes' serialized NF4 / FP4 / LLM.int8 layout (transformers)",
                       methods=("nf4", "fp4", "int8"), quant_method=QUANT_METHOD, read=from_hf, describe=describe_transformers))
