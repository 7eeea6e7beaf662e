"""GGUF tokenizer metadata from a transformers tokenizer, for models that did not come from a GGUF
file (convert_hf_to_gguf.py's `_set_vocab_gpt2` in llama.cpp writes the same keys).

    tokenizer.ggml.model "gpt2" | .pre | .tokens [str] | .token_type [i32] | .merges [str]
    tokenizer.ggml.{bos,eos,unknown,padding}_token_id u32 | .add_bos_token bool | tokenizer.chat_template

Byte-level BPE tokenizers only (Llama 3, SmolLM, Qwen, GPT-2 style); `pre` names llama.cpp's
pre-tokenizer: a tokenizer with the default model's exact vocabulary and merges takes that file's
fields as they are (its pre-tokenizer, "smollm"); any other gets "default" (llama.cpp's GPT-2
regex), which llama.cpp loads and may split some text differently than transformers.
"""
from __future__ import annotations

import json
from typing import Any

from ..default_model import default_model_path
from ..errors import ModelpressError
from .gguf_reader import metadata_fields

# llama_token_type (llama.cpp): 1 normal, 3 control, 4 user defined, 5 unused
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
_STR, _U32, _I32, _BOOL, _ARR = 8, 4, 5, 7, 9  # GGUF value types


def tokenizer_fields(tokenizer: Any, vocab_size: int) -> list[tuple[str, Any, int, int | None]]:
    """(key, value, GGUF type, array element type) of `tokenizer`, its vocabulary padded to the
    model's `vocab_size` with unused tokens as convert_hf_to_gguf does."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model.get("type") != "BPE":
        raise ModelpressError("GGUF export writes byte-level BPE tokenizers (the Llama / GPT-2 family); this "
                              f"model's tokenizer is {model.get('type') or type(tokenizer).__name__}")
    default = _default_model_fields(model)
    if default is not None:
        return default
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ModelpressError(f"the tokenizer holds ids up to {max(vocab.values())}, past the model's vocabulary "
                              f"of {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for tok, i in vocab.items():
        tokens[i], types[i] = tok, NORMAL
    for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if i < vocab_size:
            types[i] = CONTROL if added.special else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    fields = [("tokenizer.ggml.model", "gpt2", _STR, None), ("tokenizer.ggml.pre", "default", _STR, None),
              ("tokenizer.ggml.tokens", tokens, _ARR, _STR), ("tokenizer.ggml.token_type", types, _ARR, _I32),
              ("tokenizer.ggml.merges", merges, _ARR, _STR)]
    for attr, key in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("unk_token_id", "unknown"),
                      ("pad_token_id", "padding")):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            fields.append((f"tokenizer.ggml.{key}_token_id", value, _U32, None))
    fields.append(("tokenizer.ggml.add_bos_token", bool(getattr(tokenizer, "add_bos_token", False)), _BOOL, None))
    if getattr(tokenizer, "chat_template", None):
        fields.append(("tokenizer.chat_template", tokenizer.chat_template, _STR, None))
    return fields


def _default_model_fields(model: dict) -> list[tuple[str, Any, int, int | None]] | None:
    """The default model's tokenizer fields when `model` (tokenizer.json's model) is its tokenizer."""

    try:
        path = default_model_path()
    except ModelpressError:
        return None
    fields = [f for f in metadata_fields(path) if f[0].startswith("tokenizer.")]
    got = {k: v for k, v, *_ in fields}
    vocab = model.get("vocab", {})
    tokens = got.get("tokenizer.ggml.tokens", [])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if len(vocab) != len(tokens) or any(vocab.get(t) != i for i, t in enumerate(tokens)):
        return None
    return fields if merges == got.get("tokenizer.ggml.merges") else None
