"""Build a transformers causal LM from a config and a state dict without random initialisation."""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import ModelpressError


def build_causal_lm(config, state_dict: dict[str, torch.Tensor],  # noqa: ANN001 (PretrainedConfig)
                    prepare: Callable[[torch.nn.Module], None] | None = None) -> torch.nn.Module:
    """Construct on the meta device, then assign the given tensors (no init, no copy).

    `prepare(model)` runs before the tensors are assigned, e.g. to swap in quantized modules.
    Non-persistent buffers (rotary frequencies) are rebuilt on the CPU afterwards.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if prepare is not None:
        prepare(model)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if unexpected:
        raise ModelpressError(f"the weights hold tensors this {config.model_type} model has no place for "
                              f"(e.g. {unexpected[0]}); the file does not match its config")
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is not None:
        model.model.rotary_emb = type(rotary)(config=config)
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise ModelpressError(f"the weights lack {len(still_meta)} tensors (e.g. {still_meta[0]}); "
                              "the file is incomplete or does not match its config")
    from ..nn.dense_linear import use_dense_kernels

    return use_dense_kernels(model).eval()
