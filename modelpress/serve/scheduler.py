"""Iteration-level scheduling (Orca, vLLM): every engine step picks which sequences run and how
many tokens each, within a token budget and a maximum number of running sequences. No torch.

Each step:
1. running sequences first, oldest first: a decode needs 1 token, an unfinished (chunked)
   prefill the rest of its prompt, cut to the budget left. When the KV cache has no block for a
   sequence's next token, the newest running sequence is preempted (its blocks freed, put back
   at the front of the queue to be recomputed later; vLLM's recompute preemption) until it fits;
2. then waiting sequences, first come first served, while the budget, the sequence limit and the
   free blocks allow; a sequence's prefix found in the cache is not recomputed, and a prompt
   longer than the budget runs in chunks over several steps (chunked prefill).
"""
from __future__ import annotations

from collections import deque

from .block_manager import BlockManager
from .sequence import ScheduledBatch, Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 32, max_tokens: int = 512) -> None:
        if max_num_seqs < 1 or max_tokens < 1:
            raise ValueError("max_num_seqs and max_tokens must be positive")
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_tokens = max_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        need = seq.num_blocks(self.bm.block_size)
        if need > len(self.bm.blocks):
            raise ValueError(f"a sequence of {len(seq)} tokens needs {need} KV blocks; the cache has "
                             f"{len(self.bm.blocks)}")
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def spawn(self, parent: Sequence, child: Sequence) -> list[tuple[int, int]]:
        """Another completion of the parent's prompt (n > 1), its tokens already set: it shares the
        parent's computed blocks when a running slot and a block for the partial last one are free
        (returns the block copies the runner must make), else it queues and recomputes."""
        if len(self.running) < self.max_num_seqs and self.bm.can_fork(parent):
            copies = self.bm.fork(parent, child)
            child.status = Status.RUNNING
            self.running.append(child)
            return copies
        self.add(child)
        return []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free_seq(seq)
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch([], [])
        budget = self.max_tokens
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running:  # preempted below, for an older sequence
                continue
            while not self.bm.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.bm.append_slots(seq)
            n = min(seq.num_uncomputed, budget)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.bm.can_allocate(seq):
                break
            self.waiting.popleft()
            self.bm.allocate(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        return batch

    def finish(self, seq: Sequence, reason: str) -> None:
        """A sequence is done (or aborted): free its blocks, wherever it is."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.bm.free_seq(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
