"""Find the modules a config targets and swap them for compressed ones."""
from __future__ import annotations

import re
from typing import Iterator

import torch

from ..nn.dense_linear import DenseLinear

# RMSNorms that compute x_hat * (1 + w): gemma's (AWQ folds scales into them, the fused decode multiplies by 1 + w)
UNIT_OFFSET_NORMS = ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")


def iter_targets(model: torch.nn.Module, targets: tuple[str, ...], ignore: tuple[str, ...],
                 types: tuple[type, ...] = (torch.nn.Linear,)) -> Iterator[tuple[str, torch.nn.Module]]:
    """(fqn, module) for each module of `types` whose fqn matches a target and no ignore pattern.

    Patterns are regexes matched with `re.search`. A tied output head (the same weight as the
    embedding) is never yielded: compressing it would change the embedding too.
    """
    tgt = [re.compile(p) for p in targets]
    ign = [re.compile(p) for p in ignore]
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = embed.weight if embed is not None else None
    for fqn, mod in model.named_modules():
        if not isinstance(mod, types):
            continue
        if tied is not None and getattr(mod, "weight", None) is tied:
            continue
        if any(p.search(fqn) for p in tgt) and not any(p.search(fqn) for p in ign):
            yield fqn, mod


def device_of(model: torch.nn.Module) -> torch.device:
    """The device holding the model's weights (inputs must go there)."""
    return next(model.parameters()).device


def replace(model: torch.nn.Module, fqn: str, new: torch.nn.Module) -> None:
    """Put `new` where `fqn` names a submodule."""
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def dense_weight(module: torch.nn.Module) -> torch.Tensor:
    """The fp32 (out, in) weight a linear layer computes with, in the input's column order:
    nn.Linear's own, or a quantized layer's dequantized weight (un-permuted where it stores its
    columns permuted)."""
    if not hasattr(module, "dequantize"):
        return module.weight.detach().float()
    w = module.dequantize().float()
    perm = getattr(module, "perm", None)
    if perm is not None:
        w = w[:, torch.argsort(perm)]
    return w


HALF = (torch.bfloat16, torch.float16)


def within(key: str, modules: list[str]) -> bool:
    """Whether state-dict `key` belongs to one of `modules` (fully qualified module names)."""
    return any(key.startswith(m + ".") for m in modules)


def float_dtype(model: torch.nn.Module, choice: str = "model") -> torch.dtype | None:
    """The half dtype the tensors a method leaves unquantized are kept in: the model config's `dtype`
    where that is bf16 / fp16 and `choice` is "model"; None (fp32 as computed) otherwise."""
    if choice not in ("model", "float32"):
        raise ValueError(f"float_dtype is 'model' or 'float32', got {choice!r}")
    dt = getattr(getattr(model, "config", None), "dtype", None)
    dt = getattr(torch, dt, None) if isinstance(dt, str) else dt
    return dt if choice == "model" and dt in HALF else None


def unquantized_fp32(model: torch.nn.Module, config) -> tuple[torch.dtype | None, dict[str, torch.Tensor]]:  # noqa: ANN001
    """(the half dtype `config` keeps what it leaves unquantized in, {state-dict key: tensor} of those fp32
    parameters and buffers: outside the quantized layers, i.e. embeddings, norms, float linears); (None,
    {}) where they stay fp32 (no method config, float_dtype "float32", or a model whose dtype is fp32)."""
    from ..nn import QUANT_LINEAR_CLASSES

    dt = float_dtype(model, config.float_dtype) if config is not None else None
    if dt is None:
        return None, {}
    inside = [f for f, m in model.named_modules() if isinstance(m, tuple(QUANT_LINEAR_CLASSES.values()))]
    return dt, {k: v for k, v in model.state_dict(keep_vars=True).items()
                if v.dtype == torch.float32 and not within(k, inside)}


def use_dense_kernels(model: torch.nn.Module) -> torch.nn.Module:
    """Turn every plain nn.Linear of `model` into a DenseLinear (nn/dense_linear.py: the kernels' GEMV
    at few rows) sharing its parameters."""
    for fqn, mod in list(model.named_modules()):
        if type(mod) is torch.nn.Linear:
            replace(model, fqn, DenseLinear.from_linear(mod))
    return model
