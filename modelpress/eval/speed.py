"""Decode speed: new tokens per second after a short prompt, one sequence, KV cache on, through the
decoder model the engine runs (model/decoder.py via serve/runner.py: its C fast path where it
applies), so the figure is what `modelpress generate` and `serve` decode at batch 1."""
from __future__ import annotations

import time
from typing import Iterator

import torch
from tqdm.auto import tqdm

from ..model.decoder import supports
from ..serve.runner import ModelRunner, cache_blocks

SPEED_PROMPT = "The history of data compression begins with"


class _Seq:
    """The one sequence a runner decodes here, its blocks 0, 1, 2, ... in order."""

    def __init__(self, ids: list[int], blocks: int) -> None:
        self.token_ids, self.num_computed, self.block_table = list(ids), 0, list(range(blocks))
        self.adapter = -1  # the base (serve/sequence.py)


def greedy_ids(runner: ModelRunner, ids: torch.Tensor, max_new_tokens: int) -> Iterator[int]:
    """Greedy new token ids after the (1, T) prompt `ids` (no stop at eos) through `runner`, whose
    cache doubles as the tokens need it."""
    seq = _Seq(ids[0].tolist(), runner.num_blocks)
    runner.grow(cache_blocks(len(seq.token_ids), runner.block_size))
    seq.block_table = list(range(runner.num_blocks))
    logits = runner.run([seq], [len(seq.token_ids)])
    seq.num_computed = len(seq.token_ids)
    for _ in range(max_new_tokens):
        tok = int(logits[-1].argmax())
        yield tok
        seq.token_ids.append(tok)
        if len(seq.token_ids) > runner.num_blocks * runner.block_size:
            runner.grow(2 * runner.num_blocks)
            seq.block_table = list(range(runner.num_blocks))
        logits = runner.run([seq], [1])
        seq.num_computed += 1


def decode_tokens_per_s(model: torch.nn.Module, tokenizer, new_tokens: int = 64,  # noqa: ANN001
                        prompt: str = SPEED_PROMPT, warmup: int = 4, progress: bool = True) -> float | None:
    """Greedy decode of `new_tokens` tokens after `prompt` (no stop at eos); None for a model the
    decoder does not run (model/decoder.py FAMILIES)."""
    if not supports(model):
        return None
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    return decode_ids_per_s(model, ids, new_tokens, warmup, progress)


def decode_ids_per_s(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int = 64, warmup: int = 4,
                     progress: bool = False, fused: bool = True) -> float:
    """Greedy decode of `new_tokens` tokens after the (1, T) prompt `ids`; the prefill and the
    `warmup` first steps are not timed. Each step reads its token id back, so the timing also
    holds on an asynchronous device. fused=False: the decoder's torch path only."""
    runner = ModelRunner(model, cache_blocks(ids.shape[1] + new_tokens + warmup, 16), 16, fused_decode=fused)
    it = greedy_ids(runner, ids, new_tokens + warmup)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    n = sum(1 for _ in tqdm(it, total=new_tokens, desc="decode", unit="tok", disable=not progress, leave=False))
    return n / (time.perf_counter() - start)
