"""Activation ranges for int8: a running histogram of |x| and the calibrators that pick a clipping
threshold T from it (the int8 scale is T / 127), as TensorRT and pytorch-quantization define them.

    max         T = the largest |x| seen
    percentile  T = the upper edge of the bin where the histogram's cumulative share reaches p %
    entropy     TensorRT's (Migacz, "8-bit Inference with TensorRT", GTC 2017; pytorch-quantization's
                _compute_amax_entropy): for every candidate bin count i from 128 to 2048, P = the
                first i bins with everything beyond folded into the last, Q = those i bins merged
                into 128 levels and spread back evenly over each level's non-empty bins; the i of
                the lowest KL(P || Q) (the last one on ties) gives T = the upper edge of bin i
    mse         T among the bin centres from bin 128 up minimising the count-weighted squared error
                of the centres fake-quantized with T (pytorch-quantization's _compute_amax_mse)

The histogram keeps BINS counts over [0, range]; when a batch exceeds the range, the range doubles
(as often as needed) and each pair of bins merges into one, so that rebinning is exact and memory
does not grow with samples.
"""
from __future__ import annotations

import math

import numpy as np
import torch

BINS = 2048
QUANT_LEVELS = 128  # |x| on the positive half of a symmetric int8 grid
CALIBRATORS = ("max", "percentile", "entropy", "mse")


class AbsHistogram:
    """Running histogram of |x|: counts (BINS,) float64 over [0, range], and the exact max."""

    def __init__(self, bins: int = BINS) -> None:
        self.bins = bins
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.range = 0.0
        self.amax = 0.0

    def add(self, x: torch.Tensor) -> None:
        a = x.detach().reshape(-1).abs().float().cpu()
        if not a.numel():
            return
        m = float(a.max())
        if not math.isfinite(m):
            raise ValueError("the activations hold inf or NaN: int8 calibration needs finite inputs")
        self.amax = max(self.amax, m)
        if self.range == 0.0:
            self.range = m if m > 0 else 1.0
        while m > self.range:  # double the range: bin pairs merge exactly
            self.counts = torch.nn.functional.pad(self.counts.view(-1, 2).sum(1), (0, self.bins // 2))
            self.range *= 2
        self.counts += torch.histc(a, self.bins, 0.0, self.range).double()

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(0.0, self.range, self.bins + 1)


def threshold(hist: AbsHistogram, calibrator: str, percentile: float = 99.99) -> float:
    """The clipping threshold T (> 0) that `calibrator` picks from `hist`."""
    if hist.amax == 0.0:
        return 1.0  # nothing but zeros: any scale represents them
    if calibrator == "max":
        return hist.amax
    counts = hist.counts.numpy()
    if calibrator == "percentile":
        cdf = np.cumsum(counts) / counts.sum()
        i = int(np.searchsorted(cdf, percentile / 100.0))
        return float(min(hist.edges[min(i, hist.bins - 1) + 1], hist.amax))
    if calibrator == "entropy":
        return float(hist.edges[_entropy_bin(counts)])
    if calibrator == "mse":
        return _mse_threshold(counts, hist.edges)
    raise ValueError(f"calibrator must be one of {', '.join(CALIBRATORS)}, got {calibrator!r}")


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) of two non-negative vectors, each normalised (scipy.stats.entropy's definition)."""
    p, q = p / p.sum(), q / q.sum()
    nz = p > 0
    if np.any(q[nz] == 0):
        return math.inf
    return float(np.sum(p[nz] * np.log(p[nz] / q[nz])))


def _entropy_bin(counts: np.ndarray, start: int = QUANT_LEVELS) -> int:
    """The bin count i of TensorRT's entropy calibrator (module docstring)."""
    bins = counts.copy()
    bins[0] = bins[1]  # the zero bin (ReLU outputs, padding) would dominate: pytorch-quantization's rule
    best, best_i = math.inf, len(bins)
    for i in range(start, len(bins) + 1):
        level = np.digitize(np.arange(i), np.linspace(0, i, num=QUANT_LEVELS + 1)) - 1  # (i,) level of each bin
        p = bins[:i].copy()
        p[-1] += bins[i:].sum()
        filled = bins[:i] != 0
        totals = np.bincount(level[filled], weights=bins[:i][filled], minlength=QUANT_LEVELS)
        members = np.bincount(level[filled], minlength=QUANT_LEVELS)
        q = np.where(filled, totals[level] / np.maximum(members[level], 1), 0.0)
        if p.sum() == 0 or q.sum() == 0:
            continue
        d = _kl(p, q)
        if d <= best:  # the last minimum, as pytorch-quantization's argmin over the reversed list
            best, best_i = d, i
    return best_i


def _mse_threshold(counts: np.ndarray, edges: np.ndarray, start: int = QUANT_LEVELS) -> float:
    centers = (edges[:-1] + edges[1:]) / 2
    used = counts > 0
    c, w = centers[used], counts[used]
    best, best_t = math.inf, float(centers[-1])
    for t in centers[start:]:
        scale = 127.0 / t
        err = float(np.sum(w * (np.clip(np.round(c * scale), -127, 127) / scale - c) ** 2))
        if err < best:  # the first minimum, as np.argmin
            best, best_t = err, float(t)
    return best_t
