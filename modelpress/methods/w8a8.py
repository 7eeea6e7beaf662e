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

from ..config import BaseConfig, option
from ..core import act_calib
from ..model.capture import CallCapture, RangeCapture
from ..model.sequential import block_targets, run_sequential
from ..model.walker import replace
from ..nn import W8A8Linear
from ..nn.w8a8_linear import activation_scales
from ..record import record
from ..registry import register
from .awq import MAPPINGS, _fold, _get, _reads_its_output, _replay

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
    x2 = x.reshape(-1, x.shape[-1]).float()
    s = activation_scales(x2, config.granularity, None if input_scale is None else torch.tensor([input_scale]))
    return (torch.round(x2 / s[:, None]).clamp(-128, 127) * s[:, None]).to(x.dtype).reshape(x.shape)


@torch.no_grad()
def _search_alpha(parent: torch.nn.Module, balance: list[torch.nn.Linear], calls: list, x_absmax: torch.Tensor,
                  config: W8A8Config) -> float:
    """The alpha of ALPHA_GRID whose smoothing gives the parent's outputs closest to the float ones
    with the balance layers computing W8A8 in the smoothed frame: Q(x / s) Q(W s)^T, static scales
    from the smoothed inputs' max (AWQ's search likewise scales inside the balance layers, so that
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
            hooks = [b.register_forward_pre_hook(lambda m, args, s=s, t=t: (_fake_activations(args[0] / s, t, config) * s,))
                     for b in balance]
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


@register(W8A8Config)
def quantize_w8a8(model: torch.nn.Module, config: W8A8Config, calib: list[torch.Tensor] | None) -> torch.nn.Module:
    targets = block_targets(model, config, calib)
    model_type = model.config.model_type  # one of MAPPINGS' (quantize refuses other families for calibrated methods)

    def compress(i: int, block: torch.nn.Module, run) -> None:  # noqa: ANN001
        mods = targets[id(block)]
        if config.smoothquant is not None:
            mappings = [(sm, [b for b in bal if b in mods], par) for sm, bal, par in MAPPINGS[model_type]
                        if _get(block, sm) is not None and _get(block, par) is not None and all(b in mods for b in bal)]
            mappings = [m for m in mappings if _reads_its_output(block, m[0], mods[m[1][0]])]
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
