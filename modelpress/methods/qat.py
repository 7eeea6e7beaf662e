"""Quantization-aware training that lands in the real format (issue 25).

The decoder's linear layers train against the exact rounding of the format the model will be
written in: a GGUF mix (each tensor's type as llama.cpp's quantizer picks it for that mix: Q4_0,
Q4_K_M's Q4_K / Q6_K, ...; core/kquants.py's reference quantizer, byte-exact with llama.cpp), RTN
integers (RTNConfig: the codes IntxLinear stores, GPTQ's layout on export) or NF4 / FP4 (the
Code4Linear codes, double quantization included). The forward multiplies by the rounded weights,
the backward passes through the rounding (straight-through estimator, nn/fake_quant.py); the loss
is the distillation KL(teacher || student) of the next-token distributions at every position, the
teacher being the model as it was (its logits computed on the fly, no grad). Full QAT trains the
layers' weights; QAT + LoRA (`lora_rank`) freezes them and trains a low-rank update of each, rounded
merged (the memory of AdamW's state for ~1 % of the weights). Embeddings, norms and
the output head do not train (the head is the tied embedding in the default model; the exporter
rounds them as the format says).

    model, tok = modelpress.load()
    qat(model, tok, "Q4_0", "calib.txt", QATTrainConfig(steps=100))   # model: fp32 again, trained
    modelpress.export_gguf(model, tok, "qat-q4_0.gguf", "Q4_0")        # the real quantizer: same codes

`convert` happens in `qat` itself: after training the layers are plain nn.Linear holding the trained
fp32 weights, which every quantizer and exporter takes as it takes any model, so calibrated methods
compose (QAT, then GPTQ or an imatrix).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import time
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import BaseConfig
from ..core import kquants
from ..data import calibration_windows
from ..errors import ModelpressError
from ..finetune.train import warmup_cosine
from ..formats.gguf_mixes import MIXES, tensor_types
from ..formats.gguf_writer import gguf_name, gguf_tensors
from ..model.walker import replace
from ..nn import Code4Linear, IntxLinear
from ..nn.fake_quant import FakeQuantLinear, Rounding
from .bnb4 import NF4Config
from .rtn import RTNConfig

Target = str | RTNConfig | NF4Config  # a GGUF mix, or the weight-only config the model will be quantized with


@dataclasses.dataclass(frozen=True)
class QATTrainConfig:
    """`steps` AdamW steps on `batch` windows of `ctx` tokens each, from the first `windows` windows of
    the training text (shuffled, cycled), lr with a linear warmup over `warmup` of the steps then
    cosine decay to zero; `lora_rank` > 0 trains a low-rank update of each weight instead of the
    weights (nn/fake_quant.py: the merged weight is what is rounded)."""

    steps: int = 100
    batch: int = 4
    ctx: int = 256
    windows: int = 128
    lr: float = 1e-5
    warmup: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    lora_rank: int = 0  # > 0: QAT + LoRA (the weights frozen, a low-rank update of each trains)

    def __post_init__(self) -> None:
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be 0 (full QAT) or positive, got {self.lora_rank}")
        for name in ("steps", "batch", "ctx", "windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and 0 <= self.warmup < 1):
            raise ValueError("lr must be positive and warmup in [0, 1)")


def _as_linear(w: torch.Tensor) -> Any:
    """What the layers' from_linear read of an nn.Linear: its weight, sizes and (no) bias."""
    return types.SimpleNamespace(weight=w, in_features=w.shape[1], out_features=w.shape[0], bias=None)


def _rtn(w: torch.Tensor, config: RTNConfig) -> torch.Tensor:
    return IntxLinear.from_linear(_as_linear(w), config.bits, config.group_size, config.symmetric).dequantize()


def _code4(w: torch.Tensor, config: NF4Config) -> torch.Tensor:
    return Code4Linear.from_linear(_as_linear(w), config.quant_type, config.blocksize,
                                   config.double_quant).dequantize()


def _linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {fqn: m for fqn, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and fqn.startswith("model.layers.")}  # DenseLinear too


def roundings(model: torch.nn.Module, target: Target) -> dict[str, tuple[Rounding, str]]:
    """{layer name: (its rounding, a label)} of the decoder's linear layers under `target`."""
    linears = _linears(model)
    if not linears:
        raise ModelpressError("QAT trains a float model's decoder layers (nn.Linear under model.layers); this model "
                              "has none (already quantized? start from the float model)")
    if isinstance(target, str):
        mix = target.upper()
        if mix not in MIXES or mix in ("F32", "F16", "BF16"):
            raise ModelpressError(f"unknown GGUF type {target!r} for QAT; give a quantized mix such as Q4_0, Q4_K_M")
        cfg = model.config
        kinds = tensor_types([(n, tuple(t.shape)) for n, t in gguf_tensors(model)], mix, cfg.num_attention_heads,
                             cfg.num_key_value_heads)
        out = {}
        for fqn in linears:
            kind = kinds[gguf_name(f"{fqn}.weight")]
            out[fqn] = (functools.partial(kquants.rounded, kind=kind), kind)
        return out
    if isinstance(target, RTNConfig):
        label = f"rtn w{target.bits} g{target.group_size or 'channel'}"
        return {fqn: (functools.partial(_rtn, config=target), label) for fqn in linears}
    if isinstance(target, NF4Config):  # FP4Config too
        label = f"{target.quant_type} b{target.blocksize}" + (" dq" if target.double_quant else "")
        return {fqn: (functools.partial(_code4, config=target), label) for fqn in linears}
    kind = target.method if isinstance(target, BaseConfig) else type(target).__name__
    raise ModelpressError(f"QAT trains against a GGUF mix, RTN integers or NF4 / FP4; not {kind}")


def prepare(model: torch.nn.Module, target: Target, lora_rank: int = 0) -> torch.nn.Module:
    """The decoder's linear layers as FakeQuantLinear for `target` (in place); every other parameter
    frozen. lora_rank > 0: their weights frozen too, a rank-`lora_rank` update of each trains (QAT + LoRA)."""
    plan = roundings(model, target)
    for p in model.parameters():
        p.requires_grad_(False)
    for fqn, (rounding, label) in plan.items():
        replace(model, fqn, FakeQuantLinear(model.get_submodule(fqn), rounding, label, rank=lora_rank))
    return model


def convert(model: torch.nn.Module) -> torch.nn.Module:
    """FakeQuantLinear layers back to nn.Linear with their trained fp32 weights (in place)."""
    for fqn, m in list(model.named_modules()):
        if isinstance(m, FakeQuantLinear):
            replace(model, fqn, m.to_linear())
    return model


def distill_loss(student: torch.nn.Module, teacher: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) of the next-token distributions."""
    with torch.no_grad():
        p_log = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), -1)
    q_log = F.log_softmax(student(input_ids=ids, use_cache=False).logits.float(), -1)
    kl = (p_log.exp() * (p_log - q_log)).sum(-1)
    return kl.mean()


def qat(model: torch.nn.Module, tokenizer: Any, target: Target, text: str | Path | None = None,
        train: QATTrainConfig = QATTrainConfig(), progress: bool = True) -> list[dict[str, Any]]:
    """Train `model`'s decoder layers (in place) against `target`'s rounding by distillation from the
    model as it was, on windows of `text` (default: the standard library's text); returns the
    per-step history. The model comes back float (nn.Linear layers): quantize or export it with
    `target`'s own quantizer to get the codes it trained against."""
    wins = calibration_windows(tokenizer, text, train.ctx, train.windows)
    if not wins:
        raise ModelpressError(f"the training text holds fewer than {train.ctx} tokens; give a longer --calib or a "
                              "smaller --ctx")
    return qat_windows(model, target, wins, train, progress)


def qat_windows(model: torch.nn.Module, target: Target, wins: list[torch.Tensor],
                train: QATTrainConfig = QATTrainConfig(), progress: bool = True) -> list[dict[str, Any]]:
    """`qat` on these token windows (each of one length; `train.ctx` and `train.windows` are not used)."""
    teacher = copy.deepcopy(model).eval()
    prepare(model, target, train.lora_rank)
    try:
        return distill(model, teacher, wins, train, progress, desc="qat")
    finally:
        convert(model)


def distill(model: torch.nn.Module, teacher: torch.nn.Module, wins: list[torch.Tensor], train: QATTrainConfig,
            progress: bool = True, desc: str = "distill") -> list[dict[str, Any]]:
    """Train `model`'s parameters that require grad to match `teacher`'s next-token distributions
    (distill_loss) on `wins`, `train.batch` windows a step; returns the per-step history. QAT's loop,
    and the recovery of a pruned model (methods/prune.py) from the model before pruning."""
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ModelpressError("nothing to train: no parameter of the model requires grad")
    torch.manual_seed(train.seed)
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    warmup = int(train.warmup * train.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, train.steps, warmup))
    order = torch.randperm(len(wins), generator=torch.Generator().manual_seed(train.seed)).tolist()
    history: list[dict[str, Any]] = []
    model.train()
    try:
        with tqdm(total=train.steps, desc=desc, unit="step", disable=not progress, dynamic_ncols=True) as bar:
            for step in range(train.steps):
                t0 = time.perf_counter()
                ids = torch.stack([wins[order[(step * train.batch + i) % len(wins)]] for i in range(train.batch)])
                loss = distill_loss(model, teacher, ids)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                entry = {"step": step + 1, "kl": float(loss.detach()), "lr": sched.get_last_lr()[0],
                         "seconds": time.perf_counter() - t0}
                history.append(entry)
                bar.set_postfix(kl=f"{entry['kl']:.4f}")
                bar.update(1)
    finally:
        model.eval()
    return history
