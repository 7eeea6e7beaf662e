"""torch.nn.utils.prune's form of a pruned model, both ways.

torch's pruning keeps each pruned parameter as `<name>_orig` (a parameter) and `<name>_mask` (a
buffer) and recomputes `<name> = orig * mask` before every forward; its state dict, and a
transformers folder saved from such a model, hold `weight_orig` / `weight_mask` in place of
`weight`. modelpress reads both (the product, as torch computes it) and writes them for a user who
goes on pruning with torch (`to_torch_prune`).
"""
from __future__ import annotations

import torch
from torch.nn.utils import prune


def fold_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every `X_orig` / `X_mask` pair replaced by `X` = orig * mask."""
    for key in [k for k in state if k.endswith("_orig") and k[:-5] + "_mask" in state]:
        orig = state.pop(key)
        state[key[:-5]] = orig * state.pop(key[:-5] + "_mask").to(orig.dtype)
    return state


def make_permanent(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter torch's pruning reparametrized made a plain one again (its value orig * mask),
    so that a method writing the weights is not undone by the next forward's recomputation."""
    for mod in model.modules():
        for hook in [h for h in mod._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]:
            prune.remove(mod, hook._tensor_name)
    return model


def to_torch_prune(model: torch.nn.Module) -> torch.nn.Module:
    """Each decoder linear layer holding zeros reparametrized by torch's pruning with the mask of its
    non-zeros (`prune.custom_from_mask`): weight_orig / weight_mask in its state dict, and
    torch.nn.utils.prune's methods (global_unstructured, ln_structured, ...) prune on from there."""
    for fqn, mod in model.named_modules():
        if fqn.startswith("model.layers.") and isinstance(mod, torch.nn.Linear) and not prune.is_pruned(mod):
            w = mod.weight.detach()
            if bool((w == 0).any()):
                prune.custom_from_mask(mod, "weight", w != 0)
    return model
