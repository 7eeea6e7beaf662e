"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, min-p, repetition
penalty, per-request seeds, and logprobs. Order as vLLM applies them: repetition penalty, then
temperature, then top-k, top-p and min-p filters, then a draw (or argmax at temperature 0)."""
from __future__ import annotations

import dataclasses
import math

import torch

SEED_MAX = 2**63 - 1   # torch.Generator.manual_seed takes a 64-bit integer; completion i draws with seed + i
# below this temperature a draw is argmax (vLLM's _SAMPLING_EPS): logits / 1e-45 overflow to inf and nan
GREEDY_BELOW = 1e-5


@dataclasses.dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                 # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None    # also return this many most likely alternatives per token
    n: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        finite = all(math.isfinite(v) for v in (self.temperature, self.top_p, self.min_p, self.repetition_penalty))
        checks = ((finite, "temperature, top_p, min_p and repetition_penalty must be finite numbers"),
                  (self.max_tokens >= 1, "max_tokens must be at least 1"),
                  (self.temperature >= 0, "temperature must be >= 0"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (self.top_k >= -1, "top_k must be -1, 0 (off) or positive"),
                  (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
                  (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be between 0 and 20"),
                  (1 <= self.n <= 64, "n must be between 1 and 64"),
                  (self.seed is None or 0 <= self.seed <= SEED_MAX - self.n,
                   f"seed must be between 0 and {SEED_MAX - self.n}"),
                  (all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids),
                   "stop_token_ids must be a list of integers"))
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def penalize(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """CTRL / transformers' repetition penalty on every token already in the sequence:
    positive logits divided by the penalty, negative ones multiplied."""
    if penalty == 1.0 or not seen:
        return logits
    idx = torch.tensor(sorted(set(seen)), device=logits.device)
    vals = logits[idx]
    logits = logits.clone()
    logits[idx] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def filtered(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits with everything outside top-k / top-p / min-p at -inf."""
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        probs, order = torch.sort(torch.softmax(logits, -1), descending=True)
        drop = probs.cumsum(-1) - probs > p.top_p   # keep the smallest prefix reaching top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    if p.min_p > 0:
        probs = torch.softmax(logits, -1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def sample(logits: torch.Tensor, p: SamplingParams, seen: list[int], generator: torch.Generator | None) -> int:
    """One token id from a (vocab,) fp32 logit vector."""
    logits = penalize(logits, seen, p.repetition_penalty)
    if p.greedy:  # numpy's argmax on a CPU: ~6 us against torch's ~60 us here; both take the first maximum
        return int(logits.numpy().argmax()) if logits.device.type == "cpu" else int(logits.argmax())
    probs = torch.softmax(filtered(logits, p), -1)
    if not bool(torch.isfinite(probs).all()):
        raise ValueError("the model's logits are not finite; nothing can be sampled")
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def top_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, dict[int, float]]:
    """The chosen token's log-probability and the k most likely alternatives' (model distribution)."""
    lp = torch.log_softmax(logits.float(), -1)
    top = torch.topk(lp, k) if k else None
    return float(lp[token]), ({int(i): float(v) for v, i in zip(top.values, top.indices)} if top is not None else {})


def stop_ids(model: torch.nn.Module, tokenizer: object) -> set[int]:
    """The end-of-sequence ids, one rule for the engine and `generate`: the model config's
    eos_token_id (an id or a list), its generation config's, and the tokenizer's eos token."""
    found: set[int] = set()
    for source in (getattr(model, "config", None), getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        found.update(e for e in (eos if isinstance(eos, (list, tuple, set)) else [eos]) if isinstance(e, int))
    return found
