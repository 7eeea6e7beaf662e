"""How far a compressed model's next-token distributions are from the original's, on the windows
of the perplexity protocol (eval/perplexity.py): mean KL divergence KL(p_ref || p) per scored
token, as llama.cpp's `llama-perplexity --kl-divergence` reports it, top-1 agreement (its "same
top p"), and the perplexity itself, in one pass.

    ref = reference_logprobs(fp32_model, wins)        # (windows, ctx - 1, vocab) fp32 log-probs
    d = divergence(quantized_model, wins, ref)         # d.ppl, d.kl_mean, d.top1_agreement

The reference is kept in fp32 (llama.cpp stores it as 16-bit fixed point), so a model compared
with itself gives KL 0 up to float rounding (< 1e-6).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.metrics import perplexity as ppl_from_nll
from ..model.walker import device_of

_HEAD_CHUNK = 1024  # positions per output-head matmul (1024 x 49152 fp32 logits = 200 MB)


@dataclasses.dataclass
class Divergence:
    ppl: float
    kl_mean: float          # mean over scored tokens of sum_v p_ref(v) (log p_ref(v) - log p(v)), nats
    kl_p99: float           # 99th percentile of the per-token KL
    top1_agreement: float   # share of scored tokens whose most likely next token is the reference's
    tokens_scored: int
    seconds: float


def _batch_logprobs(model: torch.nn.Module, batch: torch.Tensor) -> Iterator[torch.Tensor]:
    """For each window of a (B, ctx) batch: (ctx - 1, vocab) fp32 log-probs of the next token at
    positions 0 .. ctx-2. One forward for the batch (a layer that expands its weight per call,
    such as GGUFLinear in prefill, does so once per batch), the output head a chunk at a time."""
    x = batch.to(device_of(model))
    if hasattr(model, "model") and hasattr(model, "lm_head"):
        hidden = model.model(input_ids=x, use_cache=False).last_hidden_state[:, :-1]
        for h in hidden:
            yield torch.cat([F.log_softmax(model.lm_head(h[i:i + _HEAD_CHUNK]).float(), -1).cpu()
                             for i in range(0, h.shape[0], _HEAD_CHUNK)])
    else:
        for lg in model(input_ids=x, use_cache=False).logits[:, :-1]:
            yield F.log_softmax(lg.float(), -1).cpu()


def _all_logprobs(model: torch.nn.Module, wins: torch.Tensor, desc: str, progress: bool,
                  batch_size: int) -> Iterator[torch.Tensor]:
    with tqdm(total=wins.shape[0], desc=desc, unit="window", disable=not progress, leave=False) as bar:
        for i in range(0, wins.shape[0], batch_size):
            for lp in _batch_logprobs(model, wins[i:i + batch_size]):
                yield lp
                bar.update(1)


@torch.inference_mode()
def reference_logprobs(model: torch.nn.Module, wins: torch.Tensor, progress: bool = True,
                       batch_size: int = 4) -> torch.Tensor:
    """The reference model's log-probs on every window: (windows, ctx - 1, vocab) fp32."""
    n, ctx = wins.shape
    out = None
    for i, lp in enumerate(_all_logprobs(model, wins, "reference log-probs", progress, batch_size)):
        if out is None:
            out = torch.empty(n, ctx - 1, lp.shape[-1])
        out[i] = lp
    return out


def token_kl(ref: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(p_ref || p) per position: sum over the vocabulary of exp(ref) * (ref - logprobs)."""
    return (ref.exp() * (ref - logprobs)).sum(-1)


@torch.inference_mode()
def divergence(model: torch.nn.Module, wins: torch.Tensor, ref: torch.Tensor, progress: bool = True,
               batch_size: int = 4) -> Divergence:
    """ppl, KL and top-1 agreement of `model` against `ref` (reference_logprobs on the same `wins`)."""
    if ref.shape[:2] != (wins.shape[0], wins.shape[1] - 1):
        raise ValueError(f"reference log-probs {tuple(ref.shape)} do not match {wins.shape[0]} windows of {wins.shape[1]}")
    start = time.perf_counter()
    nll, kls, same = 0.0, [], 0
    for i, lp in enumerate(_all_logprobs(model, wins, "ppl + KL", progress, batch_size)):
        w, r = wins[i], ref[i].float()
        if lp.shape != r.shape:
            raise ValueError(f"vocabulary {lp.shape[-1]} differs from the reference's {r.shape[-1]}")
        nll -= lp.gather(-1, w[1:, None]).sum().item()
        kls.append(token_kl(r, lp))
        same += (lp.argmax(-1) == r.argmax(-1)).sum().item()
    kl = torch.cat(kls).double()
    n = kl.numel()
    return Divergence(ppl_from_nll(nll, n), kl.mean().item(), torch.quantile(kl, 0.99).item(), same / n, n,
                      time.perf_counter() - start)
