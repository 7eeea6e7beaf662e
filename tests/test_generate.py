"""`generate` and the engine share one sampler, one end-of-sequence rule and one incremental
detokenizer: the same prompt and sampling settings give the same text through both."""
import pytest

from modelpress.generate import stream_text
from modelpress.serve.engine import Engine
from modelpress.serve.sampler import SamplingParams, stop_ids
from tests.conftest import byte_tokenizer, tiny_llama


@pytest.mark.parametrize("params", [dict(temperature=0), dict(temperature=0.9, seed=3),
                                    dict(temperature=1.2, top_p=0.8, seed=11)])
def test_generate_gives_what_the_engine_gives(params):
    model, tok = tiny_llama(), byte_tokenizer()
    sp = SamplingParams(max_tokens=40, **params)
    stats = {}
    text = "".join(stream_text(model, tok, "the winter", 40, chat=False, params=sp, stats=stats))
    ids = tok("the winter")["input_ids"]
    ref = Engine(model, tok, max_num_seqs=1, kv_blocks=40, block_size=4).generate([ids], sp)[0].outputs[0]
    assert text == ref.text
    assert stats["prompt_tokens"] == len(ids) and stats["decode_tokens"] == len(ref.token_ids) - 1


def test_one_end_of_sequence_rule():
    model, tok = tiny_llama(), byte_tokenizer()
    model.config.eos_token_id = [0, 7]
    model.generation_config.eos_token_id = 9
    assert stop_ids(model, tok) == {0, 7, 9}
    assert Engine(model, tok, kv_blocks=8, block_size=4).eos_ids == {0, 7, 9}
