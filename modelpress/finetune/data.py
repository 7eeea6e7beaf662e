"""Training examples for fine-tuning: (token ids, target mask) rows of at most `ctx` tokens.

    .txt                      the text tokenized whole and packed into windows of ctx tokens; every
                              token after the first of a window is a target
    .jsonl {"text": ...}      each text tokenized with the end-of-sequence token after it, packed
    .jsonl {"messages": [...]} a chat per line (role / content), rendered by the model's chat template;
                              the targets are the assistant turns' tokens only (what the template adds
                              for each assistant message after the prompt that precedes it), one
                              row per chat, cut at ctx tokens
No file: the default calibration text (data.default_text("calib"): pydoc topics and module docstrings).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..data import default_text, tokenize
from ..errors import ModelpressError

Example = tuple[torch.Tensor, torch.Tensor]  # ids (T,) int64, mask (T,) bool: token t is predicted


def _packed(ids: torch.Tensor, ctx: int) -> list[Example]:
    n = ids.numel() // ctx
    if n == 0:
        raise ModelpressError(f"the text has {ids.numel()} tokens, fewer than one window of --ctx {ctx}; give more "
                              "text or a smaller --ctx")
    rows = ids[:n * ctx].view(n, ctx)
    mask = torch.ones(ctx, dtype=torch.bool)
    mask[0] = False
    return [(r.clone(), mask.clone()) for r in rows]


def _chat_example(tokenizer, messages: list[dict[str, Any]], ctx: int, where: str) -> Example:  # noqa: ANN001
    if not getattr(tokenizer, "chat_template", None):
        raise ModelpressError(f"{where} holds chat messages but the model's tokenizer has no chat template")
    try:
        full = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # jinja raises its own errors on malformed messages
        raise ModelpressError(f"{where}: the chat template cannot render these messages ({e})") from None
    ids = tokenize(tokenizer, full)
    mask = torch.zeros(ids.numel(), dtype=torch.bool)
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (full.startswith(before) and full.startswith(upto)):
            raise ModelpressError(f"{where}: the chat template renders a conversation's start differently from the "
                                  "whole, so its assistant turns cannot be found")
        mask[tokenize(tokenizer, before).numel():tokenize(tokenizer, upto).numel()] = True
    if not mask.any():
        raise ModelpressError(f"{where} has no assistant message to learn from")
    return ids[:ctx], mask[:ctx]


def _jsonl(tokenizer, path: Path, ctx: int) -> list[Example]:  # noqa: ANN001
    texts: list[torch.Tensor] = []
    chats: list[Example] = []
    eos = tokenizer.eos_token_id
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        where = f"{path}:{n}"
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            t = tokenize(tokenizer, obj["text"])
            texts.append(t if eos is None else torch.cat([t, torch.tensor([eos])]))
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list) and all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in obj["messages"]):
            chats.append(_chat_example(tokenizer, obj["messages"], ctx, where))
        else:
            raise ModelpressError(f'{where} is not a JSON object with "text" (a string) or "messages" (a list of '
                                  '{"role", "content"} objects)')
    if texts and chats:
        raise ModelpressError(f"{path} mixes text and chat lines; use one kind per file")
    if not texts and not chats:
        raise ModelpressError(f"{path} holds no examples")
    return _packed(torch.cat(texts), ctx) if texts else chats


def examples(tokenizer, path: str | Path | None, ctx: int) -> list[Example]:  # noqa: ANN001
    """The training rows of a .txt / .jsonl file (or of the default text)."""
    if ctx < 2:
        raise ModelpressError(f"--ctx must be at least 2 tokens, got {ctx}")
    if path is None:
        return _packed(tokenize(tokenizer, default_text("calib")), ctx)
    path = Path(path)
    if not path.is_file():
        raise ModelpressError(f"data file {path} does not exist; give a .txt or .jsonl file")
    if path.suffix not in (".txt", ".jsonl"):
        raise ModelpressError(f"{path}: give a .txt (plain text) or .jsonl (text or chat lines) file")
    try:
        if path.suffix == ".jsonl":
            return _jsonl(tokenizer, path, ctx)
        return _packed(tokenize(tokenizer, path.read_text(encoding="utf-8")), ctx)
    except UnicodeDecodeError:
        raise ModelpressError(f"{path} is not UTF-8 text") from None


def batch(rows: list[Example], pad_id: int = 0) -> Example:
    """Rows padded on the right to the longest (padding is never a target; causal attention keeps it
    from the real tokens before it)."""
    t = max(r[0].numel() for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.bool)
    for i, (r, m) in enumerate(rows):
        ids[i, :r.numel()], mask[i, :m.numel()] = r, m
    return ids, mask
