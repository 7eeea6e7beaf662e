"""Fine-tuning: LoRA / QLoRA adapters trained on a .txt or .jsonl file (finetune/data.py).

AdamW on the adapters only, linear warmup then cosine decay to zero, gradient accumulation, optional
gradient checkpointing, a held-out split whose loss is logged every `eval_every` steps, a
checkpoint (adapter + optimizer + schedule + data position) every `save_every` steps and on Ctrl-C,
`resume`, and repeatable runs for a seed. The loss is the mean cross-entropy over the target tokens
of the whole (global) batch: under `torchrun` each process takes its share of the batch's rows and
the adapters' gradients are summed across processes (torch.distributed: gloo on a CPU, nccl on a
GPU), which gives the single process's loss and update for the same batch.

Speed on a CPU: the frozen base multiplies in bf16 where the CPU has native bf16 (AMX / AVX-512
BF16; `compute="auto"`), the adapters and the optimizer stay fp32; the output head's logits are
computed only at target positions, in chunks, with their gradient in the same pass (a 49k-word
vocabulary's fp32 logits for 4 x 512 tokens would be 1.6 GB).
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..errors import ModelpressError
from ..nn.dense_linear import native_half_gemm
from .adapters import adapter_state, fill_adapter, read_adapter, save_adapter
from .data import Example, batch, examples
from .lora import LoraConfig, add_lora, pissa_to_lora

COMPUTE = ("auto", "float32", "bfloat16")
HEAD_CHUNK = 512  # target positions per output-head chunk (512 x 49152 fp32 logits: 100 MB)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train: `steps` optimizer steps (or `epochs` over the training rows), `batch` rows a
    step (across all processes) times `grad_accum`, windows of `ctx` tokens, AdamW at `lr` with
    `warmup` (a fraction of the steps) then cosine decay."""

    steps: int | None = None
    epochs: float = 1.0
    batch: int = 4
    grad_accum: int = 1
    ctx: int = 512
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: float = 0.03
    max_grad_norm: float = 1.0
    eval_fraction: float = 0.05
    eval_every: int = 50
    save_every: int = 100
    seed: int = 0
    gradient_checkpointing: bool = False
    compute: str = "auto"

    def __post_init__(self) -> None:
        for name in ("batch", "grad_accum", "ctx", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if not (self.lr > 0 and 0 <= self.warmup < 1 and 0 <= self.eval_fraction < 1):
            raise ValueError("lr must be positive, warmup and eval_fraction in [0, 1)")
        if self.compute not in COMPUTE:
            raise ValueError(f"compute must be one of {', '.join(COMPUTE)}, got {self.compute!r}")


@dataclasses.dataclass
class TrainResult:
    model: torch.nn.Module
    history: list[dict[str, Any]]
    out: Path | None


def _compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if native_half_gemm(torch.bfloat16) else torch.float32
    return getattr(torch, name)


class _HeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of the output head's logits, chunk by chunk, with the hidden states'
    gradient computed in the same pass (the loss is the graph's end, so dL/dlogits = softmax - onehot
    is known in the forward): no logits are kept, each chunk's are read three times instead of the
    five times of log_softmax, its recomputation and its backward (1.6 s of a 6 s step for 2044
    positions x 49152 words, fp32, before)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,  # noqa: ANN001
                cap: float | None, dtype: torch.dtype) -> torch.Tensor:
        w = weight.detach().to(dtype)
        want = ctx.needs_input_grad[0]  # not under eval_loss's no_grad: the loss alone
        grad = torch.empty(hidden.shape if want else (0,), dtype=dtype, device=hidden.device)
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        with torch.no_grad():
            for i in range(0, targets.numel(), HEAD_CHUNK):
                h, t = hidden[i:i + HEAD_CHUNK].to(dtype), targets[i:i + HEAD_CHUNK]
                z = (h @ w.t()).float()                                  # (n, vocab)
                tanh = None
                if cap:  # gemma's final soft-capping: z -> tanh(z / cap) * cap
                    tanh = torch.tanh(z.div_(cap))
                    z = tanh * cap
                rows = torch.arange(t.numel(), device=t.device)
                picked = z[rows, t]
                top = z.amax(-1, keepdim=True)
                p = z.sub_(top).exp_()                                   # in place: no (n, vocab) temporaries
                norm = p.sum(-1, keepdim=True)
                total += (top.squeeze(1) + norm.log().squeeze(1) - picked).double().sum()
                if not want:
                    continue
                p.div_(norm)                                             # softmax
                p[rows, t] -= 1.0                                        # dL/dlogits
                if tanh is not None:
                    p.mul_(1 - tanh * tanh)
                grad[i:i + HEAD_CHUNK] = p.to(dtype) @ w
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return total.float()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN001, ANN205
        (grad,) = ctx.saved_tensors
        return (grad * grad_out).to(ctx.hidden_dtype), None, None, None, None


def loss_sum(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the target tokens (mask) of a batch, each predicted from the ones before."""
    body = getattr(model, model.base_model_prefix)
    hidden = body(input_ids=ids).last_hidden_state
    sel = mask[:, 1:]
    h, t = hidden[:, :-1][sel], ids[:, 1:][sel]
    head, cap = model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or getattr(head, "bias", None) is not None or weight.requires_grad:
        raise ModelpressError("fine-tuning reads the output head as a frozen weight matrix; this model's head is a "
                              f"{type(head).__name__}")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
    with torch.autocast(device, enabled=False):
        return _HeadCrossEntropy.apply(h, t, weight, cap, dtype)


@functools.cache
def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None elsewhere. A step frees ~1 GB of transient tensors of many sizes
    (dequantized frozen weights, activations); glibc keeps freed heap pages, so without a trim
    between steps the resident high-water mark grows with the fragmentation (QLoRA on the default
    model with checkpointing: 2297 MB over 4 steps, against ~1560 MB for one step from a trimmed heap)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _world() -> tuple[int, int]:
    """(rank, world size); starts torch.distributed under torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """The learning-rate factor at `step`: linear warmup over `warmup` steps, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class _Order:
    """Row `p` of the training stream: epoch p // n of a seeded permutation per epoch."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self.perms: dict[int, torch.Tensor] = {}

    def __getitem__(self, p: int) -> int:
        e = p // self.n
        if e not in self.perms:
            self.perms[e] = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + e))
        return int(self.perms[e][p % self.n])


def _split(rows: list[Example], cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed))
    n_eval = min(len(rows) - 1, max(1, round(len(rows) * cfg.eval_fraction))) if cfg.eval_fraction else 0
    held = [rows[i] for i in order[:n_eval]]
    return [rows[i] for i in order[n_eval:]], held


@torch.no_grad()
def eval_loss(model: torch.nn.Module, rows: list[Example], batch_size: int, dtype: torch.dtype) -> float:
    """Mean cross-entropy per target token over `rows`."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(rows), batch_size):
        ids, mask = batch(rows[i:i + batch_size])
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            total += float(loss_sum(model, ids.to(device), mask.to(device)))
        count += int(mask[:, 1:].sum())
    return total / max(1, count)


def _save_checkpoint(model, lora: LoraConfig, out: Path, state: dict[str, Any]) -> None:  # noqa: ANN001
    tmp = out / "checkpoint.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, lora, tmp / "adapter")
    torch.save(state, tmp / "trainer_state.pt")
    final = out / "checkpoint"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def finetune(model: torch.nn.Module, tokenizer: Any, data: str | Path | None, lora: LoraConfig,
             train: TrainConfig, out: str | Path | None = None, resume: bool = False, progress: bool = True,
             base_config: Any = None) -> TrainResult:
    """Train LoRA adapters on `model` (in place) and, with `out`, write them there in PEFT's format
    with training_log.json beside them.

        model, tok = modelpress.load()
        finetune(model, tok, "data.jsonl", LoraConfig(r=16), TrainConfig(steps=200), out="adapter")
    """
    if lora.init == "loftq":
        raise ModelpressError("finetune starts adapters with the kaiming, gaussian or pissa init; LoftQ replaces the "
                              "base by its own quantization, which the adapter folder does not hold (add_lora with "
                              "init='loftq' gives the model in the library)")
    rank, world = _world()
    if train.batch % world:
        raise ModelpressError(f"--batch {train.batch} does not split over {world} processes; give a multiple")
    out = Path(out) if out is not None else None
    if resume and (out is None or not (out / "checkpoint" / "trainer_state.pt").is_file()):
        raise ModelpressError(f"nothing to resume: {out}/checkpoint does not exist (start without --resume)")
    rows, held = _split(examples(tokenizer, data, train.ctx), train)
    total = train.steps or math.ceil(train.epochs * len(rows) / (train.batch * train.grad_accum))
    device = next(model.parameters()).device
    dtype = _compute_dtype(train.compute, device)
    state: dict[str, Any] = {"step": 0, "history": []}
    saved = None
    if resume:
        state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
        lora, saved = read_adapter(out / "checkpoint" / "adapter")
    else:
        torch.manual_seed(train.seed)
    add_lora(model, lora, base_config)  # on resume too: PiSSA's init makes the same residual base again
    # PiSSA: the initial adapter (deterministic from the base), for the conversion on save
    initial = ({k: t.clone() for k, t in adapter_state(model).items()} if lora.init == "pissa" else None)
    if saved is not None:
        fill_adapter(model, saved, out / "checkpoint" / "adapter")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    warmup = int(train.warmup * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, warmup))
    if resume:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
    if train.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    order = _Order(len(rows), train.seed)
    history: list[dict[str, Any]] = state["history"]
    bar = tqdm(total=total, initial=state["step"], desc="finetune", unit="step", disable=not progress or rank > 0,
               dynamic_ncols=True)
    step = state["step"]
    try:
        while step < total:
            t0 = time.perf_counter()
            micro = [[rows[order[(step * train.grad_accum + m) * train.batch + i]] for i in range(train.batch)]
                     for m in range(train.grad_accum)]
            count = sum(int(mask[1:].sum()) for mb in micro for _, mask in mb)  # the global batch's targets
            loss_total = 0.0
            for mb in micro:
                ids, mask = batch(mb[rank::world])
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    loss = loss_sum(model, ids.to(device), mask.to(device)) / count
                loss.backward()
                loss_total += float(loss.detach())
            if world > 1:
                for p in params:
                    dist.all_reduce(p.grad)
                reduced = torch.tensor([loss_total], device=params[0].device)  # nccl: on the GPU
                dist.all_reduce(reduced)
                loss_total = float(reduced)
            torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if (trim := _malloc_trim()) is not None:
                trim(0)
            step += 1
            seconds = time.perf_counter() - t0
            entry = {"step": step, "loss": loss_total, "lr": sched.get_last_lr()[0], "seconds": seconds,
                     "tokens_per_s": sum(r[0].numel() for mb in micro for r in mb) / seconds}
            if held and (step % train.eval_every == 0 or step == total):
                model.eval()
                entry["eval_loss"] = eval_loss(model, held, train.batch, dtype)
                model.train()
            history.append(entry)
            bar.set_postfix(loss=f"{loss_total:.4f}", tok_s=f"{entry['tokens_per_s']:.0f}",
                            **({"eval": f"{entry['eval_loss']:.4f}"} if "eval_loss" in entry else {}))
            bar.update(1)
            if out is not None and rank == 0 and step % train.save_every == 0 and step < total:
                _save_checkpoint(model, lora, out, _state(step, opt, sched, history))
    except KeyboardInterrupt:
        bar.close()
        if out is not None and rank == 0:
            _save_checkpoint(model, lora, out, _state(step, opt, sched, history))
            raise ModelpressError(f"interrupted at step {step} of {total}; the checkpoint is in {out / 'checkpoint'}: "
                                  "run the same command with --resume to go on") from None
        raise
    bar.close()
    model.eval()
    if out is not None and rank == 0:
        if initial is not None:  # the adapter for the original base, as PEFT converts PiSSA on save
            config, state = pissa_to_lora(lora, adapter_state(model), initial)
            save_adapter(model, config, out, state=state)
        else:
            save_adapter(model, lora, out)
        (out / "training_log.json").write_text(json.dumps({"lora": dataclasses.asdict(lora),
                                                            "train": dataclasses.asdict(train),
                                                            "processes": world, "history": history}, indent=1))
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
    return TrainResult(model, history, out)


def _state(step: int, opt, sched, history: list) -> dict[str, Any]:  # noqa: ANN001
    return {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "history": history,
            "rng": torch.get_rng_state()}
