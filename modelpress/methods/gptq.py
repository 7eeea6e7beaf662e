"""GPTQ (arXiv:2210.17323): one decoder block at a time, each linear layer quantized column by
column against the Hessian of its calibration inputs (core/gptq.py), stored as IntxLinear.

    GPTQConfig(bits=4, group_size=64)                     # asymmetric, columns in order
    GPTQConfig(bits=4, group_size=64, act_order=True)     # desc_act
"""
from __future__ import annotations

import dataclasses

import torch

from ..config import GROUP_SIZE_HELP, BaseConfig, option
from ..core.gptq import gptq_quantize
from ..core.hessian import HessianAccumulator
from ..model.capture import HessianCapture
from ..model.sequential import block_targets, run_sequential
from ..model.stages import ResidualStages
from ..model.walker import replace
from ..nn import IntxLinear
from ..record import record
from ..registry import register

BITS = (2, 3, 4, 8)


@dataclasses.dataclass(frozen=True)
class GPTQConfig(BaseConfig):
    """bits: 2, 3, 4 or 8. group_size: input columns per scale (None: per output channel).
    symmetric: GPTQ's symmetric grid (scale 2 max|w| / (2^bits - 1), zero 2^(bits-1)).
    act_order: columns in order of decreasing Hessian diagonal (desc_act). static_groups: group
    parameters from the unquantized weight, in the original order (keeps groups contiguous with
    act_order, so the checkpoint is the plain GPTQ layout: trivial g_idx, no permutation to store).
    Both on by default, as llm-compressor runs GPTQ: measured on the default model (w4 g64 asym,
    benchmarks/gptq_awq.py), columns in their stored order fit the calibration text and lose to plain
    rounding on text unlike it, while activation order with static groups beats rounding in and out
    of domain (issue 28). damp: fraction of the mean Hessian diagonal added to it (raised automatically if
    the Hessian is not positive definite); 0.01 stays the default: 0.05 and 0.1 measured worse in domain, and
    out of domain after a narrow calibration text; 128 calibration windows (the CLI's default) better than
    16-64 when the calibration text is narrow (benchmarks/results/ood_sweep.json). block_size: lazy-batch width. mse: search a clipping
    range per group. batch_size: calibration windows per forward. true_sequential: inside a
    block, each layer's Hessian comes from inputs that the already quantized layers before it
    produced (q/k/v, then o, then gate/up, then down; AutoGPTQ's default), computed in stages
    (model/stages.py) where the block has the Llama layout; False: all from the original block."""

    method = "gptq"
    calibrated = True
    bits: int = option(4, "2, 3, 4 or 8")
    group_size: int | None = option(64, GROUP_SIZE_HELP, none="channel")
    symmetric: bool = option(False, "a symmetric grid, no stored zero point")
    act_order: bool = option(True, "quantize columns by decreasing activation energy (desc_act); with static "
                                   "groups it holds out of domain, where the stored order falls below plain rounding")
    static_groups: bool = option(True, "group parameters fixed before the sweep, in column order (the plain GPTQ "
                                       "layout: no permutation stored, every GPTQ reader loads it)")
    damp: float = option(0.01, "Hessian damping, a fraction of its mean diagonal (0.05 or 0.1 measured worse "
                               "in domain, and out of domain after a narrow calibration text)")
    block_size: int = option(128, "columns per lazy-batch update")
    mse: bool = option(False, "search each group's clipping range")
    batch_size: int = option(8, "calibration windows per forward")
    true_sequential: bool = option(True, "each layer's Hessian from the already quantized layers before it in its block")

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise ValueError(f"group size must be a positive number of input columns, or none; got {self.group_size}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp is a fraction of the mean Hessian diagonal, 0 <= damp < 1 (0.01 is usual); got {self.damp}")
        if self.block_size <= 0 or self.batch_size <= 0:
            raise ValueError("block size and batch size must be positive")


def _to_module(linear: torch.nn.Linear, config: GPTQConfig, r, rows: slice) -> IntxLinear:  # noqa: ANN001
    m = IntxLinear(linear.in_features, linear.out_features, config.bits, config.group_size, config.symmetric,
                   bias=linear.bias is not None, permuted=r.perm is not None)
    m.set_codes(r.codes[rows], r.scale[rows], None if config.symmetric else r.zero_point[rows])
    if r.perm is not None:
        m.perm = r.perm.clone()  # one tensor per layer: layers sharing a sweep must not share storage
    if linear.bias is not None:
        m.bias = linear.bias.detach().float().clone()
    return m


def quantize_group(linears: dict[str, torch.nn.Linear], H: torch.Tensor, config: GPTQConfig) -> dict[str, IntxLinear]:
    """GPTQ for layers that read the same input (one Hessian): their rows stacked into one sweep,
    which is the same computation (rows are independent given H), done once."""
    names = list(linears)
    W = torch.cat([linears[n].weight.detach() for n in names])
    r = gptq_quantize(W, H, config)
    out, row = {}, 0
    for n in names:
        rows = linears[n].out_features
        out[n] = _to_module(linears[n], config, r, slice(row, row + rows))
        row += rows
    return out


def _last_called(block: torch.nn.Module, mods: dict[str, torch.nn.Module]) -> torch.nn.Module | None:
    """The block's last linear layer if it is one we quantize (its output is the block's; for a
    Llama block, mlp.down_proj), found by module order, else None."""
    linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear) or m in mods.values()]
    return linears[-1] if linears and linears[-1] in mods.values() else None


@register(GPTQConfig)
def quantize_gptq(model: torch.nn.Module, config: GPTQConfig, calib: list[torch.Tensor] | None) -> torch.nn.Module:
    targets = block_targets(model, config, calib)

    def compress(i: int, block: torch.nn.Module, run) -> list[torch.Tensor] | None:  # noqa: ANN001
        mods = targets[id(block)]
        stages = ResidualStages.of(block, run.inputs, mods, check=i == 0) if config.true_sequential else None
        if stages is not None:
            for names, xs in stages:  # a stage's layers share their input: one Hessian, one sweep
                group = {n: mods[n] for n in names if n in mods}
                if group:
                    acc = HessianAccumulator(xs[0].shape[-1], xs[0].device)
                    for x in xs:
                        acc.add(x)
                    for name, q in quantize_group(group, acc.hessian(), config).items():
                        replace(block, name, q)
            return stages.outputs
        with HessianCapture(mods) as cap:
            run(stop_at=_last_called(block, mods))  # the last layer's output feeds nothing we measure
        if any(cap.key(f) not in cap.acc for f in mods):  # the guess at the last layer was wrong
            with HessianCapture(mods) as cap:
                run()
        shared: dict[str, dict[str, torch.nn.Linear]] = {}
        for name, lin in mods.items():
            shared.setdefault(cap.key(name), {})[name] = lin
        for key, linears in shared.items():
            for name, q in quantize_group(linears, cap.hessian(key), config).items():
                replace(block, name, q)
        return None

    record(model).calibration = run_sequential(model, calib, compress, config.batch_size, desc="gptq")
    return model
