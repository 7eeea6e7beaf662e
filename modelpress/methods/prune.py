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
from ..model.walker import dense_weight, float_dtype, iter_targets, replace
from ..nn import IntxLinear, Sparse24Linear
from ..nn.dense_linear import DenseLinear
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
class RecoverOptions(BaseConfig):
    """A short distillation from the unpruned model after the cut (the calibrated methods)."""

    recover: int = option(0, "then distillation steps (2 calibration windows each) from the unpruned model "
                             "(unstructured / N:M: the pruned weights stay zero)")
    recover_lr: float = option(5e-5, "the recovery's AdamW learning rate")

    def check_recover(self) -> None:
        if self.recover < 0 or not self.recover_lr > 0:
            raise ValueError("recover is a number of steps (0: none) and recover_lr a positive learning rate")


@dataclasses.dataclass(frozen=True)
class WandaConfig(MagnitudeConfig, RecoverOptions):
    """Wanda: |w| times its input's calibration norm, compared within each output row (or N:M group)."""

    method = "wanda"
    calibrated = True
    batch_size: int = option(8, "calibration windows per forward")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_recover()


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
        if self.recover and self.bits is not None:
            raise ValueError("recover trains float weights; with bits the kept weights are integer codes (recover "
                             "without --bits, then quantize)")
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
    """With config.pack, every pruned layer as a Sparse24Linear (values + 2-bit positions), its values in
    the dtype config.float_dtype keeps unquantized tensors in (bf16 / fp16 for such a model: 9/32 of the fp32
    bytes), which the kernel reads as they are."""
    if config.pack:
        dtype = float_dtype(model, config.float_dtype)
        for fqn, lin in list(iter_targets(model, config.targets, config.ignore)):
            replace(model, fqn, Sparse24Linear.from_linear(lin, dtype))
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

    teacher = copy.deepcopy(model) if config.recover else None
    record(model).calibration = run_sequential(model, calib, compress, config.batch_size, desc=config.method)
    if teacher is not None:
        recover(model, teacher, calib, config, keep_zeros=True)
    return packed(model, config)


def recover(model: torch.nn.Module, teacher: torch.nn.Module, calib: list[torch.Tensor], config: RecoverOptions,
            keep_zeros: bool) -> None:
    """config.recover steps of distillation from `teacher` (methods/qat.py's loop), every decoder linear
    weight training; keep_zeros: their zeros' gradients masked, so that (AdamW: no gradient, no moment,
    no step, and decay of 0 is 0) the pruned weights stay exactly 0."""
    hooks = []
    for fqn, p in model.named_parameters():
        train = fqn.startswith("model.layers.") and fqn.endswith("proj.weight")
        p.requires_grad_(train)
        if train and keep_zeros:
            hooks.append(p.register_hook(lambda g, keep=(p.detach() != 0): g * keep))
    try:
        record(model).recovery = distill(model, teacher, calib, QATTrainConfig(steps=config.recover, batch=2,
                                                                               lr=config.recover_lr), desc="recover")
    finally:
        for h in hooks:
            h.remove()
        for p in model.parameters():
            p.requires_grad_(False)


def weight_sparsity(model: torch.nn.Module) -> float:
    """The fraction of zeros among the decoder blocks' linear weights (dequantized where quantized)."""
    zeros = total = 0
    for fqn, mod in model.named_modules():
        if fqn.startswith("model.layers.") and (isinstance(mod, torch.nn.Linear) or hasattr(mod, "dequantize")):
            w = dense_weight(mod)
            zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    return zeros / max(1, total)


@dataclasses.dataclass(frozen=True)
class StructuredConfig(RecoverOptions):
    """mlp: the fraction of every MLP's intermediate channels removed (the same count in each block,
    rounded so that a multiple of `multiple` channels is kept: 32 for GGUF's blocks, 256 for the K
    types at full width); heads: the fraction of attention heads removed, as whole key / value groups
    (grouped-query attention: a kv head and the query heads reading it), the same groups' count in
    each block; layers: whole blocks dropped, those that change their input least."""

    method = "structured"
    calibrated = True
    mlp: float = option(0.25, "fraction of each MLP's intermediate channels removed")
    heads: float = option(0.0, "fraction of each block's attention heads removed, whole key / value groups "
                               "(rounded to groups; 0: none)")
    layers: int = option(0, "whole decoder blocks dropped, the least important by 1 - cos(block input, output) "
                            "on the calibration text")
    multiple: int = option(64, "keep a multiple of this many channels")
    batch_size: int = option(8, "calibration windows per forward")

    def __post_init__(self) -> None:
        self.check_recover()
        if not 0 <= self.mlp < 1 or not 0 <= self.heads < 1:
            raise ValueError(f"mlp and heads are the fractions removed, in [0, 1); got {self.mlp}, {self.heads}")
        if self.layers < 0:
            raise ValueError(f"layers is a number of blocks to drop, got {self.layers}")
        if not (self.mlp or self.heads or self.layers):
            raise ValueError("structured pruning needs something to remove: mlp, heads or layers")
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


def block_influence(model: torch.nn.Module, calib: list[torch.Tensor], batch_size: int) -> torch.Tensor:
    """Each block's 1 - mean cos(input, output) over the calibration tokens (ShortGPT's block influence:
    a block that barely turns its input matters least)."""
    blocks = blocks_of(model)
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    count = 0

    def hook(i: int):  # noqa: ANN202
        def grab(mod, args, kwargs, out) -> None:  # noqa: ANN001
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            sums[i] += (1 - torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)).double().sum()
        return grab

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            for a in range(0, len(calib), batch_size):
                ids = torch.stack(calib[a:a + batch_size])
                model(ids)
                count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return (sums / max(1, count)).float()


def drop_blocks(model: torch.nn.Module, drop: list[int]) -> None:
    """The blocks `drop` removed; the rest renumbered (their attention's cache index) and the config's
    layer count (and per-layer lists) follow."""
    blocks = blocks_of(model)
    keep = [i for i in range(len(blocks)) if i not in set(drop)]
    model.model.layers = torch.nn.ModuleList(blocks[i] for i in keep)
    for new, block in enumerate(model.model.layers):
        if hasattr(getattr(block, "self_attn", None), "layer_idx"):
            block.self_attn.layer_idx = new
    model.config.num_hidden_layers = len(keep)
    for key in ("layer_types",):
        if isinstance(getattr(model.config, key, None), list):
            setattr(model.config, key, [getattr(model.config, key)[i] for i in keep])


def _head_groups(block: torch.nn.Module, o_abs: torch.Tensor, n_heads: int, n_kv: int, keep_g: int) -> torch.Tensor:
    """The kept key / value groups (sorted): each group scored by the sum over its query heads' o_proj
    input channels of mean |a_j| * ||o_proj[:, j]||."""
    o = block.self_attn.o_proj.weight.detach().float()
    score = (o_abs * o.norm(dim=0)).reshape(n_kv, -1).sum(1)  # heads of a group are consecutive
    return torch.sort(torch.topk(score, keep_g).indices).values


def _cut_heads(attn: torch.nn.Module, groups: torch.Tensor, n_heads: int, n_kv: int, hd: int) -> None:
    per = n_heads // n_kv
    q_rows = torch.cat([torch.arange(g * per * hd, (g + 1) * per * hd) for g in groups.tolist()])
    kv_rows = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in groups.tolist()])
    attn.q_proj, attn.o_proj = _rows(attn.q_proj, q_rows, 0), _rows(attn.o_proj, q_rows, 1)
    attn.k_proj, attn.v_proj = _rows(attn.k_proj, kv_rows, 0), _rows(attn.v_proj, kv_rows, 0)


def _check_structured(model: torch.nn.Module, config: StructuredConfig) -> None:
    blocks = blocks_of(model)
    names = (["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] if config.mlp else []) + (
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"] if config.heads else [])
    for b in blocks:
        for n in names:
            try:
                lin = b.get_submodule(n)
            except AttributeError:
                lin = None
            if type(lin) not in (torch.nn.Linear, DenseLinear):
                raise ModelpressError(f"structured pruning takes float {n} layers (Llama, Mistral, Qwen, Gemma); prune "
                                      "before quantizing, and not phi3's fused qkv_proj / gate_up_proj")
    if config.layers >= len(blocks):
        raise ModelpressError(f"layers={config.layers} would drop every one of the model's {len(blocks)} blocks")


@register(StructuredConfig)
def prune_structured(model: torch.nn.Module, config: StructuredConfig, calib: list[torch.Tensor] | None
                     ) -> torch.nn.Module:
    if not calib:
        raise ModelpressError("structured pruning ranks channels on calibration text (windows of token ids)")
    _check_structured(model, config)
    cfg = model.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    keep_g = n_kv - round(config.heads * n_kv) if config.heads else n_kv
    if config.heads and not 0 < keep_g < n_kv:
        raise ModelpressError(f"heads={config.heads} of {n_kv} key / value groups removes {n_kv - keep_g} of them; "
                              f"choose a fraction that removes between 1 and {n_kv - 1}")
    d_ff = blocks_of(model)[0].mlp.down_proj.in_features if config.mlp else 0
    keep_n = max(config.multiple, int(d_ff * (1 - config.mlp)) // config.multiple * config.multiple)
    teacher = copy.deepcopy(model) if config.recover else None
    if config.layers:
        bi = block_influence(model, calib, config.batch_size)
        drop = sorted(torch.topk(bi, config.layers, largest=False).indices.tolist())
        drop_blocks(model, drop)
        record(model).dropped = {"blocks": drop, "influence": [round(float(v), 5) for v in bi]}

    def compress(i: int, block: torch.nn.Module, run) -> None:  # noqa: ANN001
        mlp, attn = block.mlp, block.self_attn
        with InputStatsCapture({"down": mlp.down_proj, "o": attn.o_proj}) as cap:
            run()
        if config.mlp:
            score = cap.mean_abs("down") * mlp.down_proj.weight.detach().float().norm(dim=0)
            keep = torch.sort(torch.topk(score, keep_n).indices).values
            mlp.gate_proj, mlp.up_proj = _rows(mlp.gate_proj, keep, 0), _rows(mlp.up_proj, keep, 0)
            mlp.down_proj = _rows(mlp.down_proj, keep, 1)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = keep_n
        if config.heads:
            _cut_heads(attn, _head_groups(block, cap.mean_abs("o"), n_heads, n_kv, keep_g), n_heads, n_kv, hd)

    if config.mlp or config.heads:
        record(model).calibration = run_sequential(model, calib, compress, config.batch_size, desc="structured")
    if config.mlp:
        cfg.intermediate_size = keep_n
    if config.heads:
        cfg.head_dim = hd
        cfg.num_attention_heads, cfg.num_key_value_heads = n_heads // n_kv * keep_g, keep_g
    if teacher is not None:
        recover(model, teacher, calib, config, keep_zeros=False)
    return model
