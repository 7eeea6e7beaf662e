"""The paged KV cache's bookkeeping: fixed-size blocks, per-sequence block tables, reference
counts, and automatic prefix caching. No torch: the runner owns the tensors, this owns the ids.

Prefix caching (vLLM's automatic prefix caching, nano-vllm's BlockManager): a block whose
`block_size` tokens are all computed gets a hash chained over the whole prefix,
h_i = hash((h_{i-1}, tokens of block i)), so equal hashes mean equal prefixes. A new sequence
whose first blocks' hashes are known reuses those blocks (reference count + 1) instead of
computing them. A block whose count drops to 0 goes to the free queue but keeps its hash and
contents, so it can still be reused until it is evicted: allocation takes free blocks from the
front of the queue, least recently freed first (a sequence frees its blocks last to first, so its
prefix stays cached longest).
"""
from __future__ import annotations

from collections import OrderedDict

from .sequence import Sequence


def _salt(seq: Sequence) -> int | None:
    """Where the hash chain starts: a LoRA adapter's keys and values differ from the base's, so its
    prefixes are cached apart (the base's chain starts at None)."""
    adapter = getattr(seq, "adapter", -1)
    return None if adapter < 0 else ("adapter", adapter)  # type: ignore[return-value]


def chain_hash(prev: int | None, tokens: list[int] | tuple[int, ...]) -> int:
    return hash((prev, tuple(tokens)))


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "tokens")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.tokens: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}       # prefix hash -> block id
        self.hits = 0                          # prompt tokens served from the prefix cache
        self.queries = 0                       # prompt tokens looked up

    def grow(self, num_blocks: int) -> None:
        """Blocks up to `num_blocks` in all, the new ones free (the runner grows the tensors)."""
        for i in range(len(self.blocks), num_blocks):
            self.blocks.append(Block(i))
            self.free[i] = None

    # -- state ------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return len(self.blocks) - len(self.free)

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Ids of the cached blocks equal to the sequence's leading full blocks; never all of its
        tokens (the last one must run to give logits)."""
        if not self.prefix_caching:
            return []
        hits, h = [], _salt(seq)
        full = (len(seq) - 1) // self.block_size
        for i in range(full):
            tokens = seq.block_tokens(i, self.block_size)
            h = chain_hash(h, tokens)
            bid = self.cached.get(h)
            if bid is None or self.blocks[bid].tokens != tuple(tokens):
                break
            hits.append(bid)
        return hits

    # -- allocation -------------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._prefix_hits(seq)
        free_hits = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return seq.num_blocks(self.block_size) - len(hits) <= self.num_free - free_hits

    def allocate(self, seq: Sequence) -> None:
        """Blocks for every token the sequence holds: prefix-cache hits first, then fresh ones.
        Sets seq.num_computed to the tokens the hits cover."""
        if seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} already holds blocks")
        if not self.can_allocate(seq):
            raise RuntimeError("not enough free KV blocks; check can_allocate first")
        hits = self._prefix_hits(seq)
        for bid in hits:
            b = self.blocks[bid]
            if b.ref_count == 0:
                del self.free[bid]
            b.ref_count += 1
        seq.block_table = hits + [self._fresh() for _ in range(seq.num_blocks(self.block_size) - len(hits))]
        seq.num_cached = seq.num_computed = len(hits) * self.block_size
        self.queries += len(seq) if seq.num_generated == 0 else 0
        self.hits += seq.num_cached if seq.num_generated == 0 else 0

    def _fresh(self) -> int:
        bid, _ = self.free.popitem(last=False)
        b = self.blocks[bid]
        if b.hash is not None:  # evict the prefix it cached
            if self.cached.get(b.hash) == bid:
                del self.cached[b.hash]
            b.hash, b.tokens = None, ()
        b.ref_count = 1
        return bid

    def can_append(self, seq: Sequence) -> bool:
        """Whether the sequence's tokens (one more than computed, in decode) all have slots."""
        return seq.num_blocks(self.block_size) - len(seq.block_table) <= self.num_free

    def append_slots(self, seq: Sequence) -> None:
        """New blocks for tokens the sequence gained since its blocks were given."""
        while len(seq.block_table) < seq.num_blocks(self.block_size):
            seq.block_table.append(self._fresh())

    def mark_computed(self, seq: Sequence) -> None:
        """After a step: hash every full block whose tokens are now all in the cache."""
        if not self.prefix_caching:
            return
        h = _salt(seq)
        for i in range(seq.num_computed // self.block_size):
            b = self.blocks[seq.block_table[i]]
            tokens = tuple(seq.block_tokens(i, self.block_size))
            h = chain_hash(h, tokens)
            if b.hash is None:
                if h not in self.cached:
                    self.cached[h] = b.block_id
                b.hash, b.tokens = h, tokens
            elif b.hash != h:  # cannot happen: a block's tokens never change once full
                raise AssertionError(f"block {b.block_id} hash changed")

    def free_seq(self, seq: Sequence) -> None:
        """Release the sequence's blocks, last to first; cached contents stay until evicted."""
        for bid in reversed(seq.block_table):
            b = self.blocks[bid]
            b.ref_count -= 1
            if b.ref_count < 0:
                raise AssertionError(f"block {bid} freed twice")
            if b.ref_count == 0:
                if b.hash is None or self.cached.get(b.hash) != bid:
                    b.hash, b.tokens = None, ()  # nothing reusable in it
                self.free[bid] = None
        seq.block_table = []
        seq.num_computed = 0

    def fork(self, parent: Sequence, child: Sequence) -> list[tuple[int, int]]:
        """The child shares the parent's blocks; a last, partly filled block is copied (its
        tokens will differ). Returns the (source, destination) block copies the runner must make."""
        full = parent.num_computed // self.block_size
        shared = parent.block_table[:full]
        for bid in shared:
            self.blocks[bid].ref_count += 1
        child.block_table = list(shared)
        copies = []
        for bid in parent.block_table[full:]:
            new = self._fresh()
            copies.append((bid, new))
            child.block_table.append(new)
        child.num_computed = parent.num_computed
        return copies

    def can_fork(self, parent: Sequence) -> bool:
        return len(parent.block_table) - parent.num_computed // self.block_size <= self.num_free
