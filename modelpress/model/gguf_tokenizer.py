"""The tokenizer a GGUF file carries, as a transformers fast tokenizer (with its chat template).

For byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`) the tokenizer is assembled
directly with the `tokenizers` library from the vocabulary, merges and token types, choosing the
pre-tokenizer that llama.cpp associates with `tokenizer.ggml.pre` (llama-vocab.cpp). Other
vocabularies (SentencePiece "llama") go through transformers' own GGUF converter.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models
from tokenizers import pre_tokenizers as pt
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ..errors import ModelpressError

# llama.cpp pre-tokenizer regexes (llama-vocab.cpp), as `tokenizers` Split patterns
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.token_type: 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
_CONTROL, _USER = 3, 4


def _pre_tokenizer(pre: str | None):  # noqa: ANN202
    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("smollm",):  # each digit alone, then GPT-2's split
        return pt.Sequence([pt.Digits(individual_digits=True),
                            pt.Split(Regex(_GPT2), behavior="isolated"), byte_level])
    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        return pt.Sequence([pt.Split(Regex(_LLAMA3), behavior="isolated"), byte_level])
    # "default", "gpt2" and anything unknown: GPT-2's byte-level split
    return pt.ByteLevel(add_prefix_space=False, use_regex=True)


def _bpe_tokenizer(meta: dict[str, Any]):  # noqa: ANN202
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tk.decoder = decoders.ByteLevel()
    added = [AddedToken(tokens[i], special=types[i] == _CONTROL, normalized=False)
             for i in range(len(tokens)) if types[i] in (_CONTROL, _USER)]
    tk.add_tokens(added)
    return tk


def check_vocab(meta: dict[str, Any], path: Path) -> None:
    """The tokenizer fields' types and lengths, checked before a tokenizer is built from them."""
    tokens = meta.get("tokenizer.ggml.tokens")
    problem = None
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        problem = "tokenizer.ggml.tokens is not a non-empty array of strings"
    elif "tokenizer.ggml.token_type" in meta and (
            not isinstance(types := meta["tokenizer.ggml.token_type"], list) or len(types) != len(tokens)
            or not all(isinstance(t, int) and not isinstance(t, bool) for t in types)):
        problem = f"tokenizer.ggml.token_type is not an array of {len(tokens)} integers, one per token"
    elif "tokenizer.ggml.merges" in meta and (
            not isinstance(merges := meta["tokenizer.ggml.merges"], list)
            or not all(isinstance(m, str) and " " in m for m in merges)):
        problem = "tokenizer.ggml.merges is not an array of strings 'a b'"
    elif not isinstance(meta.get("tokenizer.chat_template", ""), str):
        problem = "tokenizer.chat_template is not a string"
    else:
        for key in ("bos", "eos", "unknown", "padding"):
            i = meta.get(f"tokenizer.ggml.{key}_token_id")
            if i is not None and (not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(tokens)):
                problem = f"tokenizer.ggml.{key}_token_id {i!r} is not a token of the vocabulary"
    if problem:
        raise ModelpressError(f"{path}: {problem}; the file is corrupt")


def tokenizer_from_gguf(meta: dict[str, Any], path: Path):  # noqa: ANN201
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise ModelpressError(f"{path} carries no tokenizer (tokenizer.ggml.model is missing)")
    if kind != "gpt2":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokens = meta["tokenizer.ggml.tokens"]

    def tok(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_bpe_tokenizer(meta), bos_token=tok("bos"), eos_token=tok("eos"),
        unk_token=tok("unknown"), pad_token=tok("padding"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        clean_up_tokenization_spaces=False,
    )
    template = meta.get("tokenizer.chat_template")
    if template:
        tokenizer.chat_template = template
    return tokenizer
