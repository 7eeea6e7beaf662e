"""AWQ (arXiv:2306.00978), one decoder block at a time: per mapping, search the per-channel scales
that protect the salient input channels (core/awq.py), fold them into the previous operation,
search each layer's clipping bound, then round to nearest into IntxLinear.

The mappings are data (STYLE: architecture knowledge is data), as llm-compressor's:
    (smooth: the operation whose output is divided by s,
     balance: the layers reading that output, whose weights are multiplied by s,
     parent: the module whose output the search compares)
all relative to a decoder block. v -> o applies only where v's outputs are o's inputs
(not with grouped-query attention, e.g. SmolLM2's 3 key/value heads for 9 query heads).

    AWQConfig(bits=4, group_size=64)
"""
from __future__ import annotations

import dataclasses

import torch

from ..config import GROUP_SIZE_HELP, BaseConfig, option
from ..core import awq, grids
from ..errors import ModelpressError
from ..model.capture import CallCapture, InputStatsCapture
from ..model.sequential import block_targets, run_sequential
from ..model.walker import UNIT_OFFSET_NORMS, replace
from ..nn import IntxLinear
from ..record import record
from ..registry import register

# (smooth, balance layers, parent) per model_type, names relative to a block (llm-compressor's
# AWQ_MAPPING_REGISTRY): Llama's for the families whose blocks are Llama's
LLAMA = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)
# gemma's post_attention_layernorm norms the attention's output; the MLP reads pre_feedforward_layernorm
GEMMA = tuple((("pre_feedforward_layernorm",) + m[1:]) if m[0] == "post_attention_layernorm" else m for m in LLAMA)
# phi3's fused layers: a fused smooth layer divides only its last rows, those the balance layer reads
# (qkv's v part, gate_up's up part)
PHI3 = (
    ("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
    ("self_attn.qkv_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    ("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
    ("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)
FUSED = {"self_attn.qkv_proj": 3, "mlp.gate_up_proj": 2}  # parts of phi3's fused layers, the last one read
MAPPINGS = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA, "gemma2": GEMMA, "gemma3_text": GEMMA,
            "phi3": PHI3}
# clipping the query / key weights distorts attention scores more than it saves (AutoAWQ skips them)
NO_CLIP = ("q_proj", "k_proj", "qkv_proj")


@dataclasses.dataclass(frozen=True)
class AWQConfig(BaseConfig):
    """bits, group_size, symmetric: the integer grid (as RTN). n_grid: scale ratios tried per
    mapping; duo_scaling: weigh weight magnitudes into the scales too. clip: search clipping
    bounds. search_samples: calibration windows the scale search replays (the activation
    statistics use all of them; 8 windows of 512 = 4096 tokens keeps the 20-point search near a
    minute per 100M parameters on 2 cores, where replaying all 128 would take ~16x that).
    batch_size: windows per forward (at most search_samples, so that the search replays exactly
    search_samples windows; above it, a whole number of batches). scales_only: fold the scales in and leave the weights in
    float, for another format to round (AWQ -> GGUF); then nothing is clipped or quantized."""

    method = "awq"
    calibrated = True
    bits: int = option(4, "2, 3, 4 or 8")
    group_size: int | None = option(64, GROUP_SIZE_HELP, none="channel")
    symmetric: bool = option(False, "a symmetric grid, no stored zero point")
    n_grid: int = option(20, "scale ratios tried per mapping")
    duo_scaling: bool = option(True, "weigh weight magnitudes into the scales too")
    clip: bool = option(True, "search clipping bounds")
    search_samples: int = option(8, "calibration windows the scale search replays")
    batch_size: int = option(8, "calibration windows per forward")
    scales_only: bool = option(False, "fold the scales in and leave the weights in float (for another format to round)")

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be one of (2, 3, 4, 8), got {self.bits}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise ValueError(f"group size must be a positive number of input columns, or none; got {self.group_size}")
        if self.n_grid < (3 if self.duo_scaling else 2) or self.search_samples <= 0 or self.batch_size <= 0:
            raise ValueError("n_grid must be >= 3 (>= 2 without duo scaling), search samples and batch size positive")


def _get(block: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None


def _replay(parent: torch.nn.Module, calls: list) -> list[torch.Tensor]:
    outs = []
    for args, kwargs in calls:
        y = parent(*args, **kwargs)
        outs.append(y[0] if isinstance(y, tuple) else y)
    return outs


@torch.no_grad()
def _search_scales(parent: torch.nn.Module, balance: list[torch.nn.Linear], calls: list, x_mean: torch.Tensor,
                   config: AWQConfig) -> torch.Tensor:
    reference = _replay(parent, calls)
    originals = [b.weight.detach().clone() for b in balance]
    w_mean = awq.weight_channel_mean(originals, config.group_size) if config.duo_scaling else None
    best, best_err = None, float("inf")
    try:
        for ratio, duo in awq.search_grid(config.n_grid, config.duo_scaling):
            s = awq.candidate_scales(x_mean, w_mean, ratio, duo)
            for b, w in zip(balance, originals):
                b.weight.copy_(awq.fake_quantize(w * s, config.bits, config.group_size, config.symmetric) / s)
            out = _replay(parent, calls)
            err = sum(torch.nn.functional.mse_loss(o, r, reduction="sum").item() for o, r in zip(out, reference))
            if err < best_err:
                best, best_err = s, err
    finally:
        for b, w in zip(balance, originals):
            b.weight.copy_(w)
    if best is None:
        raise ModelpressError("AWQ's scale search found no finite error (NaN in the block's outputs?)")
    return best


@torch.no_grad()
def _fold(smooth: torch.nn.Module, balance: list[torch.nn.Linear], s: torch.Tensor) -> None:
    for b in balance:
        b.weight.mul_(s.view(1, -1))
    if smooth.weight.ndim == 1:  # a norm: its output divided by s
        if type(smooth).__name__ in UNIT_OFFSET_NORMS:  # (1 + w) / s = 1 + ((1 + w) / s - 1)
            smooth.weight.copy_((1 + smooth.weight) / s - 1)
        else:
            smooth.weight.div_(s)
        return
    rows = slice(smooth.weight.shape[0] - s.numel(), None)  # a linear layer's output rows (a fused one's last)
    smooth.weight[rows].div_(s.view(-1, 1))
    if getattr(smooth, "bias", None) is not None:
        smooth.bias[rows].div_(s)


def _reads_its_output(block: torch.nn.Module, smooth: str, first: torch.nn.Linear) -> bool:
    """Whether `first` (a balance layer) reads all the smooth operation's outputs or, for a fused layer
    of FUSED parts, its last part (phi3: qkv's v only where the three are as wide, i.e. without
    grouped-query attention; gate_up's up). Llama's v -> o likewise only without grouped-query attention."""
    out = _get(block, smooth).weight.shape[0]
    return out == FUSED.get(smooth, 1) * first.in_features


def block_mappings(block: torch.nn.Module, mods: dict[str, torch.nn.Module], model_type: str
                   ) -> list[tuple[str, list[str], str]]:
    """The mappings of MAPPINGS[model_type] that apply to this block: every module present, every
    balance layer among the targets `mods`, and the balance layers reading the smooth operation's
    output (v -> o only without grouped-query attention). Shared with SmoothQuant (methods/w8a8.py)."""
    mappings = [(sm, list(bal), par) for sm, bal, par in MAPPINGS[model_type]
                if _get(block, sm) is not None and _get(block, par) is not None and all(b in mods for b in bal)]
    return [(sm, bal, par) for sm, bal, par in mappings if _reads_its_output(block, sm, mods[bal[0]])]


@register(AWQConfig)
def quantize_awq(model: torch.nn.Module, config: AWQConfig, calib: list[torch.Tensor] | None) -> torch.nn.Module:
    targets = block_targets(model, config, calib)
    batch = min(config.batch_size, config.search_samples)
    search_batches = -(-config.search_samples // batch)

    model_type = getattr(model.config, "model_type", None)
    if model_type not in MAPPINGS:
        raise ModelpressError(f"AWQ knows the blocks of {', '.join(MAPPINGS)}; this model is {model_type!r}. "
                              "RTN, NF4 / FP4 and LLM.int8 need only its linear layers and run on it")

    def compress(i: int, block: torch.nn.Module, run) -> None:  # noqa: ANN001
        mods = targets[id(block)]
        mappings = block_mappings(block, mods, model_type)
        parents = {par: _get(block, par) for _, _, par in mappings}
        with InputStatsCapture(mods, keep_rows=4096) as stats, CallCapture(parents, search_batches) as calls:
            run()
        input_scale = {name: torch.ones(m.in_features, device=m.weight.device) for name, m in mods.items()}
        for smooth, balance, parent in mappings:                       # 1. scales, folded in
            layers = [mods[b] for b in balance]
            s = _search_scales(parents[parent], layers, calls.calls[parent], stats.mean_abs(balance[0]), config)
            _fold(_get(block, smooth), layers, s)
            for b in balance:
                input_scale[b] = input_scale[b] / s
        if config.scales_only:
            return
        for name, lin in mods.items():                                 # 2. clip, 3. round to nearest
            w = lin.weight.detach()
            if config.clip and not name.endswith(NO_CLIP) and config.group_size and lin.in_features % config.group_size == 0:
                x = stats.inputs(name) * input_scale[name]             # the inputs in the scaled frame
                w = awq.apply_clip(w, awq.search_clip(w, x, config.bits, config.group_size, config.symmetric),
                                   config.group_size)
            q = IntxLinear(lin.in_features, lin.out_features, config.bits, config.group_size, config.symmetric,
                           bias=lin.bias is not None)
            q.set_codes(*grids.quantize_rtn(w, config.bits, config.group_size, config.symmetric))
            if lin.bias is not None:
                q.bias = lin.bias.detach().float().clone()
            replace(block, name, q)

    record(model).calibration = run_sequential(model, calib, compress, batch, desc="awq")
    return model
