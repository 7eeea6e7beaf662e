"""Engine: the step loop. Requests come in (`add_request`), each `step()` schedules a batch,
runs it, samples the sequences whose tokens are all computed, checks stops, and returns what
changed. `generate()` runs prompts to completion; `stream()` yields text as it comes.

    engine = Engine(model, tokenizer, max_num_seqs=32, kv_blocks=1024)
    out = engine.generate(["Once upon a time"], SamplingParams(max_tokens=32, temperature=0))
    print(out[0].outputs[0].text)

int8_activations (default True): on a CPU, GGUF Q8_0 / Q5_0 / Q4_K / Q6_K layers decode on their
blocks with activations rounded to int8 (per 32; per 256 for Q4_K / Q6_K), as llama.cpp does
(model/fused_decode.py); False keeps fp32 activations (the model's own forward's numbers, up to the
order of sums). kv_dtype (default "auto"): the KV cache's type, fp16 where every layer decodes on GGUF
blocks with int8 activations (as llama.cpp's cache), else the model's own (serve/runner.py).
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any, Iterator

import torch

from ..finetune.adapters import attach_adapters
from .block_manager import BlockManager
from .detokenize import TextStream
from .runner import ModelRunner
from .sampler import SamplingParams, sample, stop_ids, top_logprobs
from .scheduler import Scheduler
from .sequence import Sequence, Status


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None          # "stop", "length", "abort", "error" or None while running
    logprobs: list[dict[str, Any]] | None = None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    error: str | None = None           # why the request failed (it is finished then); None if it did not


@dataclasses.dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    generators: list[torch.Generator | None]
    arrival: float
    texts: list[str]
    stream: bool = True
    spawned: bool = False
    error: str | None = None
    detok: dict[int, TextStream] = dataclasses.field(default_factory=dict)  # by completion


class Engine:
    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_num_seqs: int = 32, kv_blocks: int = 1024,
                 block_size: int = 16, max_tokens_per_step: int = 512, prefix_caching: bool = True,
                 int8_activations: bool = True, kv_dtype: str = "auto", max_kv_blocks: int | None = None,
                 adapters: dict[str, Any] | None = None) -> None:
        """adapters: {name: LoRA adapter folder (PEFT's format)}, served beside the base; a request
        names one (add_request(adapter=...)), and requests for different adapters share steps."""
        # the adapters before the runner: its fast path computes the base of the layers they wrap
        self.adapter_names = attach_adapters(model, adapters) if adapters else []
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.block_manager = BlockManager(kv_blocks, block_size, prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_tokens_per_step)
        self.runner = ModelRunner(model, kv_blocks, block_size, int8_activations=int8_activations, kv_dtype=kv_dtype)
        # the cache doubles as sequences need blocks, up to this many (generate's: as tokens come)
        self.max_kv_blocks = max(kv_blocks, max_kv_blocks or 0)
        self.max_model_len = int(getattr(model.config, "max_position_embeddings", 2048))
        self.eos_ids = stop_ids(model, tokenizer)
        self.vocab_size = int(model.config.vocab_size)
        self.requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self.tokens_generated = 0
        self.steps = 0

    # -- requests ----------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, stream: bool = True, adapter: str | None = None) -> str:
        """Queue a request; returns its id. stream=False: `step()` reports it only once finished, and
        its text is decoded then (and each step only where stop strings must be looked for): 32
        requests x 128 tokens through HTTP spent ~10 % of their time decoding texts and handing
        over outputs nobody read."""
        params = params or SamplingParams()
        index = self.adapter_index(adapter)
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else list(prompt)
        self.check_request(ids, params)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is in use")
        # everything that can fail is built before the scheduler sees the sequence
        seq = Sequence(ids, params, rid, 0)
        seq.adapter = index
        gens = [None if params.seed is None else torch.Generator().manual_seed(params.seed + i)
                for i in range(params.n)]
        req = _Request(rid, ids, params, [seq], gens, time.time(), [""] * params.n, stream)
        self.scheduler.add(seq)
        self.requests[rid] = req
        return rid

    def adapter_index(self, adapter: str | None) -> int:
        """The index of a served adapter by name (-1: none, the base); ValueError for another name."""
        if adapter is None:
            return -1
        if adapter not in self.adapter_names:
            known = ", ".join(self.adapter_names) or "none"
            raise ValueError(f"no adapter named {adapter!r} is served (adapters: {known})")
        return self.adapter_names.index(adapter)

    def check_request(self, ids: list[int], params: SamplingParams) -> None:
        """ValueError if the request could never run: an empty prompt, a prompt that with max_tokens
        exceeds the model's context or the whole KV cache, or a token id outside the vocabulary.
        Reads only settings (thread-safe)."""
        if not isinstance(params, SamplingParams):
            raise ValueError("params must be a SamplingParams")
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                             f"{len(ids)} and max_tokens asks {params.max_tokens} more")
        bs, blocks = self.block_manager.block_size, self.max_kv_blocks
        if -(-(len(ids) + params.max_tokens) // bs) > blocks:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) needs more than the "
                             f"{blocks} KV blocks of {bs} tokens the cache has; raise kv_blocks or lower max_tokens")
        if not all(type(t) is int and 0 <= t < self.vocab_size for t in ids):  # not bool, a subclass of int
            bad = next(t for t in ids if not (type(t) is int and 0 <= t < self.vocab_size))
            raise ValueError(f"the prompt holds token id {bad!r}; token ids are integers from 0 to {self.vocab_size - 1}")

    def abort(self, request_id: str) -> None:
        """Stop a request (a client went away): its sequences finish and free their blocks."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for s in req.seqs:
            if s.status is not Status.FINISHED:
                self.scheduler.finish(s, "abort")

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # -- the loop ------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduled batch computed and sampled. A failure that concerns some requests (their
        forward pass, their sampling, their text) ends those requests alone, with `error` set on
        their output and their KV blocks freed; the others go on as if they had not been there."""
        self._grow()
        batch = self.scheduler.schedule()
        if not batch:
            if self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError("the KV cache cannot hold the next waiting sequence; raise kv_blocks")
            return []
        touched: dict[str, _Request] = {}
        rows = self._forward(batch.seqs, batch.num_tokens, touched)
        self.steps += 1
        for seq, n, logits in zip(batch.seqs, batch.num_tokens, rows):
            req = self.requests.get(seq.request_id)
            if logits is None or req is None or req.error is not None:
                continue
            seq.num_computed += n
            self.block_manager.mark_computed(seq)
            if seq.num_uncomputed or seq.status is not Status.RUNNING:  # a prefill chunk: nothing to sample yet
                continue
            try:
                self._advance(req, seq, logits)
            except Exception as err:  # noqa: BLE001 - this request's failure, not the engine's
                self._fail(req, err)
            touched[req.request_id] = req
        outs = [self._output(r) for r in touched.values() if r.stream or self._finished(r)]
        for o in outs:
            if o.finished:
                self.requests.pop(o.request_id, None)
        return outs

    def _grow(self) -> None:
        """Double the cache (up to max_kv_blocks) where the running sequences' next tokens and the
        first waiting prompt might not fit in the free blocks."""
        bm, have = self.block_manager, len(self.block_manager.blocks)
        waiting = self.scheduler.waiting
        need = len(self.scheduler.running) + (-(-len(waiting[0]) // bm.block_size) if waiting else 0)
        if have < self.max_kv_blocks and bm.num_free < need:
            n = min(self.max_kv_blocks, max(2 * have, have + need - bm.num_free))
            bm.grow(n)
            self.runner.grow(n)

    def _forward(self, seqs: list[Sequence], num_tokens: list[int], touched: dict[str, _Request]
                 ) -> list[torch.Tensor | None]:
        """Each sequence's logits row. If the batch fails, every sequence runs again alone (its
        cache slots are written again with the same values) and those that fail alone are failed:
        one request's bad input cannot end the others'."""
        try:
            logits = self.runner.run(seqs, num_tokens)
            return list(logits)
        except Exception:  # noqa: BLE001 - find whose it is below
            pass
        rows: list[torch.Tensor | None] = []
        for seq, n in zip(seqs, num_tokens):
            try:
                rows.append(self.runner.run([seq], [n])[0])
            except Exception as err:  # noqa: BLE001
                rows.append(None)
                req = self.requests.get(seq.request_id)
                if req is not None and req.error is None:
                    self._fail(req, err)
                    touched[req.request_id] = req
        return rows

    def _fail(self, req: _Request, err: BaseException) -> None:
        """End every sequence of the request with finish_reason "error" and free their blocks."""
        req.error = f"{type(err).__name__}: {err}" if not isinstance(err, ValueError) else str(err)
        req.spawned = True  # no more completions fork from it
        for s in req.seqs:
            if s.status is not Status.FINISHED:
                self.scheduler.finish(s, "error")
            s.finish_reason = "error"

    def _advance(self, req: _Request, seq: Sequence, logits: torch.Tensor) -> None:
        p = req.params
        if not req.spawned and p.n > 1:  # the prompt is computed: its other completions fork from here
            req.spawned = True
            for k in range(1, p.n):
                child = Sequence(req.prompt_ids, p, req.request_id, k)
                child.token_ids = list(seq.token_ids)
                child.adapter = seq.adapter
                self._append(req, child, logits)
                req.seqs.append(child)
                if child.status is Status.FINISHED:
                    continue
                self.runner.copy_blocks(self.scheduler.spawn(seq, child))
        self._append(req, seq, logits)

    def _append(self, req: _Request, seq: Sequence, logits: torch.Tensor) -> None:
        p = req.params
        tok = sample(logits, p, seq.token_ids, req.generators[seq.index])
        if p.logprobs is not None:
            lp, alts = top_logprobs(logits, tok, p.logprobs)
            seq.logprobs.append({"token_id": tok, "logprob": lp, "top": alts})
        seq.append(tok)
        self.tokens_generated += 1
        reason = None
        if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            reason = "stop"
        elif seq.num_generated >= p.max_tokens:
            reason = "length"
        if not (req.stream or p.stop or reason is not None):
            return  # nobody reads this text before the request finishes
        text = self._text(req, seq, final=reason is not None)
        if p.stop:
            cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
        req.texts[seq.index] = text
        if reason is not None:
            if seq.status is Status.RUNNING or seq.status is Status.WAITING:
                self.scheduler.finish(seq, reason)
            else:
                seq.status, seq.finish_reason = Status.FINISHED, reason

    def _text(self, req: _Request, seq: Sequence, final: bool) -> str:
        """The completion's text so far, decoded incrementally (serve/detokenize.py); its eos left out."""
        ids = seq.output_ids
        if ids and ids[-1] in self.eos_ids and not seq.params.ignore_eos:
            ids = ids[:-1]
        return req.detok.setdefault(seq.index, TextStream(self.tokenizer)).update(ids, final)

    def _output(self, req: _Request) -> RequestOutput:
        outs = []
        for s in sorted(req.seqs, key=lambda s: s.index):
            ids = s.output_ids
            outs.append(CompletionOutput(s.index, req.texts[s.index], ids, s.finish_reason,
                                         s.logprobs if req.params.logprobs is not None else None))
        return RequestOutput(req.request_id, req.prompt_ids, outs, self._finished(req), req.error)

    @staticmethod
    def _finished(req: _Request) -> bool:
        return (req.error is not None or len(req.seqs) == req.params.n) and all(s.status is Status.FINISHED for s in req.seqs)

    # -- conveniences ----------------------------------------------------------------------------------
    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 adapters: list[str | None] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion (prompt i with adapters[i], None: the base); outputs in the
        prompts' order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        alist = adapters or [None] * len(prompts)
        rids = [self.add_request(p, sp, stream=False, adapter=ad) for p, sp, ad in zip(prompts, plist, alist)]
        done: dict[str, RequestOutput] = {}
        while len(done) < len(rids):
            for o in self.step():
                if o.finished:
                    done[o.request_id] = o
        return [done[r] for r in rids]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output after every step that changed it (text so far)."""
        rid = self.add_request(prompt, params)
        while True:
            for o in self.step():
                if o.request_id == rid:
                    yield o
                    if o.finished:
                        return

    def stats(self) -> dict[str, float]:
        bm = self.block_manager
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_blocks_used": bm.num_used, "kv_blocks_total": len(bm.blocks),
                "tokens_generated": self.tokens_generated, "preemptions": self.scheduler.preemptions,
                "prefix_cache_hit_tokens": bm.hits, "prefix_cache_query_tokens": bm.queries}
