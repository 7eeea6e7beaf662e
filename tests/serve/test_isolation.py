"""One request never harms another inside the engine: requests are validated whole before the
scheduler sees them, and a failure inside a step (its forward pass, its sampling) ends only the
request it concerns, frees its blocks, and leaves every other request's output as it is alone."""
import pytest
import torch

from modelpress.serve import engine as engine_module
from modelpress.serve.engine import Engine
from modelpress.serve.sampler import SEED_MAX, SamplingParams
from tests.conftest import byte_tokenizer, tiny_llama

PROMPTS = [[5, 6, 7, 8, 9], [30, 31, 32], [100, 101, 102, 103, 104, 105, 106], [7] * 11]


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def engine(model, **kw):
    return Engine(model, byte_tokenizer(), max_num_seqs=8, kv_blocks=40, block_size=4, **kw)


def alone(model, ids, params):
    return engine(model).generate([ids], params)[0].outputs[0].token_ids


def assert_idle(eng):
    assert not eng.has_work and not eng.requests
    assert eng.block_manager.num_used == 0


@pytest.mark.parametrize("ids,params,message", [
    ([1, 2], dict(seed=2**64), "seed"),                     # defect 1: 'Overflow when unpacking long long'
    ([1, 2], dict(seed=-1), "seed"),
    ([1, 2], dict(seed=SEED_MAX, n=2), "seed"),             # completion 1 would draw with seed + 1
    ([1000000000], {}, "token id"),                          # defect 2: ids outside the vocabulary
    ([-1, -2], {}, "token id"),
    ([1, True], {}, "token id"),
    ([1, 2.0], {}, "token id"),
    ([1, 2], dict(temperature=float("nan")), "finite"),
    ([1, 2], dict(temperature=float("inf")), "finite"),
    ([1, 2], dict(top_p=float("nan")), "finite"),
    ([1, 2], dict(repetition_penalty=float("inf")), "finite"),
    ([1, 2], dict(stop_token_ids=["a"]), "stop_token_ids"),
])
def test_a_bad_request_is_refused_before_the_scheduler_sees_it(model, ids, params, message):
    eng = engine(model)
    with pytest.raises(ValueError, match=message):
        eng.add_request(ids, SamplingParams(**params))  # SamplingParams' own checks, or the engine's
    assert_idle(eng)
    # and the engine serves the next request as if nothing had happened
    out = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=6, temperature=0))[0]
    assert out.outputs[0].token_ids == alone(model, PROMPTS[0], SamplingParams(max_tokens=6, temperature=0))
    assert_idle(eng)


def test_tiny_temperature_is_greedy_not_nan(model):
    # defect 2: temperature 1e-45 made logits / t overflow to inf and the draw raise inside the step
    greedy = alone(model, PROMPTS[1], SamplingParams(max_tokens=8, temperature=0))
    assert alone(model, PROMPTS[1], SamplingParams(max_tokens=8, temperature=1e-45, seed=3)) == greedy


def run_all(eng, ids_list, params_list):
    rids = [eng.add_request(ids, p, stream=True) for ids, p in zip(ids_list, params_list)]
    final = {}
    while eng.has_work:
        for o in eng.step():
            if o.finished:
                final[o.request_id] = o
    return [final[r] for r in rids]


def test_a_failing_forward_ends_only_its_request(model, monkeypatch):
    eng = engine(model)
    poison = 77  # a prompt holding this token makes the runner raise whenever it is in the batch
    real = eng.runner.run

    def run(seqs, num_tokens):
        if any(poison in s.token_ids for s in seqs):
            raise RuntimeError("injected failure")
        return real(seqs, num_tokens)

    monkeypatch.setattr(eng.runner, "run", run)
    params = [SamplingParams(max_tokens=10, temperature=0), SamplingParams(max_tokens=9, temperature=0.8, seed=4),
              SamplingParams(max_tokens=12, temperature=0, n=2), SamplingParams(max_tokens=7, temperature=0)]
    bad = [poison, 3, 4]
    outs = run_all(eng, PROMPTS[:2] + [bad] + PROMPTS[2:], params[:2] + [params[0]] + params[2:])
    failed = outs.pop(2)
    assert failed.finished and "injected failure" in failed.error
    assert [c.finish_reason for c in failed.outputs] == ["error"]
    for ids, p, o in zip(PROMPTS, params, outs):
        assert o.error is None
        assert [c.token_ids for c in o.outputs] == [c.token_ids for c in engine(model).generate([ids], p)[0].outputs]
    assert_idle(eng)


def test_a_failing_sampler_ends_only_its_request(model, monkeypatch):
    eng = engine(model)
    real = engine_module.sample

    def sample(logits, p, seen, generator):
        if p.seed == 13 and len(seen) > 8:  # fails mid-way, after some tokens were streamed
            raise FloatingPointError("injected sampler failure")
        return real(logits, p, seen, generator)

    monkeypatch.setattr(engine_module, "sample", sample)
    params = [SamplingParams(max_tokens=10, temperature=0), SamplingParams(max_tokens=12, temperature=0.7, seed=13),
              SamplingParams(max_tokens=8, temperature=0.9, seed=2)]
    outs = run_all(eng, PROMPTS[:3], params)
    assert outs[1].error == "FloatingPointError: injected sampler failure"
    assert outs[1].outputs[0].finish_reason == "error" and outs[1].outputs[0].token_ids  # some came before
    monkeypatch.setattr(engine_module, "sample", real)
    for i in (0, 2):
        assert outs[i].error is None
        assert outs[i].outputs[0].token_ids == alone(model, PROMPTS[i], params[i])
    assert_idle(eng)


def test_nan_logits_fail_the_request_not_the_engine(model, monkeypatch):
    eng = engine(model)
    real = eng.runner.run

    def run(seqs, num_tokens):
        out = real(seqs, num_tokens)
        with torch.inference_mode():
            for i, s in enumerate(seqs):
                if s.token_ids[0] == 99:
                    out[i] = float("nan")
        return out

    monkeypatch.setattr(eng.runner, "run", run)
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=1)
    outs = run_all(eng, [[99, 98, 97], PROMPTS[0]], [params, params])
    assert "not finite" in outs[0].error
    assert outs[1].error is None and outs[1].outputs[0].token_ids == alone(model, PROMPTS[0], params)
    assert_idle(eng)
