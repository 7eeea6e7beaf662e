"""W8A8: int8 weights and int8 activations (TensorRT's INT8, PyTorch's static / dynamic PTQ), with
SmoothQuant (arXiv:2211.10438) for LLMs, one decoder block at a time:

1. SmoothQuant (optional): per mapping (AWQ's tables: the norm or linear layer before, the layers
   reading its output), s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) over the balance layers'
   columns, folded in (the previous operation's output divided by s, the balance weights
   multiplied); alpha given, or searched per mapping on the parent module's output error with
   the mapping's layers quantized W8A8.
2. Activation ranges (static): a running histogram of each layer's input (after smoothing) and the
   calibrator's threshold T; the layer's input scale is T / 127 (core/act_calib.py).
3. Weights: symmetric int8 per output channel; the layer becomes a W8A8Linear.

    W8A8Config()                                         # static per tensor, max calibrator
    W8A8Config(activations="dynamic")                    # per token, computed at run time
    W8A8Config(smoothquant=0.5, calibrator="entropy")
"""
from __future__ import annotations

import dataclasses
import math

import torch
from tqdm.auto import tqdm

from ..config import BaseConfig, option
from ..core import act_calib
from ..core.fold import fold_batch_norm
from ..errors import ModelpressError
from ..model.capture import CallCapture, RangeCapture
from ..model.sequential import block_targets, run_sequential
from ..model.walker import iter_targets, replace
from ..nn import W8A8Linear
from ..nn.w8a8_conv import W8A8Conv2d
from ..nn.w8a8_linear import quantize_activations
from ..record import record
from ..registry import register
from .awq import _fold, _get, _replay, block_mappings

ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(21))  # the search's alphas, 0 .. 1


@dataclasses.dataclass(frozen=True)
class W8A8Config(BaseConfig):
    """activations: 'static' (one scale per layer input from calibration) or 'dynamic' (computed
    per call). granularity: 'tensor' or 'token' (dynamic only); default: tensor for static, token
    for dynamic. calibrator: how a static scale is chosen (max, percentile, entropy, mse).
    smoothquant: None, an alpha in [0, 1], or 'search'."""

    method = "w8a8"
    calibrated = True
    activations: str = option("static", "static (calibrated scales) or dynamic (per call)",
                              choices=("static", "dynamic"))
    granularity: str | None = option(None, "activation scale per tensor or per token (default: tensor for "
                                     "static, token for dynamic)", none="auto")
    calibrator: str = option("max", "how static scales are chosen", choices=act_calib.CALIBRATORS)
    percentile: float = option(99.99, "the percentile calibrator's share of values kept, in percent")
    smoothquant: str | None = option(None, "SmoothQuant's alpha (e.g. 0.5) or 'search'; none: no smoothing",
                                     none="none")
    batch_size: int = option(8, "calibration windows per forward")

    def __post_init__(self) -> None:
        if self.activations not in ("static", "dynamic"):
            raise ValueError(f"activations must be 'static' or 'dynamic', got {self.activations!r}")
        if self.granularity not in (None, "tensor", "token"):
            raise ValueError(f"granularity must be 'tensor' or 'token', got {self.granularity!r}")
        if self.activations == "static" and self.granularity == "token":
            raise ValueError("static activation scales are per tensor: per-token scales exist only at run time "
                             "(activations='dynamic')")
        if self.granularity is None:  # the effective value, saved and shown
            object.__setattr__(self, "granularity", "tensor" if self.activations == "static" else "token")
        if self.calibrator not in act_calib.CALIBRATORS:
            raise ValueError(f"calibrator must be one of {', '.join(act_calib.CALIBRATORS)}, got {self.calibrator!r}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        sq = self.smoothquant
        if isinstance(sq, str) and sq != "search":
            try:
                sq = float(sq)
            except ValueError:
                raise ValueError(f"smoothquant is an alpha in [0, 1] or 'search', got {sq!r}") from None
            object.__setattr__(self, "smoothquant", sq)
        if isinstance(sq, (int, float)) and not (0 <= sq <= 1 and math.isfinite(sq)):
            raise ValueError(f"SmoothQuant's alpha must be in [0, 1] (0.5 is the paper's default), got {sq}")
        if self.batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {self.batch_size}")

    @property
    def static(self) -> bool:
        return self.activations == "static"



def smooth_scales(x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's s (in,) for the balance layers' weights (out_i, in) (the paper's eq. 4; its
    reference code's clamps)."""
    w_absmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0).clamp(min=1e-5)
    return (x_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.pow(1 - alpha)).clamp(min=1e-5)


def _w8a8(lin: torch.nn.Module, input_scale: float | None, config: W8A8Config) -> W8A8Linear:
    return W8A8Linear.from_weight(lin.weight, getattr(lin, "bias", None), input_scale, config.granularity)


def _fake_activations(x: torch.Tensor, input_scale: float | None, config: W8A8Config) -> torch.Tensor:
    q, s = quantize_activations(x.reshape(-1, x.shape[-1]).float(), config.granularity,
                                None if input_scale is None else torch.tensor([input_scale]))
    return (q * s[:, None]).to(x.dtype).reshape(x.shape)


def _search_scale(x: torch.Tensor, max_scale: float | None, config: W8A8Config) -> float | None:
    """The static scale a candidate smoothing would get: max over all calibration inputs for the max
    calibrator, else the calibrator's threshold on the inputs at hand (dynamic: None)."""
    if max_scale is None or config.calibrator == "max":
        return max_scale
    hist = act_calib.AbsHistogram()
    hist.add(x)
    return act_calib.threshold(hist, config.calibrator, config.percentile) / 127.0


@torch.no_grad()
def _search_alpha(parent: torch.nn.Module, balance: list[torch.nn.Linear], calls: list, x_absmax: torch.Tensor,
                  config: W8A8Config) -> float:
    """The alpha of ALPHA_GRID whose smoothing gives the parent's outputs closest to the float ones
    with the balance layers computing W8A8 in the smoothed frame: Q(x / s) Q(W s)^T, static scales
    from the smoothed inputs by the config's calibrator (_search_scale; AWQ's search likewise scales inside the balance layers, so that
    the captured inputs serve every mapping)."""
    reference = _replay(parent, calls)
    originals = [b.weight.detach().clone() for b in balance]
    best, best_err = 0.5, math.inf
    try:
        for alpha in ALPHA_GRID:
            s = smooth_scales(x_absmax, originals, alpha)
            for b, w in zip(balance, originals):
                b.weight.copy_(W8A8Linear.from_weight(w * s, None, None).dequantize() / s)
            t = float((x_absmax / s).amax()) / 127.0 if config.static else None
            hooks = [b.register_forward_pre_hook(lambda m, args, s=s, t=t: (_fake_activations(
                args[0] / s, _search_scale(args[0] / s, t, config), config) * s,)) for b in balance]
            try:
                err = sum(torch.nn.functional.mse_loss(o, r, reduction="sum").item()
                          for o, r in zip(_replay(parent, calls), reference))
            finally:
                for h in hooks:
                    h.remove()
            if err < best_err:
                best, best_err = alpha, err
    finally:
        for b, w in zip(balance, originals):
            b.weight.copy_(w)
    return best


def fuse_conv_bn_relu(model: torch.nn.Module, quantized: set[str]) -> dict[str, tuple[torch.nn.Module, str]]:
    """Fold every BatchNorm2d that directly follows a Conv2d inside an nn.Sequential into the conv
    (core/fold.py; the BN becomes an Identity), and return {conv: (container, ReLU's name)} for the
    convs in `quantized` that a ReLU follows: the quantized conv clamps instead (drop_relus, once
    calibration has seen the ReLU's outputs). Only nn.Sequential children are fused: elsewhere the
    order of the children says nothing of the order they run in (PyTorch's fuse_modules asks for
    the names for the same reason)."""
    relu: dict[str, tuple[torch.nn.Module, str]] = {}
    for prefix, seq in model.named_modules():
        if not isinstance(seq, torch.nn.Sequential):
            continue
        kids = list(seq.named_children())
        for i, (name, conv) in enumerate(kids):
            if not isinstance(conv, torch.nn.Conv2d) or i + 1 >= len(kids):
                continue
            bn_name, bn = kids[i + 1]
            j = i + 1
            if isinstance(bn, torch.nn.BatchNorm2d) and bn.track_running_stats:
                w, b = fold_batch_norm(conv.weight.detach(), None if conv.bias is None else conv.bias.detach(),
                                       bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
                conv.weight = torch.nn.Parameter(w, requires_grad=False)
                conv.bias = torch.nn.Parameter(b, requires_grad=False)
                setattr(seq, bn_name, torch.nn.Identity())
                j = i + 2
            fqn = f"{prefix}.{name}" if prefix else name
            if j < len(kids) and isinstance(kids[j][1], torch.nn.ReLU) and fqn in quantized:
                relu[fqn] = (seq, kids[j][0])
    return relu


def _run_inputs(model: torch.nn.Module, calib: list) -> None:
    with torch.no_grad():
        for x in calib:
            if isinstance(x, (tuple, list)):
                model(*x)
            else:
                model(x)


def _quantize_network(model: torch.nn.Module, config: W8A8Config, calib: list | None) -> torch.nn.Module:
    """Any network of Conv2d / Linear layers (PyTorch's PTQ prepare -> calibrate -> convert in one
    call): Conv-BN-ReLU fused, every targeted layer's input ranges taken over the example inputs
    `calib`, then each layer W8A8."""
    if config.smoothquant is not None:
        raise ModelpressError("SmoothQuant folds scales into a decoder block's norms; this network has no decoder "
                              "blocks: leave smoothquant unset")
    if config.static and not calib:
        raise ModelpressError("static W8A8 needs example inputs to calibrate (calib=[tensor, ...]); or use "
                              "activations='dynamic'")
    model.eval()
    targets = dict(iter_targets(model, config.targets, config.ignore, (torch.nn.Linear, torch.nn.Conv2d)))
    if not targets:
        raise ModelpressError("the network has no Linear or Conv2d layer for W8A8")
    relu = fuse_conv_bn_relu(model, set(targets))
    scales: dict[str, float | None] = dict.fromkeys(targets)
    if config.static:
        with RangeCapture(targets, histograms=True) as ranges:
            _run_inputs(model, calib)
        missing = [n for n in targets if ranges.key(n) not in ranges.hist]
        if missing:
            raise ModelpressError(f"{missing[0]} saw no input while the example inputs ran: it cannot be calibrated")
        scales = {n: act_calib.threshold(ranges.histogram(n), config.calibrator, config.percentile) / 127.0
                  for n in targets}
    for seq, name in relu.values():
        setattr(seq, name, torch.nn.Identity())
    for name, mod in tqdm(targets.items(), desc="w8a8", unit="layer", leave=False):
        if isinstance(mod, torch.nn.Conv2d):
            try:
                new = W8A8Conv2d.from_conv(mod, scales[name], config.granularity, relu=name in relu)
            except ValueError as e:
                raise ModelpressError(f"{name}: {e}") from None
        else:
            new = _w8a8(mod, scales[name], config)
        replace(model, name, new)
    return model


@register(W8A8Config)
def quantize_w8a8(model: torch.nn.Module, config: W8A8Config, calib: list[torch.Tensor] | None) -> torch.nn.Module:
    if not isinstance(getattr(getattr(model, "model", None), "layers", None), torch.nn.ModuleList):
        return _quantize_network(model, config, calib)
    if not config.static and config.smoothquant is None:  # nothing to calibrate: no pass over the text
        for fqn, lin in tqdm(list(iter_targets(model, config.targets, config.ignore)), desc="w8a8", unit="layer",
                             leave=False):
            replace(model, fqn, _w8a8(lin, None, config))
        return model
    targets = block_targets(model, config, calib)
    model_type = model.config.model_type  # one of MAPPINGS' (quantize refuses other families for calibrated methods)

    def compress(i: int, block: torch.nn.Module, run) -> None:  # noqa: ANN001
        mods = targets[id(block)]
        if config.smoothquant is not None:
            mappings = block_mappings(block, mods, model_type)
            parents = {par: _get(block, par) for _, _, par in mappings}
            search = config.smoothquant == "search"
            with RangeCapture(mods) as ranges, CallCapture(parents if search else {}, 1) as calls:
                run()
            for smooth, balance, parent in mappings:
                x_absmax = ranges.absmax(balance[0])
                layers = {b: mods[b] for b in balance}
                alpha = (_search_alpha(parents[parent], list(layers.values()), calls.calls[parent], x_absmax, config)
                         if search else config.smoothquant)
                _fold(_get(block, smooth), list(layers.values()),
                      smooth_scales(x_absmax, [m.weight for m in layers.values()], alpha))
        scales: dict[str, float | None] = dict.fromkeys(mods)
        if config.static:
            with RangeCapture(mods, histograms=True) as ranges:
                run()
            for name in mods:
                scales[name] = act_calib.threshold(ranges.histogram(name), config.calibrator,
                                                   config.percentile) / 127.0
        for name, lin in mods.items():
            replace(block, name, _w8a8(lin, scales[name], config))

    record(model).calibration = run_sequential(model, calib, compress, config.batch_size, desc="w8a8")
    return model
