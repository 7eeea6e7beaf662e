"""Decode speed: new tokens per second after a short prompt, one sequence, KV cache on."""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..generate import generate_ids

SPEED_PROMPT = "The history of data compression begins with"


def decode_tokens_per_s(model: torch.nn.Module, tokenizer, new_tokens: int = 64,  # noqa: ANN001
                        prompt: str = SPEED_PROMPT, warmup: int = 4, progress: bool = True) -> float:
    """Greedy decode of `new_tokens` tokens after `prompt` (no stop at eos)."""
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    return decode_ids_per_s(model, ids, new_tokens, warmup, progress)


def decode_ids_per_s(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int = 64, warmup: int = 4,
                     progress: bool = False) -> float:
    """Greedy decode of `new_tokens` tokens after the (1, T) prompt `ids`; the prefill and the
    `warmup` first steps are not timed. Each step reads its token id back, so the timing also
    holds on an asynchronous device."""
    it = generate_ids(model, ids, new_tokens + warmup)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    n = sum(1 for _ in tqdm(it, total=new_tokens, desc="decode", unit="tok", disable=not progress, leave=False))
    return n / (time.perf_counter() - start)
