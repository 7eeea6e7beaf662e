"""Issue 7's correctness figure on the real default model (fp32): the engine's greedy outputs at
batch sizes 1 to 32, with mixed prompt lengths, chunked prefill and preemptions forced by a small
cache, equal transformers' greedy generate token for token."""
import pytest
import torch

from modelpress.serve.engine import Engine
from modelpress.serve.sampler import SamplingParams

pytestmark = pytest.mark.slow
NEW = 8


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    new = out[0, len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    cut = next((i for i, t in enumerate(new) if t in eos), None)
    return new if cut is None else new[:cut + 1]


@pytest.fixture(scope="module")
def setup(default_model):
    from tests.conftest import shared_text

    model, tok = default_model
    text = shared_text("eval.txt")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    g = torch.Generator().manual_seed(0)
    prompts = []
    for _ in range(32):
        start = int(torch.randint(0, len(ids) - 300, (1,), generator=g))
        prompts.append(ids[start:start + int(torch.randint(4, 120, (1,), generator=g))])
    return model, tok, prompts, [hf_greedy(model, p, NEW) for p in prompts]


@pytest.mark.parametrize("batch,kv_blocks,step_tokens", [(1, 64, 512), (8, 64, 128), (32, 12, 256)])
def test_greedy_equals_transformers_generate(setup, batch, kv_blocks, step_tokens):
    model, tok, prompts, expected = setup
    eng = Engine(model, tok, max_num_seqs=batch, kv_blocks=kv_blocks, block_size=16, max_tokens_per_step=step_tokens)
    outs = eng.generate(prompts[:batch] if batch > 1 else prompts[:4], SamplingParams(max_tokens=NEW, temperature=0))
    for o, e in zip(outs, expected):
        assert o.outputs[0].token_ids == e
    if batch == 32:
        assert eng.scheduler.preemptions > 0  # 12 blocks of 16 hold one or two sequences at a time
    assert eng.block_manager.num_used == 0
