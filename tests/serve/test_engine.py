"""The engine on the tiny model: greedy outputs equal transformers' generate token for token at
batch sizes 1 to 32, with mixed prompt lengths, chunked prefill, prefix-cache hits and preemptions
forced by a small cache; sampling options; n completions; abort frees blocks."""
import pytest
import torch

from modelpress.serve.engine import Engine
from modelpress.serve.sampler import SamplingParams
from tests.conftest import byte_tokenizer, hf_greedy_ids, tiny_llama


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    new = out[0, len(ids):].tolist()
    eos = model.config.eos_token_id
    return new[: new.index(eos) + 1] if eos in new else new


def prompts(k, seed=0, shared=0):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(1, 261, (shared,), generator=g).tolist()
    return [prefix + torch.randint(1, 261, (int(torch.randint(1, 60, (1,), generator=g)),), generator=g).tolist()
            for _ in range(k)]


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.mark.parametrize("batch,kv_blocks,step_tokens,shared", [(1, 64, 512, 0), (4, 64, 16, 20), (32, 64, 128, 33),
                                                                  (32, 24, 64, 0), (9, 24, 7, 18)])
def test_greedy_equals_transformers(model, batch, kv_blocks, step_tokens, shared):
    tok = byte_tokenizer()
    ps = prompts(batch, seed=batch, shared=shared)
    eng = Engine(model, tok, max_num_seqs=8 if batch > 8 else batch, kv_blocks=kv_blocks, block_size=4,
                 max_tokens_per_step=step_tokens)
    outs = eng.generate(ps, SamplingParams(max_tokens=12, temperature=0))
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == hf_greedy(model, p, 12)
    assert eng.block_manager.num_used == 0
    if kv_blocks <= 24:
        assert eng.scheduler.preemptions > 0  # the small cache forced recomputation
    if shared:
        assert eng.block_manager.hits > 0


def test_sampling_is_seeded_and_filters_apply(model):
    tok = byte_tokenizer()
    eng = Engine(model, tok, kv_blocks=64, block_size=4)
    p = SamplingParams(max_tokens=10, temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=3,
                       repetition_penalty=1.3, ignore_eos=True)
    a = eng.generate([[5, 6, 7]], p)[0].outputs[0].token_ids
    b = eng.generate([[5, 6, 7]], p)[0].outputs[0].token_ids
    assert a == b and len(a) == 10
    c = eng.generate([[5, 6, 7]], SamplingParams(max_tokens=10, temperature=0.8, seed=4, ignore_eos=True))
    assert c[0].outputs[0].token_ids != a


def test_n_completions_share_the_prompt_and_differ(model):
    tok = byte_tokenizer()
    eng = Engine(model, tok, kv_blocks=64, block_size=4)
    out = eng.generate([list(range(1, 30))], SamplingParams(max_tokens=8, temperature=1.0, seed=0, n=4,
                                                            ignore_eos=True, logprobs=2))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert all(len(c.token_ids) == 8 and len(c.logprobs) == 8 for c in out.outputs)
    assert all(len(lp["top"]) == 2 for lp in out.outputs[0].logprobs)
    assert eng.block_manager.num_used == 0


def test_greedy_n_completions_are_identical(model):
    eng = Engine(model, byte_tokenizer(), kv_blocks=64, block_size=4)
    ids = list(range(1, 23))
    out = eng.generate([ids], SamplingParams(max_tokens=8, temperature=0, n=3))[0]
    assert all(c.token_ids == hf_greedy(model, ids, 8) for c in out.outputs)


def test_stop_strings_and_abort(model):
    tok = byte_tokenizer()
    eng = Engine(model, tok, kv_blocks=64, block_size=4)
    full = eng.generate(["the "], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0].outputs[0]
    stop = full.text[5:7]
    cut = eng.generate(["the "], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].text == full.text[:full.text.find(stop)]
    rid = eng.add_request("the ", SamplingParams(max_tokens=20, ignore_eos=True))
    eng.step()
    assert eng.block_manager.num_used > 0
    eng.abort(rid)
    assert eng.block_manager.num_used == 0 and not eng.has_work


def test_unstreamed_request_reports_once_finished_with_the_same_text(model):
    """stream=False (generate, non-streaming HTTP): no output before the end, the same final
    completions as a streamed request, n > 1 included."""
    eng = Engine(model, byte_tokenizer(), kv_blocks=64, block_size=4)
    p = SamplingParams(max_tokens=15, temperature=0.7, seed=1, n=3, ignore_eos=True)
    shown = [o for o in eng.stream("the ", p)]
    assert len(shown) > 1 and not shown[0].finished
    rid = eng.add_request("the ", p, stream=False)
    reported = []
    while eng.has_work:
        reported += eng.step()
    assert [o.request_id for o in reported] == [rid] and reported[0].finished
    assert [(c.text, c.token_ids) for c in reported[0].outputs] == [(c.text, c.token_ids) for c in shown[-1].outputs]
    assert len({c.text for c in reported[0].outputs}) > 1 and all(len(c.text) for c in reported[0].outputs)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_streamed_texts_grow_to_the_whole_decode(model, seed):
    """Streamed texts are decoded incrementally (a few tokens a step); on the byte-level tokenizer,
    whose random outputs split and break UTF-8 characters, every step's text is a prefix of the
    final one, which is the tokenizer's decode of the whole output."""
    tok = byte_tokenizer()
    eng = Engine(model, tok, kv_blocks=64, block_size=4)
    p = SamplingParams(max_tokens=48, temperature=1.0, seed=seed, ignore_eos=True)
    shown = [o.outputs[0] for o in eng.stream("the ", p)]
    final = shown[-1]
    assert final.text == tok.decode(final.token_ids, skip_special_tokens=True)
    assert any(ord(ch) > 127 for ch in final.text)  # the bytes did make multi-byte characters
    for c in shown[:-1]:
        assert final.text.startswith(c.text)
    assert len({c.text for c in shown}) > 10


def test_bad_requests(model):
    eng = Engine(model, byte_tokenizer(), kv_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="maximum context length"):
        eng.add_request([1] * 250, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="KV blocks of 4 tokens"):
        eng.add_request([1] * 20, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def _quantized(kind):
    import modelpress

    model = tiny_llama()
    if kind == "bf16":
        return model.to(torch.bfloat16)
    if kind.startswith("gguf-"):
        import tempfile
        from pathlib import Path

        from modelpress.formats.gguf_writer import write_gguf

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "m.gguf"
            write_gguf(path, model, kind[5:], tokenizer=byte_tokenizer(), progress=False)
            return modelpress.load(path, keep_blocks=True)[0]
    cfg = {"rtn-w4": modelpress.RTNConfig(bits=4, group_size=32), "nf4": modelpress.NF4Config(),
           "llm-int8": modelpress.LLMInt8Config(), "rtn-w8": modelpress.RTNConfig(bits=8, group_size=None),
           "rtn-w4-asym": modelpress.RTNConfig(bits=4, group_size=32, symmetric=False),
           "gptq-act": modelpress.GPTQConfig(bits=4, group_size=32, act_order=True, static_groups=False),
           "awq": modelpress.AWQConfig(bits=4, group_size=32),
           "fp4-dq": modelpress.FP4Config(double_quant=True),
           "nf4-b32": modelpress.NF4Config(blocksize=32),
           "rtn-w3-g48": modelpress.RTNConfig(bits=3, group_size=48),
           "sparse24": modelpress.MagnitudeConfig(pattern="2:4", pack=True),
           "sparse24-bf16": modelpress.MagnitudeConfig(pattern="2:4", pack=True),
           "sparse24-fp16": modelpress.MagnitudeConfig(pattern="2:4", pack=True)}[kind]  # 160 columns: groups do not divide
    if kind in ("sparse24-bf16", "sparse24-fp16"):  # a bf16 / fp16 model: its packed values are kept so
        model.config.dtype = torch.bfloat16 if kind == "sparse24-bf16" else torch.float16
    calib = [torch.randint(1, 261, (64,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    return modelpress.quantize(model, cfg, calib if kind in ("gptq-act", "awq") else None)


@pytest.mark.parametrize("kind", ["bf16", "rtn-w4", "nf4", "llm-int8", "gguf-Q4_K_M", "gguf-Q8_0"])
def test_every_format_runs_through_its_own_layers(kind, monkeypatch):
    """Greedy tokens of the engine (batched, paged) equal modelpress' plain generate loop on the
    same compressed model through transformers' own forward over the same layers; GGUF blocks with
    fp32 activations here (the int8 ones, llama.cpp's numerics, are tested in test_fused_decode).
    LLM.int8 decodes fused on its rows without its outlier split (model/fused_decode.py; fp32
    activations here), so both sides here compute its layers so."""
    import torch.nn.functional as F

    from modelpress.nn import QUANT_LINEAR_CLASSES, Int8LtLinear

    if kind == "llm-int8":
        monkeypatch.setattr(Int8LtLinear, "forward", lambda self, x: F.linear(x, self.dequantize(x.dtype), self.bias))
    model = _quantized(kind)
    if kind != "bf16":
        assert any(isinstance(m, tuple(QUANT_LINEAR_CLASSES.values())) for m in model.modules())
    ps = prompts(6, seed=7)
    eng = Engine(model, byte_tokenizer(), max_num_seqs=6, kv_blocks=80, block_size=4, int8_activations=False)
    outs = eng.generate(ps, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == hf_greedy_ids(model, torch.tensor([p]), 8), kind


@pytest.mark.parametrize("kind", ["gguf-Q8_0", "gguf-Q4_K_M"])
def test_preempted_gguf_requests_equal_their_runs_alone(kind):
    """int8 activations on GGUF blocks (the default): a sequence preempted and recomputed through
    the torch path continues as if it had never been preempted."""
    model = _quantized(kind)
    ps = prompts(12, seed=5)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    eng = Engine(model, byte_tokenizer(), max_num_seqs=12, kv_blocks=40, block_size=4, max_tokens_per_step=48)
    outs = eng.generate(ps, params)
    assert eng.scheduler.preemptions > 0
    alone = Engine(model, byte_tokenizer(), max_num_seqs=1, kv_blocks=80, block_size=4)
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == alone.generate([p], params)[0].outputs[0].token_ids
