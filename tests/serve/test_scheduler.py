"""BlockManager and Scheduler, no model: a fake model whose next token is a function of every
earlier token, read back from a simulated paged KV cache. Random workloads (shared prefixes,
small caches that force preemption, chunked prefill, forks) must give every sequence the tokens
it gets when run alone, leak no block, and keep reference counts exact at every step."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from modelpress.serve.block_manager import BlockManager
from modelpress.serve.scheduler import Scheduler
from modelpress.serve.sequence import Sequence, Status

VOCAB = 50


def next_token(tokens: list[int]) -> int:
    h = 7
    for t in tokens:
        h = (h * 31 + t) % 1000003
    return h % VOCAB


def alone(prompt: list[int], max_new: int) -> list[int]:
    toks = list(prompt)
    for _ in range(max_new):
        toks.append(next_token(toks))
    return toks[len(prompt):]


class FakeRunner:
    """KV cache as {block id: [token at each slot]}: computing position p writes token p into
    its slot; a sequence's next token is computed from what its block table reads back."""

    def __init__(self, bm: BlockManager) -> None:
        self.bm = bm
        self.kv = {i: [None] * bm.block_size for i in range(len(bm.blocks))}

    def read(self, seq: Sequence, upto: int) -> list[int]:
        bs = self.bm.block_size
        return [self.kv[seq.block_table[p // bs]][p % bs] for p in range(upto)]

    def run(self, seq: Sequence, n: int) -> int | None:
        bs = self.bm.block_size
        start = seq.num_computed
        assert self.read(seq, start) == seq.token_ids[:start], "cache holds other tokens than the sequence"
        for p in range(start, start + n):
            self.kv[seq.block_table[p // bs]][p % bs] = seq.token_ids[p]
        return next_token(self.read(seq, start + n)) if start + n == len(seq) else None

    def copy(self, src: int, dst: int) -> None:
        self.kv[dst] = list(self.kv[src])


def check_invariants(bm: BlockManager, sched: Scheduler) -> None:
    refs = [0] * len(bm.blocks)
    for s in sched.running:
        assert len(s.block_table) * bm.block_size >= len(s) or s.num_uncomputed > 0
        for b in s.block_table:
            refs[b] += 1
    assert refs == [b.ref_count for b in bm.blocks]
    assert set(bm.free) == {i for i, r in enumerate(refs) if r == 0}
    assert len(sched.running) <= sched.max_num_seqs
    for h, bid in bm.cached.items():
        assert bm.blocks[bid].hash == h


def run_all(prompts, max_new, num_blocks, block_size, max_seqs, max_tokens, n_fork=0):
    bm = BlockManager(num_blocks, block_size)
    sched = Scheduler(bm, max_seqs, max_tokens)
    runner = FakeRunner(bm)
    seqs = [Sequence(p, params=m) for p, m in zip(prompts, max_new)]
    for s in seqs:
        sched.add(s)
    forks = {}
    steps = 0
    while sched.has_work:
        batch = sched.schedule()
        assert sum(batch.num_tokens) <= max_tokens
        check_invariants(bm, sched)
        assert batch or not sched.running, "no progress with sequences running"
        if not batch:
            raise AssertionError("stalled: nothing fits")
        for s, n in zip(batch.seqs, batch.num_tokens):
            tok = runner.run(s, n)
            s.num_computed += n
            bm.mark_computed(s)
            if tok is None:
                continue
            s.append(tok)
            if n_fork and s.params and s.num_generated == 1 and s.seq_id not in forks and s.index == 0:
                forks[s.seq_id] = []
                for k in range(n_fork):  # siblings from the same prompt, sharing its blocks
                    c = Sequence(s.token_ids[:s.num_prompt], params=s.params, index=k + 1)
                    c.token_ids = list(s.token_ids)
                    for src, dst in sched.spawn(s, c):
                        runner.copy(src, dst)
                    forks[s.seq_id].append(c)
            if s.num_generated >= s.params:
                sched.finish(s, "length")
        for s in list(sched.running):
            if s.num_generated >= s.params and s.num_uncomputed == 0:
                sched.finish(s, "length")
        check_invariants(bm, sched)
        steps += 1
        assert steps < 10000
    assert bm.num_used == 0 and bm.num_free == num_blocks, "blocks leaked"
    return seqs, forks, sched


prompt_sets = st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(prompts=prompt_sets, data=st.data(), block_size=st.sampled_from([1, 2, 4, 16]),
       max_seqs=st.integers(1, 8), max_tokens=st.integers(1, 64), shared=st.lists(st.integers(0, VOCAB - 1),
                                                                                  max_size=24))
def test_every_sequence_gets_its_own_tokens(prompts, data, block_size, max_seqs, max_tokens, shared):
    prompts = [shared + p for p in prompts]  # common prefixes exercise the prefix cache
    max_new = [data.draw(st.integers(1, 12)) for _ in prompts]
    need = max(-(-(len(p) + m) // block_size) for p, m in zip(prompts, max_new))
    num_blocks = data.draw(st.integers(need, need * 3))  # small: forces preemption
    seqs, _, sched = run_all(prompts, max_new, num_blocks, block_size, max_seqs, max_tokens)
    for s, p, m in zip(seqs, prompts, max_new):
        assert s.status is Status.FINISHED
        assert s.output_ids == alone(p, m)


@settings(max_examples=60, deadline=None)
@given(prompts=prompt_sets, block_size=st.sampled_from([2, 4]), n_fork=st.integers(1, 3))
def test_forks_share_the_prompt_and_diverge_safely(prompts, block_size, n_fork):
    max_new = [6] * len(prompts)
    need = max(-(-(len(p) + 6) // block_size) for p in prompts) * (n_fork + 1)
    seqs, forks, _ = run_all(prompts, max_new, need * 2, block_size, 16, 32, n_fork=n_fork)
    for s, p in zip(seqs, prompts):
        assert s.output_ids == alone(p, 6)
        for c in forks.get(s.seq_id, []):  # same first token, then its own (deterministic) path
            assert c.output_ids == alone(p, 6)


def test_preemption_happens_and_prefix_cache_hits():
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8] + [i] * 3 for i in range(6)]
    seqs, _, sched = run_all(prompts, [10] * 6, 8, 4, 6, 64)
    assert sched.preemptions > 0
    assert sched.bm.hits >= 8  # the shared 8-token prefix found at least once
    for s, p in zip(seqs, prompts):
        assert s.output_ids == alone(p, 10)


def test_freed_prefix_stays_cached_until_evicted_oldest_first():
    bm = BlockManager(4, 2)
    a = Sequence([1, 2, 3, 4, 5])
    bm.allocate(a)
    assert a.block_table == [0, 1, 2]
    a.num_computed = 5
    bm.mark_computed(a)  # blocks 0 and 1 are full: hashed
    bm.free_seq(a)
    assert list(bm.free) == [3, 2, 1, 0]  # the tail first: evicted before the prefix
    b = Sequence([1, 2, 3, 4, 9])  # shares the two full blocks
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.num_cached == b.num_computed == 4 and b.block_table[:2] == [0, 1]
    assert b.block_table[2] == 3  # least recently freed first
    c = Sequence([7, 7, 7, 7])
    assert not bm.can_allocate(c)  # 2 blocks needed, 1 free (block 2)
    bm.free_seq(b)
    d = Sequence([1, 2])  # whole prompt cached: its last token must still run
    bm.allocate(d)
    assert d.num_computed == 0


def test_a_sequence_larger_than_the_cache_is_refused():
    import pytest

    sched = Scheduler(BlockManager(2, 4))
    with pytest.raises(ValueError, match="needs 3 KV blocks"):
        sched.add(Sequence(list(range(9))))
