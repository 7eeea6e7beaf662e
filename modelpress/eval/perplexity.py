"""Perplexity, one protocol for every model and method.

Protocol: the text is tokenized as one string without special tokens and cut into consecutive,
non-overlapping windows of `ctx` tokens (a last partial window is dropped; `max_windows` keeps the
first N). Each window is fed as it is (no BOS added, no overlap, no cache) and every position
after the first is scored: window w contributes -log p(w[t] | w[:t]) for t = 1 .. ctx-1.
ppl = exp(sum of those losses / number of scored tokens).

It computes the same numbers as `model(input_ids=w, labels=w).loss` per window, faster: several
windows per forward, no KV cache, and the output head applied only where a position is scored,
a chunk at a time so the (tokens x vocab) logits never exist all at once.
"""
from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.metrics import perplexity as ppl_from_nll
from ..data import load_text, tokenize, windows
from ..model.walker import device_of

_HEAD_CHUNK = 1024  # positions per output-head matmul: 1024 x 49152 fp32 logits = 200 MB


@dataclasses.dataclass
class PerplexityResult:
    ppl: float
    nll_sum: float
    tokens_scored: int
    windows: int
    ctx: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        """Tokens fed through the model per second (windows x ctx / seconds)."""
        return self.windows * self.ctx / self.seconds


def _result(nll: float, n: int, ctx: int, start: float) -> PerplexityResult:
    scored = n * (ctx - 1)
    return PerplexityResult(ppl_from_nll(nll, scored), nll, scored, n, ctx, time.perf_counter() - start)


def window_nll(model: torch.nn.Module, batch: torch.Tensor) -> float:
    """Summed next-token loss of a batch of windows (B, T), positions 1..T-1 scored."""
    labels = batch[:, 1:].reshape(-1)
    if not (hasattr(model, "model") and hasattr(model, "lm_head")):  # not a *ForCausalLM: plain path
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(labels.numel(), -1), labels, reduction="sum").item()
    hidden = model.model(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]  # (B, T-1, H)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    total = 0.0
    for i in range(0, hidden.shape[0], _HEAD_CHUNK):
        logits = model.lm_head(hidden[i:i + _HEAD_CHUNK]).float()
        total += F.cross_entropy(logits, labels[i:i + _HEAD_CHUNK], reduction="sum").item()
    return total


COMPUTE_DTYPES = ("float32", "bfloat16")


@torch.inference_mode()
def perplexity_of_windows(model: torch.nn.Module, wins: torch.Tensor, batch_size: int = 8,
                          progress: bool = True, compute_dtype: str = "float32") -> PerplexityResult:
    """compute_dtype "bfloat16": the products in bf16 under torch's autocast (AMX / AVX512-BF16 tiles where
    the CPU has them: ~1.5x on this protocol; the perplexity moves by ~0.1 %), losses in fp32; "float32":
    the model's own numbers."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, not {compute_dtype!r}")
    n, ctx = wins.shape
    device = device_of(model)
    nll, start = 0.0, time.perf_counter()
    cast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=compute_dtype == "bfloat16")
    with tqdm(total=n, desc="perplexity", unit="window", disable=not progress, leave=False) as bar, cast:
        for i in range(0, n, batch_size):
            nll += window_nll(model, wins[i:i + batch_size].to(device))
            bar.update(min(batch_size, n - i))
    return _result(nll, n, ctx, start)


def perplexity(model: torch.nn.Module, tokenizer, text: str | None = None, ctx: int = 512,  # noqa: ANN001
               max_windows: int | None = None, batch_size: int = 8,
               progress: bool = True, compute_dtype: str = "float32") -> PerplexityResult:
    """Perplexity of `model` on `text` (default: the standard library's evaluation text)."""
    text = load_text(None, "eval") if text is None else text
    wins = windows(tokenize(tokenizer, text), ctx, max_windows)
    return perplexity_of_windows(model, wins, batch_size, progress, compute_dtype)


@torch.no_grad()
def transformers_perplexity(model: torch.nn.Module, wins: torch.Tensor, progress: bool = True) -> PerplexityResult:
    """The plain transformers computation of the same protocol, for cross-checks and benchmarks:
    one window per call, `model(input_ids=w, labels=w).loss` (mean over the ctx-1 shifted labels)."""
    n, ctx = wins.shape
    device = device_of(model)
    nll, start = 0.0, time.perf_counter()
    for w in tqdm(wins, desc="perplexity (transformers)", unit="window", disable=not progress, leave=False):
        w = w[None].to(device)
        nll += model(input_ids=w, labels=w).loss.item() * (ctx - 1)
    return _result(nll, n, ctx, start)
