"""Activation calibrators (core/act_calib.py): the running histogram rebins exactly, and each
calibrator's threshold is its definition's (pytorch-quantization's entropy and MSE loops, written
out plainly here)."""
from collections import Counter

import numpy as np
import pytest
import torch

from modelpress.core import act_calib
from modelpress.core.act_calib import AbsHistogram, threshold


def _data(n=20000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen)
    x[:20] *= 30  # a heavy tail, as LLM activations have
    return x


def test_a_growing_range_rebins_without_loss():
    x = _data()
    first, second = x[:5000] * 0.01, x[5000:]  # the second needs the range doubled several times
    h = AbsHistogram(bins=256)
    h.add(first)
    h.add(second)
    both = torch.cat([first, second]).abs()
    assert h.range >= 8 * float(first.abs().max()) and h.amax == float(both.max())
    direct, _ = np.histogram(both.numpy(), bins=256, range=(0, h.range))
    # the same counts up to values lying on a bin edge (torch.histc bins in fp32, numpy in float64):
    # observed 1 of 20000 one bin over
    assert h.counts.sum() == direct.sum() and np.abs(h.counts.numpy() - direct).sum() <= 4


def test_max_and_percentile():
    x = _data()
    h = AbsHistogram()
    h.add(x)
    assert threshold(h, "max") == float(x.abs().max())
    t = threshold(h, "percentile", 99.0)
    exact = float(np.percentile(x.abs().numpy(), 99.0))
    assert exact <= t <= exact + h.range / h.bins  # the upper edge of the bin holding the percentile


def _entropy_reference(counts, start=128, nbins=128):
    """pytorch-quantization's _compute_amax_entropy, loop for loop (returns the bin index)."""
    bins = counts.copy()
    bins[0] = bins[1]
    divergences, arguments = [], []
    for i in range(start, len(bins) + 1):
        space = np.linspace(0, i, num=nbins + 1)
        digitized = np.digitize(range(i), space) - 1
        digitized[bins[:i] == 0] = -1
        new_counts = np.zeros(nbins)
        for idx, d in enumerate(digitized):
            if d != -1:
                new_counts[d] += bins[idx]
        for key, val in Counter(digitized).items():
            if key != -1:
                new_counts[key] = new_counts[key] / val
        q = np.array([new_counts[d] if d != -1 else 0.0 for d in digitized])
        p = bins[:i].copy()
        p[-1] += bins[i:].sum()
        p, q = p / p.sum(), q / q.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, p * np.log(p / q), 0.0)
        divergences.append(np.inf if np.any((p > 0) & (q == 0)) else terms.sum())
        arguments.append(i)
    divergences = np.array(divergences)
    return arguments[len(divergences) - 1 - int(np.argmin(divergences[::-1]))]


def test_entropy_is_tensorrt_s():
    h = AbsHistogram(bins=384)
    h.add(_data(seed=1))
    counts = h.counts.numpy()
    assert act_calib._entropy_bin(counts) == _entropy_reference(counts)
    h2 = AbsHistogram()
    h2.add(_data(seed=2))
    t = threshold(h2, "entropy")
    assert 0 < t < h2.amax  # the tail (20 values at ~30 sigma) is clipped; observed ~4.3 of 120


def test_mse_is_pytorch_quantization_s():
    h = AbsHistogram()
    h.add(_data(seed=3))
    counts, edges = h.counts.numpy(), h.edges
    centers = (edges[1:] + edges[:-1]) / 2
    errs = []
    for i in range(128, len(centers)):
        scale = 127.0 / centers[i]
        q = np.clip(np.round(centers * scale), -127, 127) / scale
        errs.append(((q - centers) ** 2 * counts).sum())
    assert threshold(h, "mse") == pytest.approx(centers[128 + int(np.argmin(errs))], rel=0, abs=0)


def test_edge_cases():
    h = AbsHistogram()
    h.add(torch.zeros(10))
    assert threshold(h, "entropy") == 1.0  # nothing but zeros: any scale
    with pytest.raises(ValueError, match="inf or NaN"):
        h.add(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="calibrator must be one of"):
        h.add(torch.ones(3))
        threshold(h, "kl")
