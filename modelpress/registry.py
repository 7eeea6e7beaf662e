"""{ConfigType: handler}: how a config turns a model's linear layers into compressed ones."""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from .config import BaseConfig
from .errors import ModelpressError
from .model import torch_prune
from .model.decoder import FAMILIES
from .model.walker import float_dtype, unquantized_fp32, use_dense_kernels
from .record import check_no_adapter, record

# handler(model, config, calib) -> model, compressing in place
Handler = Callable[[torch.nn.Module, BaseConfig, "list[torch.Tensor] | None"], torch.nn.Module]
_HANDLERS: dict[type, Handler] = {}


def register(config_type: type[BaseConfig]) -> Callable[[Handler], Handler]:
    """Decorator binding a handler to a config type: `@register(RTNConfig)`."""

    def deco(fn: Handler) -> Handler:
        _HANDLERS[config_type] = fn
        return fn

    return deco


def handler_for(config: BaseConfig) -> Handler:
    fn = _HANDLERS.get(type(config))
    if fn is None:
        known = sorted(c.method for c in _HANDLERS)
        raise ModelpressError(f"no method registered for {type(config).__name__}; known: {known}")
    return fn


def _check_family(model: torch.nn.Module, config: BaseConfig) -> None:
    """A decoder of a family modelpress does not know: the methods that only swap linear layers run
    on it, saying so; the calibrated ones (whose block structure they rely on) refuse it."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind is None or kind in FAMILIES:
        return
    known = ", ".join(FAMILIES)
    if getattr(config, "calibrated", False):
        raise ModelpressError(f"{config.method} calibrates the blocks of the model families {known}; this model is "
                              f"{kind!r}. RTN, NF4 / FP4 and LLM.int8 only replace linear layers and run on it")
    warnings.warn(f"{kind!r} is not one of the model families modelpress knows ({known}): {config.method} replaces "
                  "its linear layers all the same; generate, serve and GGUF export will refuse the model", stacklevel=3)


def quantize(model: torch.nn.Module, config: BaseConfig,
             calib: "list[torch.Tensor] | None" = None) -> torch.nn.Module:
    """Compress `model` in place with the method `config` names and return it.

    `calib` is a list of token-id tensors for methods that calibrate (RTN ignores it). The config
    is recorded on the model (`record(model).config`) so that `save` writes it beside the weights.

        model, tok = modelpress.load()
        modelpress.quantize(model, modelpress.RTNConfig(bits=4, group_size=64))
    """

    _check_family(model, config)
    check_no_adapter(model, f"quantizing with {config.method}")
    torch_prune.make_permanent(model)  # torch's pruning hooks would rewrite the weights at the next forward
    float_dtype(model, config.float_dtype)  # a bad choice refused before any work
    model = use_dense_kernels(handler_for(config)(model, config, calib))  # what stays dense gets the kernel too
    record(model).config = config
    round_plain_tensors(model, config)
    return model


def round_plain_tensors(model: torch.nn.Module, config: BaseConfig) -> None:
    """The tensors the method left unquantized rounded to the model's own dtype (bf16 / fp16, as the peers
    keep them; config.float_dtype "float32" keeps fp32), in memory as in every checkpoint written from it,
    so that the measured model is the saved one. Kept as fp32 values (the CPU computes in fp32)."""
    dt, tensors = unquantized_fp32(model, config)
    with torch.no_grad():
        for t in tensors.values():
            t.copy_(t.to(dt))
