"""Decode speed: new tokens per second after a short prompt, one sequence, KV cache on.

A model the serving engine's fused decode takes (serve/fused_decode.py: Llama-family, CPU,
fp32 or GGUF-block layers) decodes through the engine's runner, the path `modelpress serve` runs;
anything else through transformers' forward with its cache (generate.generate_ids)."""
from __future__ import annotations

import time
from typing import Iterator

import torch
from tqdm.auto import tqdm

from ..generate import cache_blocks, fused_runner, generate_ids, runner_ids
from ..serve.runner import ModelRunner

SPEED_PROMPT = "The history of data compression begins with"


def decode_tokens_per_s(model: torch.nn.Module, tokenizer, new_tokens: int = 64,  # noqa: ANN001
                        prompt: str = SPEED_PROMPT, warmup: int = 4, progress: bool = True) -> float:
    """Greedy decode of `new_tokens` tokens after `prompt` (no stop at eos)."""
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    return decode_ids_per_s(model, ids, new_tokens, warmup, progress)


def runner_greedy_ids(model: torch.nn.Module, ids: torch.Tensor, max_new_tokens: int, runner=None,  # noqa: ANN001
                      block_size: int = 16) -> Iterator[int]:
    """Greedy new token ids after the (1, T) prompt `ids`, through `runner` (default: a
    serve.runner.ModelRunner with a cache just large enough): the engine's numbers, fused decode
    with int8 activations on GGUF blocks."""

    if runner is None:
        runner = ModelRunner(model, cache_blocks(ids.shape[1] + max_new_tokens, block_size), block_size)
    return runner_ids(runner, ids, max_new_tokens)


def decode_ids_per_s(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int = 64, warmup: int = 4,
                     progress: bool = False) -> float:
    """Greedy decode of `new_tokens` tokens after the (1, T) prompt `ids`; the prefill and the
    `warmup` first steps are not timed. Each step reads its token id back, so the timing also
    holds on an asynchronous device."""
    runner = fused_runner(model, ids.shape[1] + new_tokens + warmup)
    it = (runner_greedy_ids(model, ids, new_tokens + warmup, runner) if runner is not None
          else generate_ids(model, ids, new_tokens + warmup))
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    n = sum(1 for _ in tqdm(it, total=new_tokens, desc="decode", unit="tok", disable=not progress, leave=False))
    return n / (time.perf_counter() - start)
