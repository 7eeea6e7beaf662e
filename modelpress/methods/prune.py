"""Pruning (issue 26): magnitude, Wanda and SparseGPT on the decoder blocks' linear layers, at an
unstructured sparsity or an N:M pattern (core/sparsity.py holds the criteria).

    modelpress.quantize(model, WandaConfig(sparsity=0.5), calib)
    modelpress.quantize(model, SparseGPTConfig(pattern="2:4"), calib)
    modelpress.quantize(model, SparseGPTConfig(pattern="2:4", bits=4), calib)   # joint: IntxLinear codes

Wanda and SparseGPT calibrate one block at a time on the sequential pipeline (model/sequential.py), as
their reference code does: every layer of a block from the block's inputs (the previous blocks
already pruned), then the pruned block's outputs feed the next. The pruned layers stay nn.Linear
with zeros (SparseGPT with `bits`: IntxLinear holding the codes, a pruned weight on its zero point),
so every format, exporter and runtime takes them; the zeros are the mask.

Structured (`StructuredConfig`): each MLP's intermediate channels ranked by mean |h_j| (h: down_proj's
input on the calibration text) times ||down_proj[:, j]||, the lowest `mlp` fraction removed from
gate / up (rows) and down (columns) in every block alike, and `config.intermediate_size` set to what
is left: a standard, smaller model that transformers, the GGUF export and llama.cpp take as it is;
`recover` steps of distillation from the unpruned model (methods/qat.py's loop, every decoder linear
training) may follow.

torch.nn.utils.prune's form (weight_orig / weight_mask): model/torch_prune.py writes it
(`to_torch_prune`), `load` reads it and `quantize` makes its hooks permanent before a method runs.
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from ..config import GROUP_SIZE_HELP, BaseConfig, option
from ..core import sparsity
from ..errors import ModelpressError
from ..model.capture import HessianCapture, InputStatsCapture
from ..model.sequential import block_targets, blocks_of, run_sequential
from ..model.walker import dense_weight, iter_targets, replace
from ..nn import IntxLinear, Sparse24Linear
from ..record import record
from ..registry import register
from .qat import QATTrainConfig, distill


def parse_pattern(pattern: str | None) -> tuple[int, int]:
    """"2:4" -> (2, 4); None -> (0, 0) (unstructured)."""
    if pattern is None:
        return 0, 0
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise ValueError(f"pattern is N:M (N zeros in every M inputs), e.g. 2:4; got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"pattern N:M needs 0 < N < M, got {pattern!r}")
    return n, m


@dataclasses.dataclass(frozen=True)
class MagnitudeConfig(BaseConfig):
    """sparsity: the fraction of each layer's weights set to zero (smallest |w| over the layer), or
    pattern "N:M": N zeros in every M consecutive inputs of a row (2:4: sparse tensor cores' format)."""

    method = "magnitude"
    sparsity: float = option(0.5, "fraction of the weights set to zero")
    pattern: str | None = option(None, "N:M instead of a sparsity: N zeros in every M inputs (2:4, 4:8)",
                                 none="unstructured")
    pack: bool = option(False, "store 2:4 layers packed: the kept half and a 2-bit position each (17/32 of the fp32 "
                               "bytes; the CPU kernel reads them as they are)")

    def __post_init__(self) -> None:
        n, m = parse_pattern(self.pattern)
        if not m and not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity is a fraction in [0, 1), got {self.sparsity}")
        if self.pack and (n, m) != (2, 4):
            raise ValueError("pack stores the 2:4 pattern; give --pattern 2:4 with it")

    @property
    def nm(self) -> tuple[int, int]:
        return parse_pattern(self.pattern)


@dataclasses.dataclass(frozen=True)
class WandaConfig(MagnitudeConfig):
    """Wanda: |w| times its input's calibration norm, compared within each output row (or N:M group)."""

    method = "wanda"
    calibrated = True
    batch_size: int = option(8, "calibration windows per forward")


@dataclasses.dataclass(frozen=True)
class SparseGPTConfig(WandaConfig):
    """SparseGPT: the mask and an OBS update of the remaining weights per lazy block of `blocksize`
    columns, from the layer's Hessian (damped by `damp` of its mean diagonal); `bits`: round the kept
    weights in the same sweep (asymmetric, groups of `group_size`), stored as integer codes."""

    method = "sparsegpt"
    blocksize: int = option(128, "columns per lazy block")
    damp: float = option(0.01, "Hessian damping, a fraction of its mean diagonal")
    bits: int | None = option(None, "also quantize the kept weights to this many bits (2, 3, 4, 8)", none="none")
    group_size: int | None = option(64, GROUP_SIZE_HELP, none="channel")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits is not None and self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 2, 3, 4 or 8 (or none), got {self.bits}")
        if self.pack and self.bits is not None:
            raise ValueError("pack stores float 2:4 layers; with bits the kept weights are integer codes already")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp is a fraction of the mean Hessian diagonal in [0, 1), got {self.damp}")


def _check_float(model: torch.nn.Module, config: MagnitudeConfig) -> None:
    if not any(True for _ in iter_targets(model, config.targets, config.ignore)):
        raise ModelpressError(f"{config.method} prunes float linear layers; this model has none (already quantized? "
                              "prune the float model, then quantize; sparsegpt --bits does both in one sweep)")


@register(MagnitudeConfig)
def prune_magnitude(model: torch.nn.Module, config: MagnitudeConfig, calib: list[torch.Tensor] | None) -> torch.nn.Module:
    _check_float(model, config)
    n, m = config.nm
    for fqn, lin in iter_targets(model, config.targets, config.ignore):
        mask = sparsity.magnitude_mask(lin.weight, config.sparsity, n, m)
        with torch.no_grad():
            lin.weight.masked_fill_(mask, 0.0)
    return packed(model, config)


def packed(model: torch.nn.Module, config: MagnitudeConfig) -> torch.nn.Module:
    """With config.pack, every pruned layer as a Sparse24Linear (values + 2-bit positions)."""
    if config.pack:
        for fqn, lin in list(iter_targets(model, config.targets, config.ignore)):
            replace(model, fqn, Sparse24Linear.from_linear(lin))
    return model


def _codes_module(lin: torch.nn.Linear, r: sparsity.SparseGPTResult, config: SparseGPTConfig) -> IntxLinear:
    mod = IntxLinear(lin.in_features, lin.out_features, config.bits, config.group_size, False,
                     bias=lin.bias is not None)
    mod.set_codes(r.codes, r.scale, r.zero_point)
    if lin.bias is not None:
        mod.bias = lin.bias.detach().float().clone()
    return mod


@register(WandaConfig)
@register(SparseGPTConfig)
def prune_calibrated(model: torch.nn.Module, config: WandaConfig, calib: list[torch.Tensor] | None) -> torch.nn.Module:
    _check_float(model, config)
    targets = block_targets(model, config, calib)
    n, m = config.nm

    def compress(i: int, block: torch.nn.Module, run) -> None:  # noqa: ANN001
        mods = targets[id(block)]
        sgpt = isinstance(config, SparseGPTConfig)
        with HessianCapture(mods) if sgpt else InputStatsCapture(mods) as cap:  # Wanda: ||X_j|| only
            run()
        for name, lin in mods.items():
            if not sgpt:
                mask = sparsity.wanda_mask(lin.weight, cap.norm(name), config.sparsity, n, m)
                with torch.no_grad():
                    lin.weight.masked_fill_(mask, 0.0)
                continue
            r = sparsity.sparsegpt(lin.weight, cap.hessian(name), config.sparsity, n, m, config.blocksize, config.damp,
                                   config.bits, config.group_size)
            if config.bits is not None:
                replace(block, name, _codes_module(lin, r, config))
            else:
                with torch.no_grad():
                    lin.weight.copy_(r.weight.to(lin.weight.dtype))

    record(model).calibration = run_sequential(model, calib, compress, config.batch_size, desc=config.method)
    return packed(model, config)


def weight_sparsity(model: torch.nn.Module) -> float:
    """The fraction of zeros among the decoder blocks' linear weights (dequantized where quantized)."""
    zeros = total = 0
    for fqn, mod in model.named_modules():
        if fqn.startswith("model.layers.") and (isinstance(mod, torch.nn.Linear) or hasattr(mod, "dequantize")):
            w = dense_weight(mod)
            zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    return zeros / max(1, total)


@dataclasses.dataclass(frozen=True)
class StructuredConfig(BaseConfig):
    """mlp: the fraction of every MLP's intermediate channels removed (the same count in each block,
    rounded so that a multiple of `multiple` channels is kept: 32 for GGUF's blocks, 256 for the K
    types at full width)."""

    method = "structured"
    calibrated = True
    mlp: float = option(0.25, "fraction of each MLP's intermediate channels removed")
    multiple: int = option(64, "keep a multiple of this many channels")
    batch_size: int = option(8, "calibration windows per forward")
    recover: int = option(0, "then distillation steps (2 calibration windows each) from the unpruned model")
    recover_lr: float = option(5e-5, "the recovery's AdamW learning rate")

    def __post_init__(self) -> None:
        if self.recover < 0 or not self.recover_lr > 0:
            raise ValueError("recover is a number of steps (0: none) and recover_lr a positive learning rate")
        if not 0 < self.mlp < 1:
            raise ValueError(f"mlp is the fraction of intermediate channels removed, in (0, 1); got {self.mlp}")
        if self.multiple < 1:
            raise ValueError(f"multiple must be at least 1, got {self.multiple}")


def _rows(lin: torch.nn.Linear, keep: torch.Tensor, dim: int) -> torch.nn.Linear:
    """lin with only the output rows (dim 0) or input columns (dim 1) in `keep`."""
    w = lin.weight.detach().index_select(dim, keep).clone()
    out = torch.nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        out.weight.copy_(w)
        if lin.bias is not None:
            out.bias.copy_(lin.bias.detach() if dim == 1 else lin.bias.detach()[keep])
    return out


@register(StructuredConfig)
def prune_structured(model: torch.nn.Module, config: StructuredConfig, calib: list[torch.Tensor] | None
                     ) -> torch.nn.Module:
    if not calib:
        raise ModelpressError("structured pruning ranks channels on calibration text (windows of token ids)")
    mlps = [b.mlp for b in blocks_of(model)]
    if not all(isinstance(getattr(m, n, None), torch.nn.Linear) for m in mlps for n in ("gate_proj", "up_proj",
                                                                                      "down_proj")):
        raise ModelpressError("structured pruning takes MLPs of float gate_proj / up_proj / down_proj layers (Llama, "
                              "Mistral, Qwen, Gemma); prune before quantizing, and not phi3's fused gate_up_proj")
    d_ff = mlps[0].down_proj.in_features
    keep_n = max(config.multiple, int(d_ff * (1 - config.mlp)) // config.multiple * config.multiple)

    def compress(i: int, block: torch.nn.Module, run) -> None:  # noqa: ANN001
        mlp = block.mlp
        with InputStatsCapture({"down": mlp.down_proj}) as cap:
            run()
        score = cap.mean_abs("down") * mlp.down_proj.weight.detach().float().norm(dim=0)
        keep = torch.sort(torch.topk(score, keep_n).indices).values
        mlp.gate_proj, mlp.up_proj = _rows(mlp.gate_proj, keep, 0), _rows(mlp.up_proj, keep, 0)
        mlp.down_proj = _rows(mlp.down_proj, keep, 1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = keep_n

    teacher = copy.deepcopy(model) if config.recover else None
    record(model).calibration = run_sequential(model, calib, compress, config.batch_size, desc="structured")
    model.config.intermediate_size = keep_n
    if teacher is not None:  # every decoder linear trains towards the unpruned model's distributions
        for fqn, p in model.named_parameters():
            p.requires_grad_(fqn.startswith("model.layers.") and fqn.endswith("proj.weight"))
        record(model).recovery = distill(model, teacher, calib, QATTrainConfig(steps=config.recover, batch=2,
                                                                               lr=config.recover_lr), desc="recover")
        for p in model.parameters():
            p.requires_grad_(False)
    return model
