"""Every family the decoder computes, against transformers' own forward on tiny random models:
greedy tokens equal at batch 1 and at batch 8 with a cache too small for all (preemptions), and
the last logits of a prefill within float reordering."""
import pytest
import torch

from modelpress.model.decoder import FAMILIES, Batch, Decoder
from modelpress.serve.engine import Engine
from modelpress.serve.sampler import SamplingParams
from tests.conftest import byte_tokenizer, hf_greedy_ids
from tests.model.families import configs, tiny


def test_every_family_has_a_tiny_model():
    assert set(configs()) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_logits_equal_transformers(family):
    model = tiny(family)
    ids = torch.randint(3, 261, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    dec = Decoder(model, fused=False)
    dec.allocate(16, 4)
    table = list(range(15, -1, -1))
    got = [dec(Batch([ids[:20]], [0], [table], 4))] + [dec(Batch([[t]], [p], [table], 4))
                                                        for p, t in enumerate(ids[20:], 20)]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    for g, pos in zip(got, range(19, 30)):
        torch.testing.assert_close(g[0], ref[pos], rtol=0, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_greedy_equals_transformers(family):
    model, tok = tiny(family), byte_tokenizer()
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 261, (int(n),), generator=gen).tolist() for n in torch.randint(3, 20, (8,), generator=gen)]
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    one = Engine(model, tok, max_num_seqs=1, kv_blocks=16, block_size=4).generate(prompts[:1], sp)
    eight = Engine(model, tok, max_num_seqs=8, kv_blocks=24, block_size=4, max_tokens_per_step=32)
    outs = eight.generate(prompts, sp)
    assert eight.scheduler.preemptions > 0
    assert one[0].outputs[0].token_ids == hf_greedy_ids(model, torch.tensor([prompts[0]]), 16)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy_ids(model, torch.tensor([p]), 16), family


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_folder_loads_with_transformers_logits(family, tmp_path):
    import modelpress

    model = tiny(family)
    model.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    loaded, _ = modelpress.load(tmp_path)
    x = torch.randint(3, 261, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, got = model(x).logits, loaded(x).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * ref.abs().max().item())
