"""Many LoRA adapters served at once (nn/multi_lora.py, Engine(adapters=...), serve --lora): a mix of
requests for three adapters and the base in shared steps gives each request what it gives run alone
with its adapter (transformers' greedy on the model with that adapter); prefixes are cached per
adapter; base sequences keep the fused decode; the HTTP API picks the adapter by `model`."""
import pytest
import torch

from modelpress.finetune.adapters import load_adapter, save_adapter
from modelpress.finetune.lora import LoraConfig, add_lora, lora_layers
from modelpress.serve.engine import Engine
from modelpress.serve.http import create_app
from modelpress.serve.sampler import SamplingParams
from tests.conftest import byte_tokenizer, hf_greedy_ids, tiny_llama, uvicorn_server

CONFIGS = {"a": LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj")),
           "b": LoraConfig(r=8, alpha=8, targets="all-linear", rslora=True),
           "c": LoraConfig(r=4, alpha=16, targets=("up_proj", "down_proj"), qa_lora_group=32)}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    folders = {}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        model = add_lora(tiny_llama(), cfg)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.3)
        folders[name] = save_adapter(model, cfg, tmp_path_factory.mktemp(name))
    return folders


def _reference(folder, prompt, n):
    model = tiny_llama() if folder is None else load_adapter(tiny_llama(), folder)[0]
    return hf_greedy_ids(model, torch.tensor([prompt]), n)


def test_a_mix_of_adapters_in_shared_steps_gives_each_request_its_own_output(adapters):
    engine = Engine(tiny_llama(), byte_tokenizer(), max_num_seqs=8, kv_blocks=64, block_size=4)
    plain = Engine(tiny_llama(), byte_tokenizer(), max_num_seqs=8, kv_blocks=64, block_size=4)
    served = Engine(tiny_llama(), byte_tokenizer(), max_num_seqs=8, kv_blocks=64, block_size=4, adapters=adapters)
    assert served.adapter_names == ["a", "b", "c"] and served.runner.fused() is not None  # the base stays fused
    gen = torch.Generator().manual_seed(7)
    shared = torch.randint(1, 261, (9,), generator=gen).tolist()  # a prefix every adapter's requests share
    prompts = [shared + torch.randint(1, 261, (int(k),), generator=gen).tolist()
               for k in torch.randint(1, 8, (32,), generator=gen)]
    names = [[None, "a", "b", "c"][i % 4] for i in range(32)]
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    outs = served.generate(prompts, sp, adapters=names)
    for prompt, name, out in zip(prompts, names, outs):
        alone = served.generate([prompt], sp, adapters=[name])[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
        ref = _reference(None if name is None else adapters[name], prompt, 10)
        assert out.outputs[0].token_ids == ref, name
    base_outs = plain.generate([p for p, n in zip(prompts, names) if n is None], sp)
    assert [o.outputs[0].token_ids for o in base_outs] == [o.outputs[0].token_ids
                                                             for o, n in zip(outs, names) if n is None]
    del engine
    with pytest.raises(ValueError, match="no adapter named 'd'.*a, b, c"):
        served.add_request([1, 2, 3], sp, adapter="d")


def test_the_http_api_picks_the_adapter_by_model(adapters):
    import openai

    tok = byte_tokenizer()
    engine = Engine(tiny_llama(), tok, max_num_seqs=8, kv_blocks=64, block_size=4, adapters=adapters)
    app = create_app(engine, "tiny")
    prompt = [5, 17, 99, 140, 33]
    with uvicorn_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny", "a", "b", "c"]
        for name in ("tiny", "b"):
            r = client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0)
            assert r.model == name
            ref = _reference(None if name == "tiny" else adapters[name], prompt, 6)
            assert r.choices[0].text == tok.decode(ref)
        with pytest.raises(openai.NotFoundError, match="tiny, a, b, c"):
            client.completions.create(model="z", prompt=prompt, max_tokens=2)


def test_dora_adapters_are_refused_for_batched_serving(tmp_path):
    from modelpress.errors import ModelpressError

    cfg = LoraConfig(r=4, dora=True)
    folder = save_adapter(add_lora(tiny_llama(), cfg), cfg, tmp_path / "d")
    with pytest.raises(ModelpressError, match="DoRA"):
        Engine(tiny_llama(), byte_tokenizer(), kv_blocks=16, block_size=4, adapters={"d": folder})
