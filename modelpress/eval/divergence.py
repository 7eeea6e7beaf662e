"""How far a compressed model's next-token distributions are from the original's, on the windows
of the perplexity protocol (eval/perplexity.py): mean KL divergence KL(p_ref || p) per scored
token, as llama.cpp's `llama-perplexity --kl-divergence` reports it, top-1 agreement (its "same
top p"), and the perplexity itself, in one pass.

    ref = reference(fp32_model, wins)                  # the original's next-token distributions
    d = divergence(quantized_model, wins, ref)         # d.ppl, d.kl_mean, d.top1_agreement

The reference keeps fp32 probabilities (llama.cpp stores 16-bit fixed-point log-probs) with
sum p log p per position precomputed, so a model compared with itself gives KL 0 up to float
rounding (< 1e-6) and each comparison is one pass over the vocabulary.
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
from .perplexity import _HEAD_CHUNK  # positions per output-head matmul, shared


@dataclasses.dataclass
class Divergence:
    ppl: float
    kl_mean: float          # mean over scored tokens of sum_v p_ref(v) (log p_ref(v) - log p(v)), nats
    kl_p99: float           # 99th percentile of the per-token KL
    top1_agreement: float   # share of scored tokens whose most likely next token is the reference's
    tokens_scored: int
    seconds: float
    ppl_stderr: float = 0.0  # ppl x the standard error of the mean token loss (llama-perplexity's "+/-")
    kl_stderr: float = 0.0   # the standard error of kl_mean (tokens taken as independent, as llama.cpp)


def _batch_chunks(model: torch.nn.Module, batch: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(window in batch, first position, (positions, vocab) fp32 log-probs) for every chunk of
    every window of a (B, ctx) batch, positions 0 .. ctx-2. One forward for the batch (a layer
    that expands its weight per call, such as GGUFLinear in prefill, does so once per batch), the
    output head a chunk at a time."""
    x = batch.to(device_of(model))
    if hasattr(model, "model") and hasattr(model, "lm_head"):
        hidden = model.model(input_ids=x, use_cache=False).last_hidden_state[:, :-1]
        for b, h in enumerate(hidden):
            for i in range(0, h.shape[0], _HEAD_CHUNK):
                yield b, i, F.log_softmax(model.lm_head(h[i:i + _HEAD_CHUNK]).float(), -1).cpu()
    else:
        for b, lg in enumerate(model(input_ids=x, use_cache=False).logits[:, :-1]):
            yield b, 0, F.log_softmax(lg.float(), -1).cpu()


def _all_chunks(model: torch.nn.Module, wins: torch.Tensor, desc: str, progress: bool,
                batch_size: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(window index, first position, log-probs) over every window, batch by batch."""
    with tqdm(total=wins.shape[0], desc=desc, unit="window", disable=not progress, leave=False) as bar:
        for i in range(0, wins.shape[0], batch_size):
            for b, pos, lp in _batch_chunks(model, wins[i:i + batch_size]):
                yield i + b, pos, lp
            bar.update(min(batch_size, wins.shape[0] - i))


@dataclasses.dataclass
class Reference:
    """What a comparison needs of the original model on the windows, computed once:
    probs (windows, ctx - 1, vocab) fp32; neg_entropy sum_v p log p and top1 argmax_v p per
    position; nll the summed next-token loss (the original's ppl)."""
    probs: torch.Tensor
    neg_entropy: torch.Tensor
    top1: torch.Tensor
    nll: float

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"probs": self.probs, "neg_entropy": self.neg_entropy, "top1": self.top1,
                "nll": torch.tensor([self.nll], dtype=torch.float64)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "Reference":
        return cls(t["probs"], t["neg_entropy"], t["top1"], float(t["nll"][0]))


@torch.inference_mode()
def reference(model: torch.nn.Module, wins: torch.Tensor, progress: bool = True, batch_size: int = 4) -> Reference:
    """The original model's next-token distributions on every window."""
    n, ctx = wins.shape
    probs = neg = top1 = None
    nll = 0.0
    for w, pos, lp in _all_chunks(model, wins, "reference", progress, batch_size):
        if probs is None:
            probs = torch.empty(n, ctx - 1, lp.shape[-1])
            neg, top1 = torch.empty(n, ctx - 1, dtype=torch.float64), torch.empty(n, ctx - 1, dtype=torch.long)
        end = pos + lp.shape[0]
        p = lp.exp()
        probs[w, pos:end] = p
        neg[w, pos:end] = (p * lp).sum(-1).double()
        top1[w, pos:end] = lp.argmax(-1)
        nll -= lp.gather(-1, wins[w, pos + 1:end + 1, None]).double().sum().item()
    return Reference(probs, neg, top1, nll)


def token_kl(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(p_ref || p) per position: sum over the vocabulary of exp(ref) * (ref - logprobs)."""
    return (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1)


@torch.inference_mode()
def divergence(model: torch.nn.Module, wins: torch.Tensor, ref: Reference, progress: bool = True,
               batch_size: int = 4) -> Divergence:
    """ppl, KL and top-1 agreement of `model` against `ref` (reference() on the same `wins`).
    KL per position = sum p log p (kept) - sum p log q: one pass over the vocabulary."""
    if ref.probs.shape[:2] != (wins.shape[0], wins.shape[1] - 1):
        raise ValueError(f"the reference {tuple(ref.probs.shape)} does not match {wins.shape[0]} windows of "
                         f"{wins.shape[1]}")
    start = time.perf_counter()
    same = 0
    kl = torch.empty(ref.neg_entropy.shape, dtype=torch.float64)
    nll = torch.empty(ref.neg_entropy.shape, dtype=torch.float64)
    for w, pos, lp in _all_chunks(model, wins, "ppl + KL", progress, batch_size):
        end = pos + lp.shape[0]
        p = ref.probs[w, pos:end]
        if lp.shape != p.shape:
            raise ValueError(f"vocabulary {lp.shape[-1]} differs from the reference's {p.shape[-1]}")
        nll[w, pos:end] = -lp.gather(-1, wins[w, pos + 1:end + 1, None]).double().squeeze(-1)
        kl[w, pos:end] = ref.neg_entropy[w, pos:end] - (p * lp).sum(-1).double()
        same += (lp.argmax(-1) == ref.top1[w, pos:end]).sum().item()
    kl, nll = kl.flatten(), nll.flatten()
    n = kl.numel()
    ppl = ppl_from_nll(nll.sum().item(), n)
    sem = (lambda t: (t.var(unbiased=True) / n).sqrt().item() if n > 1 else 0.0)
    return Divergence(ppl, kl.mean().item(), torch.quantile(kl, 0.99).item(), same / n, n,
                      time.perf_counter() - start, ppl * sem(nll), sem(kl))
