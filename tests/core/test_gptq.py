"""GPTQ's sweep against a slow, obviously correct reference: the paper's column-by-column OBS
update with an explicit inverse Hessian, in fp64."""
import warnings

import pytest
import torch

from modelpress.core import gptq, hessian
from modelpress.methods.gptq import GPTQConfig


def Cfg(**changes) -> GPTQConfig:
    """The method's own config, with groups of 32 and the columns in stored order unless a test says
    otherwise (the core reads only bits, group_size, symmetric, act_order, static_groups, damp,
    block_size, mse)."""
    return GPTQConfig(**{"group_size": 32, "act_order": False, "static_groups": False, **changes})


_BASE = Cfg().to_dict()


def layer(rows=24, cols=96, tokens=400, seed=0):
    """A weight and inputs whose columns are correlated (a rank-24 mix plus noise) and of unequal
    size, as real activations are; H from them."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 0.05
    mix = torch.randn(24, cols, generator=g, dtype=torch.float64)
    X = (torch.randn(tokens, 24, generator=g, dtype=torch.float64) @ mix
         + 0.3 * torch.randn(tokens, cols, generator=g, dtype=torch.float64)) * torch.linspace(0.2, 3, cols, dtype=torch.float64)
    acc = hessian.HessianAccumulator(cols)
    acc.add(X)
    return W, acc.hessian().double(), X


def slow_gptq(W, H, cfg):
    """Column by column: qparams of each group from the fully updated W at its first column;
    q = quantize(w_i); W[:, later] -= (w_i - q) / Hinv[i, i] * Hinv[i, later]; then Hinv drops
    row and column i (Gaussian elimination), as in the GPTQ paper's equations (2)-(3)."""
    maxq = 2 ** cfg.bits - 1
    H, W = hessian.prepare(H, W, 0.0)
    cols = W.shape[1]
    gs = cols if cfg.group_size is None else cfg.group_size
    static = [gptq.qparams(W[:, g:g + gs], cfg.bits, cfg.symmetric, cfg.mse) for g in range(0, cols, gs)]
    order = torch.argsort(torch.diag(H), descending=True) if cfg.act_order else torch.arange(cols)
    H.diagonal().add_(cfg.damp * torch.mean(torch.diag(H)))
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    for pos, i in enumerate(order.tolist()):
        if cfg.static_groups:
            s, z = static[i // gs]
        elif pos % gs == 0:  # the group = the next gs columns in sweep order
            s, z = gptq.qparams(W[:, order[pos:pos + gs]], cfg.bits, cfg.symmetric, cfg.mse)
        q = gptq.dequant(gptq.quant(W[:, i], s, z, maxq), s, z)
        Q[:, i] = q
        rest = order[pos + 1:]
        W[:, rest] -= ((W[:, i] - q) / Hinv[i, i])[:, None] * Hinv[i, rest][None, :]
        Hinv = Hinv - Hinv[:, i:i + 1] @ Hinv[i:i + 1, :] / Hinv[i, i]
    return Q


@pytest.mark.parametrize("cfg", [
    Cfg(block_size=1), Cfg(block_size=1, group_size=20), Cfg(block_size=1, symmetric=True, bits=3),
    Cfg(block_size=1, act_order=True), Cfg(block_size=1, act_order=True, static_groups=True),
    Cfg(block_size=1, mse=True, bits=2), Cfg(block_size=1, bits=8, group_size=None),
    Cfg(group_size=None), Cfg(group_size=64, block_size=32), Cfg(group_size=None, act_order=True, block_size=16),
    Cfg(static_groups=True, act_order=True), Cfg(static_groups=True, group_size=20),
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.to_dict().items() if v != _BASE[k]))
def test_sweep_equals_column_by_column_reference(cfg):
    """Lazy batches are an exact rewrite where the group parameters do not depend on the batch
    boundary (block_size 1, no groups, groups that are whole blocks, or static groups)."""
    W, H, _ = layer()
    res = gptq.gptq_quantize(W, H, cfg)
    ref = slow_gptq(W, H, cfg)
    torch.testing.assert_close(res.weight.double(), ref.float().double(), rtol=0, atol=1e-6)


def test_stored_codes_reproduce_the_weight():
    W, H, _ = layer()
    for cfg in (Cfg(act_order=True), Cfg(act_order=True, static_groups=True), Cfg(symmetric=True)):
        r = gptq.gptq_quantize(W.float(), H.float(), cfg)
        gs = cfg.group_size
        g_of = torch.arange(W.shape[1]) // gs
        deq = (r.codes.float() - r.zero_point.float()[:, g_of]) * r.scale.float()[:, g_of]
        if r.perm is not None:  # stored in permuted column order: groups contiguous there
            deq = deq[:, torch.argsort(r.perm)]
        assert torch.equal(deq, r.weight)
        assert (r.perm is not None) == (cfg.act_order and not cfg.static_groups)


def test_gptq_beats_rtn_on_the_layer_output():
    W, H, X = layer(rows=64, cols=128, tokens=2000, seed=1)
    W, H, X = W.float(), H.float(), X.float()
    for cfg in (Cfg(bits=4, group_size=32), Cfg(bits=3, group_size=32, act_order=True), Cfg(bits=2, group_size=None)):
        r = gptq.gptq_quantize(W, H, cfg)
        s, z = gptq.qparams(W.reshape(-1, cfg.group_size or 128), cfg.bits, cfg.symmetric)
        rtn = gptq.dequant(gptq.quant(W.reshape(-1, cfg.group_size or 128), s[:, None], z[:, None],
                                      2 ** cfg.bits - 1), s[:, None], z[:, None]).reshape(W.shape)
        err_gptq = ((X @ (r.weight - W).t()) ** 2).mean()
        err_rtn = ((X @ (rtn - W).t()) ** 2).mean()
        assert err_gptq < 0.5 * err_rtn, (cfg, err_gptq, err_rtn)  # observed ratios 0.28, 0.02, 0.27


def test_dead_columns_and_damping_raise():
    W, H, _ = layer()
    H[:, 5] = 0
    H[5, :] = 0
    r = gptq.gptq_quantize(W.float(), H.float(), Cfg())
    assert torch.all(r.weight[:, 5] == 0)
    singular = torch.ones(96, 96, dtype=torch.float64)  # rank one: needs far more than 1% damping
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gptq.gptq_quantize(W, singular, Cfg(damp=0.0))
    assert any("raised it" in str(w.message) for w in caught)
