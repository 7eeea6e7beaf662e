"""Text for calibration and evaluation: user files, or a default every Python install has.

A file is .txt (used whole) or .jsonl (one {"text": ...} object per line, joined by blank lines).
The default comes from the standard library, the same on every machine with the same Python minor
version. Evaluation: the `pydoc_data.topics` help() texts (sorted by name) whose index % 4 != 0.
Calibration, more varied than one source (issue 28: calibration fitted to one kind of text
generalizes worse): the other topics (the language reference's prose) interleaved one for one with
the module docstrings of the standard library's top-level modules (API documentation; read from
their sources with `ast`, never imported; sorted by module name), so that every window mixes both
kinds. Where the sources are absent (an install without them) the topics alone.
"""
from __future__ import annotations

import ast
import functools
import itertools
import json
import sysconfig
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


@functools.cache
def module_docstrings() -> tuple[str, ...]:
    """The docstrings of the standard library's top-level modules (Lib/*.py), sorted by module name."""
    docs = []
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(f.read_text(encoding="utf-8")))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if doc and len(doc) > 200:
            docs.append(doc.strip())
    return tuple(docs)


def default_text(split: str) -> str:
    """The 'calib' or 'eval' default text (see the module docstring)."""
    if split not in ("calib", "eval"):
        raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")
    names = sorted(topics)
    keep = [topics[n].strip() for i, n in enumerate(names) if (i % 4 == 0) == (split == "calib")]
    if split == "calib":  # one topic, one docstring, ... (the longer list's tail after the other ends)
        keep = [t for pair in itertools.zip_longest(keep, module_docstrings()) for t in pair if t]
    return "\n\n".join(keep)


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
