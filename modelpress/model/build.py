"""Build a transformers causal LM from a config and a state dict without random initialisation."""
from __future__ import annotations

import re
from typing import Callable

import torch
from transformers import AutoModelForCausalLM

from ..errors import ModelpressError
from .walker import use_dense_kernels

# config fields that size memory: (name, largest sane value); each must be a positive integer
_SIZES = (("vocab_size", 1 << 22), ("hidden_size", 1 << 17), ("intermediate_size", 1 << 20),
          ("num_hidden_layers", 1024), ("num_attention_heads", 1024), ("num_key_value_heads", 1024),
          ("max_position_embeddings", 1 << 24))


def check_config(config, state_dict: dict[str, torch.Tensor]) -> None:  # noqa: ANN001
    """Every config value that sizes memory checked before the model is built: a positive integer
    within sane bounds, heads that divide, and as many layers as the weights hold."""
    for name, top in _SIZES:
        v = getattr(config, name, None)
        if name == "num_key_value_heads" and v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= top:
            raise ModelpressError(f"config.json: {name} = {v!r} is not a whole number from 1 to {top}; "
                                  "the config is corrupt or not of a model modelpress loads")
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if (heads % kv or not isinstance(head_dim, int) or isinstance(head_dim, bool) or not 1 <= head_dim <= 4096
            or head_dim % 2 or config.hidden_size % heads):
        raise ModelpressError(f"config.json: {heads} attention heads, {kv} key/value heads and a head size of "
                              f"{head_dim} do not fit together; the config is corrupt")
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    if layers and layers != set(range(config.num_hidden_layers)):
        raise ModelpressError(f"config.json says {config.num_hidden_layers} layers but the weights hold layers "
                              f"{min(layers)} to {max(layers)} ({len(layers)}); the files do not match")


def _constant_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers that hold a constant the module keeps as a number too (gemma's
    `embed_scale`, sqrt(hidden_size), beside `scalar_embed_scale`), rebuilt from that number."""
    for mod in model.modules():
        for name, buf in list(mod.named_buffers(recurse=False)):
            value = getattr(mod, f"scalar_{name}", None)
            if buf.is_meta and isinstance(value, (int, float)):
                setattr(mod, name, torch.tensor(value, dtype=buf.dtype))


def build_causal_lm(config, state_dict: dict[str, torch.Tensor],  # noqa: ANN001 (PretrainedConfig)
                    prepare: Callable[[torch.nn.Module], None] | None = None) -> torch.nn.Module:
    """Construct on the meta device, then assign the given tensors (no init, no copy).

    `prepare(model)` runs before the tensors are assigned, e.g. to swap in quantized modules.
    Non-persistent buffers (rotary frequencies) are rebuilt on the CPU afterwards.
    """
    check_config(config, state_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if prepare is not None:
        prepare(model)
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    except RuntimeError as e:  # shapes that differ from the config's
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e).splitlines()[0])
        raise ModelpressError(f"the weights do not match their config ({first}); the files are corrupt "
                              "or from different models") from None
    if unexpected:
        raise ModelpressError(f"the weights hold tensors this {config.model_type} model has no place for "
                              f"(e.g. {unexpected[0]}); the file does not match its config")
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is not None:
        model.model.rotary_emb = type(rotary)(config=config)
    _constant_buffers(model)
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise ModelpressError(f"the weights lack {len(still_meta)} tensors (e.g. {still_meta[0]}); "
                              "the file is incomplete or does not match its config")

    return use_dense_kernels(model).eval()
