"""The same paths on a CUDA device (skipped where there is none: CI and the development machines
have no GPU; these run on a lent one)."""
import pytest
import torch

import modelpress
from modelpress.data import tokenize, windows
from modelpress.eval.perplexity import perplexity_of_windows
from modelpress.eval.speed import greedy_ids
from modelpress.serve.runner import ModelRunner

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
    ids = list(greedy_ids(ModelRunner(model, 4, 4), torch.tensor([[5, 6, 7]]), 8))  # the decoder's torch path
    model.to("cpu")
    assert ids == list(greedy_ids(ModelRunner(model, 4, 4), torch.tensor([[5, 6, 7]]), 8))


@pytest.mark.parametrize("kind", ["Q4_K", "Q8_0", "Q6_K"])
def testheld_blocks_on_cuda(kind):
    from modelpress.core import kquants
    from modelpress.nn.gguf_linear import GGUFLinear

    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    layer = GGUFLinear.from_blocks(kquants.quantize(w, kind), kind, 512)
    x = torch.randn(5, 512)
    with torch.no_grad():
        cpu = layer(x)
        gpu = layer.to("cuda")(x.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4 * cpu.abs().max().item())


@pytest.mark.parametrize("config", [modelpress.GPTQConfig(bits=4, group_size=32, act_order=True, static_groups=True),
                                    modelpress.AWQConfig(bits=4, group_size=32, search_samples=2)])
def test_calibrated_methods_on_cuda_like_cpu(tiny, config):
    import copy

    model, tok = tiny
    calib = [torch.randint(0, 261, (64,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    wins = windows(tokenize(tok, "the thing in the winter " * 60), 64)
    cpu_model = modelpress.quantize(copy.deepcopy(model), config, calib)
    gpu_model = modelpress.quantize(copy.deepcopy(model).to("cuda"), config, [c.cuda() for c in calib])
    cpu = perplexity_of_windows(cpu_model, wins, progress=False).ppl
    gpu = perplexity_of_windows(gpu_model, wins, progress=False).ppl
    # float order differs on the GPU (Cholesky, sums), so a few rounding decisions flip: same ppl
    # within 1 %
    assert abs(gpu / cpu - 1) < 0.01, (cpu, gpu)


@pytest.mark.parametrize("batch,kv_blocks", [(1, 64), (32, 64), (32, 24)])
def test_engine_on_cuda_equals_transformers_greedy(batch, kv_blocks):
    """The engine's paged-cache attention on the GPU: batched decode over sequences of different
    lengths, chunked prefill and preemptions (kv_blocks=24), token for token with transformers'
    generate on the same device."""
    from modelpress.serve.engine import Engine
    from modelpress.serve.sampler import SamplingParams
    from tests.conftest import byte_tokenizer, tiny_llama
    from tests.serve.test_engine import prompts

    model = tiny_llama().to("cuda")
    ps = prompts(batch, seed=batch)
    eng = Engine(model, byte_tokenizer(), max_num_seqs=min(batch, 8), kv_blocks=kv_blocks, block_size=4,
                 max_tokens_per_step=64)
    assert eng.runner.k_cache[0].is_cuda
    outs = eng.generate(ps, SamplingParams(max_tokens=12, temperature=0))
    for p, o in zip(ps, outs):
        ids = torch.tensor([p], device="cuda")
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))[0, len(p):]
        ref = ref.tolist()
        ref = ref[: ref.index(0) + 1] if 0 in ref else ref
        assert o.outputs[0].token_ids == ref
    assert eng.block_manager.num_used == 0
    if kv_blocks <= 24:
        assert eng.scheduler.preemptions > 0
