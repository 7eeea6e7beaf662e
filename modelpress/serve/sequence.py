"""A request's state inside the engine: its tokens, how many have been computed into the KV
cache, and its block table (the KV-cache blocks holding its tokens, in order). No torch."""
from __future__ import annotations

import dataclasses
import enum
import itertools
from typing import Any

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"      # not yet (or no longer, after preemption) holding KV blocks
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One completion: prompt + generated tokens. `num_computed` tokens are in the KV cache
    (positions 0 .. num_computed-1); the rest wait to be computed (prefill, possibly chunked, or
    the one newest token in decode)."""

    def __init__(self, prompt_ids: list[int], params: Any = None, request_id: str | None = None,
                 index: int = 0) -> None:
        if not prompt_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.seq_id = next(_ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.index = index                    # which of the request's n completions
        self.token_ids: list[int] = list(prompt_ids)
        self.num_prompt = len(prompt_ids)
        self.params = params
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.num_computed = 0
        self.num_cached = 0                   # prompt tokens found in the prefix cache at allocation
        self.finish_reason: str | None = None
        self.logprobs: list[Any] = []
        self.preemptions = 0
        self.adapter = -1                     # the LoRA adapter it runs with (nn/multi_lora.py); -1: the base

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    def num_blocks(self, block_size: int) -> int:
        return (len(self.token_ids) + block_size - 1) // block_size

    def block_tokens(self, i: int, block_size: int) -> list[int]:
        return self.token_ids[i * block_size:(i + 1) * block_size]

    def append(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id}, {self.status.value}, {len(self)} tokens, computed {self.num_computed}, "
                f"blocks {self.block_table})")


@dataclasses.dataclass
class ScheduledBatch:
    """One engine step: for each sequence, how many of its uncomputed tokens to run now."""
    seqs: list[Sequence]
    num_tokens: list[int]
    preempted: list[Sequence] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.seqs)
