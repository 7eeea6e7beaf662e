"""Automatic mixed precision: one GGUF block type per linear layer, chosen for the least predicted
loss within a bits-per-weight budget.

Sensitivity is the diagonal Fisher information of each weight on calibration text (squared
gradients, as SqueezeLLM, Kim et al. 2023, sec. 3.1, with labels sampled from the model: see
fisher_diagonal), and a tensor's predicted loss under type T is 1/2 * sum(F * (W - Q_T(W))^2),
the second-order estimate of the mean KL divergence when that tensor alone is rounded. Per-tensor choices
then come from core/allocate.py. benchmarks/auto_mix.py checks that this proxy ranks tensors as
the measured KL does.

The budget is the GGUF file's bits per weight (all tensors, as llama.cpp reports BPW):
`target_bpw`, or the size of a llama.cpp mix (`target_mix="Q4_K_M"`). Embeddings, the output head
and norms keep the types that mix (default Q4_K_M) gives them; only the blocks' linear layers are
allocated. The quantized model holds GGUFLinear layers (saved as the modelpress format) and
exports to GGUF with exactly those types and bytes.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import BaseConfig, option
from ..core import kquants
from ..core.allocate import allocate
from ..errors import ModelpressError
from ..formats.gguf_mixes import MIXES, quantizable, tensor_types
from ..formats.gguf_writer import gguf_name, gguf_tensors
from ..model.walker import dense_weight, replace
from ..nn.gguf_linear import GGUFLinear
from ..record import record
from ..registry import register

DEFAULT_FORMATS = ("Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")


@dataclasses.dataclass(frozen=True)
class AutoConfig(BaseConfig):
    method = "auto"
    calibrated = True
    target_bpw: float | None = option(None, "bits per weight of the whole model (GGUF file), e.g. 4.5")
    target_mix: str | None = option(None, "the size of this llama.cpp mix instead, e.g. Q4_K_M")
    formats: tuple[str, ...] = option(DEFAULT_FORMATS, "the GGUF types to choose from, comma-separated")
    fisher_windows: int = option(8, "calibration windows for the Fisher information")

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", tuple(str(f).upper() for f in self.formats))  # q4_0 is Q4_0

        if (self.target_bpw is None) == (self.target_mix is None):
            raise ValueError("give one budget: target_bpw (e.g. 4.5) or target_mix (e.g. 'Q4_K_M')")
        if self.target_bpw is not None and not 1.5 < self.target_bpw <= 32:
            raise ValueError(f"target_bpw must be between 1.5 and 32 bits per weight, got {self.target_bpw}")
        if self.target_mix is not None and self.target_mix not in MIXES:
            raise ValueError(f"unknown GGUF mix {self.target_mix!r}; known: {', '.join(MIXES)}")
        bad = [f for f in self.formats if f not in kquants.BLOCK and f not in ("F16", "BF16")]
        if bad or not self.formats:
            raise ValueError(f"formats must be GGUF types among {', '.join(kquants.TYPES)}, F16, BF16; got {bad}")
        if self.fisher_windows < 1:
            raise ValueError("fisher_windows must be at least 1")

    @property
    def reference_mix(self) -> str:
        """The mix whose types the embeddings, output head and norms keep."""
        return self.target_mix or "Q4_K_M"


@dataclasses.dataclass
class Plan:
    types: dict[str, str]            # GGUF tensor name -> type, every tensor of the file
    file_type: str                   # the mix written as general.file_type
    costs: dict[str, dict[str, float]]  # allocated tensor -> {type: predicted mean KL, nats}
    budget_bits: float
    bits: float                      # total bits of the chosen types
    weights: int
    importance: Any = None           # an imatrix, where one was used (none yet)

    def table(self) -> str:
        """The chosen types, one line per block (q k v o gate up down), and the totals."""
        cols = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
        blocks: dict[int, dict[str, str]] = {}
        for name, kind in self.types.items():
            m = re.match(r"blk\.(\d+)\.(\w+)\.weight", name)
            if m and m.group(2) in cols:
                blocks.setdefault(int(m.group(1)), {})[m.group(2)] = kind
        lines = ["auto: chosen types (" + " ".join(cols) + ")"]
        lines += [f"  blk.{i:<3} " + " ".join(f"{row.get(c, '-'):<5}" for c in cols) for i, row in sorted(blocks.items())]
        counts = Counter(k for n, k in self.types.items() if n in self.costs)
        lines.append(f"auto: {', '.join(f'{n} {k}' for k, n in counts.most_common())}; "
                     f"{self.bits_per_weight:.3f} bits/weight for a budget of {self.budget_bits / self.weights:.3f}; "
                     f"predicted mean KL {sum(self.predicted.values()):.5f}")
        return "\n".join(lines)

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.weights

    @property
    def predicted(self) -> dict[str, float]:
        """Allocated tensor -> predicted mean KL of its chosen type."""
        return {n: c[self.types[n]] for n, c in self.costs.items()}


def type_bytes(kind: str, shape: tuple[int, ...]) -> int:
    n = math.prod(shape)
    if kind in kquants.BLOCK:
        block, nbytes = kquants.BLOCK[kind]
        return n // block * nbytes
    return n * {"F32": 4, "F16": 2, "BF16": 2}[kind]


def fisher_diagonal(model: torch.nn.Module, names: list[str], windows: list[torch.Tensor],
                    progress: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """{parameter name: diagonal Fisher information per token} for the named weights, so that
    1/2 * sum(F * delta^2) estimates the mean per-token KL(p || p') a change delta causes.

    Labels are sampled from the model's own next-token distribution (the true Fisher, the Hessian
    of the KL at delta = 0; the text's own tokens would give the empirical Fisher, which matches it
    only for a well-trained model). Per window the gradient G of the summed log-likelihood of the
    sampled labels has E[G^2] = T * (per-token Fisher): positions are sampled independently, so
    their cross terms vanish in expectation."""
    params = dict(model.named_parameters())
    wanted = [params[n] for n in names]
    was = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(False)
    for p in wanted:
        p.requires_grad_(True)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in zip(names, wanted)}
    gen = torch.Generator().manual_seed(seed)
    try:
        for w in tqdm(windows, desc="fisher", unit="window", disable=not progress, leave=False):
            x = w[None].to(wanted[0].device)
            logits = model(input_ids=x, use_cache=False).logits[0].float()  # (T, vocab)
            with torch.no_grad():
                y = torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=gen)[:, 0].to(logits.device)
            nll = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
            for n, g in zip(names, torch.autograd.grad(nll, wanted)):
                fisher[n] += g.float().pow(2) / (len(windows) * x.shape[1])
    finally:
        for n, p in params.items():
            p.requires_grad_(was[n])
    return fisher


def predicted_kl(fisher: torch.Tensor, w: torch.Tensor, kind: str) -> float:
    """The mean KL (nats per token) that rounding w to GGUF type `kind` adds, to second order: 1/2 sum F (w - q)^2,
    F the diagonal Fisher information of w (fisher_diagonal)."""
    return 0.5 * float((fisher * (w - kquants.rounded(w, kind)).pow(2)).sum())


def allocate_for(model: torch.nn.Module, config: AutoConfig, calib: list[torch.Tensor] | None,
                 progress: bool = True) -> Plan:
    """Measure sensitivities on `calib` and choose every linear layer's type."""

    if not calib:
        raise ModelpressError("auto needs calibration windows (--calib, or the default text)")
    cfg = model.config
    linears = {fqn: m for fqn, m in model.named_modules()
               if (isinstance(m, torch.nn.Linear) or hasattr(m, "dequantize")) and fqn.startswith("model.layers.")}
    shapes = _gguf_shapes(model)
    fixed = tensor_types(list(shapes.items()), config.reference_mix, cfg.num_attention_heads,
                         cfg.num_key_value_heads)
    names = {fqn: gguf_name(f"{fqn}.weight") for fqn in linears}
    free = set(names.values())
    weights = sum(math.prod(s) for s in shapes.values())
    if config.target_bpw is not None:
        budget = config.target_bpw * weights
    else:
        budget = 8 * sum(type_bytes(t, shapes[n]) for n, t in fixed.items())  # reference_mix is target_mix
    fixed_bits = 8 * sum(type_bytes(t, shapes[n]) for n, t in fixed.items() if n not in free)
    fisher = fisher_diagonal(model, [f"{f}.weight" for f in linears], calib[:config.fisher_windows], progress)
    costs, sizes, order, widths = [], [], [], []
    for fqn, m in tqdm(linears.items(), desc="sensitivity", unit="tensor", disable=not progress, leave=False):
        w = dense_weight(m)
        f = fisher[f"{fqn}.weight"]
        options = [k for k in config.formats if k not in kquants.BLOCK or w.shape[1] % kquants.BLOCK[k][0] == 0]
        if not options or not quantizable(names[fqn], tuple(w.shape)):
            raise ModelpressError(f"{fqn}: none of the formats {config.formats} fits rows of {w.shape[1]}")
        costs.append({k: predicted_kl(f, w, k) for k in options})
        sizes.append({k: 8 * type_bytes(k, tuple(w.shape)) for k in options})
        order.append(names[fqn])
        widths.append(w.shape[1])
    try:
        pick = allocate(costs, sizes, budget - fixed_bits)
    except ValueError:
        least = (fixed_bits + sum(min(s.values()) for s in sizes)) / weights
        narrow = {w: sorted(c) for w, c in zip(widths, costs) if len(c) < len(config.formats)}
        why = "".join(f"; rows of {w} fit only {', '.join(c)} (k-quants need multiples of 256)" for w, c in narrow.items())
        raise ModelpressError(f"a budget of {budget / weights:.2f} bits per weight is below the {least:.2f} that the "
                              f"smallest of the formats ({', '.join(config.formats)}) reach{why}; raise the budget or "
                              "add smaller formats") from None
    types = {n: (dict(zip(order, pick)).get(n, t)) for n, t in fixed.items()}
    bits = sum(8 * type_bytes(t, shapes[n]) for n, t in types.items())
    return Plan(types, config.reference_mix, dict(zip(order, costs)), budget, bits, weights)


def _gguf_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """GGUF name -> shape of every tensor the file will hold, in the writer's order."""

    return {n: tuple(t.shape) for n, t in gguf_tensors(model)}


@register(AutoConfig)
def _auto(model: torch.nn.Module, config: AutoConfig, calib: list[torch.Tensor] | None) -> torch.nn.Module:
    plan = allocate_for(model, config, calib)
    for fqn, m in list(model.named_modules()):
        if not fqn.startswith("model.layers.") or not (isinstance(m, torch.nn.Linear) or hasattr(m, "dequantize")):
            continue
        kind = plan.types[gguf_name(f"{fqn}.weight")]
        w = dense_weight(m)
        if kind in kquants.BLOCK:
            replace(model, fqn, GGUFLinear.from_blocks(kquants.quantize(w, kind), kind, w.shape[1]))
        else:
            m.weight.data = kquants.rounded(w, kind)  # F16 / BF16: the rounded values, kept as fp32
    record(model).plan = plan
    return model
