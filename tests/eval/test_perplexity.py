import math

import torch

from modelpress.data import tokenize, windows
from modelpress.eval.perplexity import (
    perplexity,
    perplexity_of_windows,
    transformers_perplexity,
)
from modelpress.eval.size import model_size
from tests.conftest import tiny_llama


def _manual_ppl(model, wins):
    """exp(mean -log p) computed from full logits, position by position."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in wins:
            logp = torch.log_softmax(model(w[None]).logits[0].double(), -1)
            nll -= sum(logp[t - 1, w[t]].item() for t in range(1, len(w)))
            count += len(w) - 1
    return math.exp(nll / count)


def test_matches_transformers_and_manual_protocol(tiny):
    model, tok = tiny
    wins = windows(tokenize(tok, "the thing in the winter " * 40), 64)
    assert wins.shape[0] >= 5
    ours = perplexity_of_windows(model, wins, batch_size=3, progress=False)
    ref = transformers_perplexity(model, wins, progress=False)
    manual = _manual_ppl(model, wins)
    assert abs(ours.ppl / ref.ppl - 1) < 1e-5 and abs(ours.ppl / manual - 1) < 1e-5
    assert ours.tokens_scored == wins.shape[0] * 63 and ours.windows == wins.shape[0]
    # batching changes nothing beyond float order
    one = perplexity_of_windows(model, wins, batch_size=1, progress=False)
    assert abs(one.ppl / ours.ppl - 1) < 1e-6


def test_bfloat16_products_stay_close_and_bad_dtypes_are_refused(tiny):
    """compute_dtype="bfloat16" runs the products under autocast: a different number (it is not the fp32
    path renamed), within 1 % of fp32's on the tiny model; an unknown dtype is a clear error."""
    import pytest

    model, tok = tiny
    wins = windows(tokenize(tok, "the thing in the winter " * 40), 64)
    f32 = perplexity_of_windows(model, wins, progress=False)
    bf16 = perplexity_of_windows(model, wins, progress=False, compute_dtype="bfloat16")
    assert bf16.ppl != f32.ppl and abs(bf16.ppl / f32.ppl - 1) < 0.01
    with pytest.raises(ValueError, match="bfloat16"):
        perplexity_of_windows(model, wins, progress=False, compute_dtype="float16")


def test_default_text_and_max_windows(tiny):
    model, tok = tiny
    r = perplexity(model, tok, ctx=32, max_windows=3, progress=False)
    assert r.windows == 3 and r.ctx == 32 and math.isfinite(r.ppl) and r.ppl > 1


def test_size_report_counts_tied_embedding_once():
    model = tiny_llama(tied=True)
    rep = model_size(model)
    n = sum(p.numel() for p in model.parameters())  # parameters() already yields a tied weight once
    assert rep.weights == n and rep.size_bytes == 4 * n and rep.bits_per_weight == 32.0
    import modelpress

    modelpress.quantize(model, modelpress.RTNConfig(bits=4, group_size=32))
    q = model_size(model)
    assert q.weights == n and q.size_bytes < rep.size_bytes
    # 4-bit codes + per 32 columns an fp16 scale and a uint8 zero point = 4.75 bits
    assert abs(q.linear_bits_per_weight - 4.75) < 0.01
