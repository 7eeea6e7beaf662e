"""Merging adapters into their base: into a float model (any base storage, dequantized), after which
every method and export applies as usual; or, for QA-LoRA adapters on a group-quantized integer base,
into the base's own format without loss: QA-LoRA's update is constant within each quantization group
of a row, so it becomes a change of that group's offset (nn/intx_linear.py `offset`):
    W + dW = (code - zero_point) * scale + offset,   offset[o, g] = dW[o, any column of group g]
"""
from __future__ import annotations

import torch

from ..errors import ModelpressError
from ..model.walker import dense_weight, replace
from ..nn.intx_linear import IntxLinear
from ..record import record
from .lora import LoraLinear, linear_like, lora_layers


@torch.no_grad()
def merged_weight(layer: LoraLinear) -> torch.Tensor:
    """The (out, in) fp32 weight that computes what base + adapter compute (DoRA: rescaled rows)."""
    w = dense_weight(layer.base_layer) + layer.delta_weight()
    if layer.lora_magnitude_vector is not None:
        w = w * (layer.lora_magnitude_vector.float() / w.norm(dim=1))[:, None]
    return w


def _float_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight.data = weight
    if bias is not None:
        lin.bias.data = bias.detach().float().clone()
    return lin.requires_grad_(False)


@torch.no_grad()
def merge_adapters(model: torch.nn.Module) -> torch.nn.Module:
    """A float model computing what base + adapters compute (in place): every adapted layer becomes
    an nn.Linear of base + update, and every other quantized linear layer its dequantized weight, so
    that any method or export applies to the result as to a float model."""
    layers = lora_layers(model)
    if not layers:
        raise ModelpressError("the model has no adapters to merge (load one with --adapter)")
    for fqn, layer in layers.items():
        replace(model, fqn, _float_linear(merged_weight(layer), getattr(layer.base_layer, "bias", None)))
    for fqn, mod in list(model.named_modules()):
        if linear_like(mod) and not isinstance(mod, torch.nn.Linear):
            replace(model, fqn, _float_linear(dense_weight(mod), getattr(mod, "bias", None)))
    rec = record(model)
    rec.config, rec.plan, rec.head, rec.adapter = None, None, None, None
    return model


@torch.no_grad()
def merge_qa_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Merge QA-LoRA adapters into their integer bases exactly (each group's offset); in place."""
    for fqn, layer in lora_layers(model).items():
        base = layer.base_layer
        if layer.group is None or not isinstance(base, IntxLinear) or base.group_size != layer.group \
                or base.perm is not None:
            raise ModelpressError(f"{fqn}: a lossless merge needs a QA-LoRA adapter whose group equals its integer "
                                  "base's quantization group (and a base without act-order permutation); merge into "
                                  "a float model instead")
        delta = layer.delta_weight()[:, ::layer.group]  # (out, groups): constant within a group
        base.add_offset(delta)
        replace(model, fqn, base)
    record(model).adapter = None
    return model
