"""The same paths on a CUDA device (skipped where there is none: CI and the development machines
have no GPU; these run on a lent one)."""
import pytest
import torch

import modelpress
from modelpress.data import tokenize, windows
from modelpress.eval.perplexity import perplexity_of_windows
from modelpress.generate import generate_ids

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.mark.parametrize("config", [modelpress.RTNConfig(bits=4, group_size=32),
                                    modelpress.RTNConfig(bits=8, group_size=None, symmetric=True)])
def test_quantized_model_runs_on_cuda_like_cpu(tiny, config):
    model, tok = tiny
    modelpress.quantize(model, config)
    x = torch.randint(0, 261, (2, 40))
    with torch.no_grad():
        cpu = model(x).logits
        gpu = model.to("cuda")(x.cuda()).logits.cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)  # TF32 off by default: fp32 GEMMs differ in order only


def test_perplexity_and_generation_on_cuda(tiny):
    model, tok = tiny
    wins = windows(tokenize(tok, "the thing in the winter " * 40), 64)
    cpu = perplexity_of_windows(model, wins, progress=False).ppl
    model.to("cuda")
    gpu = perplexity_of_windows(model, wins, progress=False).ppl
    assert abs(gpu / cpu - 1) < 1e-4
    ids = list(generate_ids(model, torch.tensor([[5, 6, 7]]), 8))
    model.to("cpu")
    assert ids == list(generate_ids(model, torch.tensor([[5, 6, 7]]), 8))
