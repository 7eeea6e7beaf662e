"""Text for calibration and evaluation: user files, or a default every Python install has.

A file is .txt (used whole) or .jsonl (one {"text": ...} object per line, joined by blank lines).
The default is the standard library's `pydoc_data.topics` (the help() topic texts): topics sorted
by name, every fourth topic (index % 4 == 0) to calibration, the rest to evaluation, so the two
parts are disjoint and the same on every machine with the same Python minor version.
"""
from __future__ import annotations

import json
from pathlib import Path
from pydoc_data.topics import topics

import torch

from .errors import ModelpressError


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise ModelpressError(f"text file {path} does not exist; give a .txt or .jsonl file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ModelpressError(f"{path} is not UTF-8 text; give a .txt or .jsonl file") from None
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError, IndexError, RecursionError):
                text = None
            if not isinstance(text, str):
                raise ModelpressError(f"{path}:{n} is not a JSON object with a \"text\" field holding a string")
            texts.append(text)
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise ModelpressError(f"{path} holds no text")
    return raw


def default_text(split: str) -> str:
    """'calib' or 'eval' part of the standard library's pydoc topics."""
    if split not in ("calib", "eval"):
        raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")
    names = sorted(topics)
    keep = [n for i, n in enumerate(names) if (i % 4 == 0) == (split == "calib")]
    return "\n\n".join(topics[n].strip() for n in keep)


def load_text(path: str | Path | None, split: str) -> str:
    return default_text(split) if path is None else read_text(path)


def tokenize(tokenizer, text: str) -> torch.Tensor:  # noqa: ANN001
    """The text as one 1-D tensor of token ids, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, ctx: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows (n, ctx); a last partial window is dropped."""
    if ctx < 2:
        raise ModelpressError(f"--ctx must be at least 2 tokens, got {ctx}")
    n = ids.numel() // ctx
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ModelpressError(f"the text has {ids.numel()} tokens, fewer than one window of {ctx}; "
                              "give more text or a smaller --ctx")
    return ids[: n * ctx].reshape(n, ctx)


def calibration_windows(tokenizer, path: str | Path | None, ctx: int, samples: int) -> list[torch.Tensor]:  # noqa: ANN001
    """Up to `samples` windows of `ctx` tokens from the calibration text (default text if no path)."""
    return list(windows(tokenize(tokenizer, load_text(path, "calib")), ctx, samples))
