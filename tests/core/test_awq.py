"""AWQ numerics: the search grid, scale normalization, the group-normalized weight mean against a
plain loop, and the two searches beating round-to-nearest on a layer with salient channels."""
import torch

from modelpress.core import awq, grids


def test_search_grid_is_llm_compressors():
    g = awq.search_grid(20, True)
    assert len(g) == 20 and g[0] == (0.0, False) and g[1] == (0.0, True) and g[-1] == (1.0, True)
    assert awq.search_grid(20, False)[-1] == (1.0, False) and len(awq.search_grid(20, False)) == 20


def test_candidate_scales_normalized():
    x_mean = torch.rand(64) * 5 + 0.01
    w_mean = torch.rand(64) + 0.1
    for ratio, duo in awq.search_grid(20, True):
        s = awq.candidate_scales(x_mean, w_mean, ratio, duo)
        assert torch.isclose(s.max() * s.min(), torch.tensor(1.0), rtol=1e-5)
    assert torch.all(awq.candidate_scales(x_mean, w_mean, 0.0, False) == 1)


def test_weight_channel_mean_matches_a_loop():
    ws = [torch.randn(8, 12), torch.randn(5, 12)]
    ref = torch.zeros(12)
    for w in ws:
        for r in range(w.shape[0]):
            for g in range(3):
                grp = w[r, 4 * g:4 * g + 4].abs()
                ref[4 * g:4 * g + 4] += grp / (grp.max() + 1e-6)
    torch.testing.assert_close(awq.weight_channel_mean(ws, 4), ref / 13, rtol=1e-5, atol=1e-6)


def _salient_layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 128, generator=g) * 0.05
    x = torch.randn(2048, 128, generator=g)
    x[:, :4] *= 20  # a few salient input channels, as in the paper's figure 2
    return w, x


def test_scales_beat_rtn_on_salient_channels():
    w, x = _salient_layer()
    ref = x @ w.t()
    rtn_err = ((x @ awq.fake_quantize(w, 3, 32, False).t() - ref) ** 2).mean()
    w_mean = awq.weight_channel_mean([w], 32)
    x_mean = x.abs().mean(0)
    errs = []
    for ratio, duo in awq.search_grid(20, True):
        s = awq.candidate_scales(x_mean, w_mean, ratio, duo)
        errs.append(((x @ (awq.fake_quantize(w * s, 3, 32, False) / s).t() - ref) ** 2).mean())
    assert errs[0] == rtn_err  # ratio 0 without duo scaling: s = 1, plain RTN
    assert min(errs) < 0.6 * rtn_err  # observed 0.38


def test_clip_search_beats_no_clip():
    w, x = _salient_layer(1)
    w[:, 50] *= 8  # an outlier weight column stretches every group range it sits in
    ref = x @ w.t()
    bound = awq.search_clip(w, x, 3, 32, False)
    assert bound.shape == (64, 4) and torch.all(bound <= grids._grouped(w.abs(), 32).amax(-1) + 1e-7)
    clipped = awq.fake_quantize(awq.apply_clip(w, bound, 32), 3, 32, False)
    err_clip = ((x @ clipped.t() - ref) ** 2).mean()
    err_rtn = ((x @ awq.fake_quantize(w, 3, 32, False).t() - ref) ** 2).mean()
    assert err_clip < 0.8 * err_rtn  # observed 0.53


def test_clip_search_matches_the_token_by_token_error():
    """The quadratic form picks the bounds that running the tokens through each candidate picks."""
    w, x = _salient_layer(2)
    bound = awq.search_clip(w, x, 3, 32, False, n_tokens=256)
    xs = x[:: x.shape[0] // 256][:256].reshape(256, 4, 32)
    wb = w.reshape(64, 1, 4, 32)
    org_max = wb.abs().amax(-1, keepdim=True)
    org_out = (xs[None] * wb).sum(-1)
    errs = []
    for i in range(10):
        mv = org_max * (1 - i / 20)
        q = awq.fake_quantize(torch.clamp(wb, -mv, mv).reshape(-1, 32), 3, None, False).reshape(wb.shape)
        errs.append(((xs[None] * q).sum(-1) - org_out).pow(2).mean(1))     # (64, 4)
    pick = torch.stack(errs).argmin(0)                                       # (64, 4)
    ref = org_max.reshape(64, 4) * (1 - pick / 20)
    torch.testing.assert_close(bound, ref)
