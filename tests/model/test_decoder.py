"""The one decoder model (model/decoder.py): its torch path against transformers' own forward, the
cache it grows, and a clear refusal of the model families it does not compute."""
import pytest
import torch

from modelpress.errors import ModelpressError
from modelpress.eval.speed import decode_tokens_per_s
from modelpress.model.decoder import FAMILIES, Batch, Decoder, supports
from modelpress.serve.engine import Engine
from modelpress.serve.sampler import SamplingParams
from tests.conftest import byte_tokenizer, tiny_llama


def test_torch_path_gives_transformers_logits_for_a_chunked_prompt():
    """Prefill in two chunks then two decode steps, blocks out of order: each step's last logits are
    transformers' full forward's at that position (fp32, float reordering only)."""
    model = tiny_llama()
    ids = torch.randint(1, 261, (13,), generator=torch.Generator().manual_seed(1)).tolist()
    dec = Decoder(model, fused=False)
    dec.allocate(8, 4)
    table = [6, 2, 7, 0]
    got = [dec(Batch([ids[:5]], [0], [table], 4)), dec(Batch([ids[5:11]], [5], [table], 4))]
    got += [dec(Batch([[t]], [p], [table], 4)) for p, t in ((11, ids[11]), (12, ids[12]))]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    for g, pos in zip(got, (4, 10, 11, 12)):
        torch.testing.assert_close(g[0], ref[pos], rtol=0, atol=1e-5 * ref.abs().max().item())


def test_other_families_are_refused_by_name():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=261, n_positions=64))
    assert not supports(model) and supports(tiny_llama())
    with pytest.raises(ModelpressError, match="'gpt2'") as e:
        Decoder(model)
    assert all(f in str(e.value) for f in FAMILIES)
    assert decode_tokens_per_s(model, byte_tokenizer()) is None  # compare shows "-", it does not fail


def test_the_engines_cache_grows_to_max_kv_blocks_with_the_same_tokens():
    model, tok = tiny_llama(), byte_tokenizer()
    sp = SamplingParams(max_tokens=90, temperature=0, ignore_eos=True)
    small = Engine(model, tok, kv_blocks=2, block_size=4, max_kv_blocks=40)
    big = Engine(model, tok, kv_blocks=40, block_size=4)
    out = small.generate([[5, 6, 7]], sp)[0].outputs[0].token_ids
    assert out == big.generate([[5, 6, 7]], sp)[0].outputs[0].token_ids and len(out) == 90
    assert small.runner.num_blocks == len(small.block_manager.blocks) == 32  # doubled from 2 as needed
    with pytest.raises(ValueError, match="KV blocks"):  # past max_kv_blocks: refused up front
        small.add_request([5, 6, 7], SamplingParams(max_tokens=200))
