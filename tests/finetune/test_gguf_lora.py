"""llama.cpp's LoRA GGUF (finetune/gguf_lora.py): llama.cpp (llama-cpp-python) applies our adapter
file to our GGUF of the base and computes our logits (base + adapter); the file's keys and tensor
names are convert_lora_to_gguf.py's."""
import pytest
import torch
from gguf import GGUFReader

import modelpress
from modelpress.errors import ModelpressError
from modelpress.finetune.gguf_lora import export_gguf_lora
from modelpress.finetune.lora import LoraConfig, add_lora, lora_layers
from tests.model.families import tiny

IDS = [1, 504, 3000, 17, 42, 9000, 7, 311, 5]


def _adapted(family, vocab, config):
    from tests.formats.test_gguf_families import gguf_config

    model = tiny(family, config=gguf_config(family, vocab))
    base = tiny(family, config=gguf_config(family, vocab))
    add_lora(model, config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.2)
    return model, base


def test_the_file_has_convert_lora_to_gguf_s_keys_and_names(tmp_path, default_model):
    _, tok = default_model
    model, _ = _adapted("llama", len(tok), LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj")))
    export_gguf_lora(model, tmp_path / "a.gguf")
    r = GGUFReader(tmp_path / "a.gguf")
    assert r.fields["general.type"].contents() == "adapter" and r.fields["adapter.type"].contents() == "lora"
    assert r.fields["adapter.lora.alpha"].contents() == 8.0 and r.fields["general.architecture"].contents() == "llama"
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    assert shapes["blk.0.attn_q.weight.lora_a"] == (64, 4) and shapes["blk.0.attn_q.weight.lora_b"] == (4, 64)
    assert shapes["blk.2.ffn_down.weight.lora_a"] == (96, 4)  # ggml order: (in, r) for A
    assert len(shapes) == 3 * 3 * 2


@pytest.mark.parametrize("family,config", [
    ("llama", LoraConfig(r=4, alpha=8, targets="all-linear")),       # q / k rows permuted in the file
    ("qwen2", LoraConfig(r=4, alpha=8, targets=("q_proj", "k_proj", "v_proj"), rslora=True)),
    ("llama", LoraConfig(r=4, alpha=8, targets=("q_proj", "up_proj"), qa_lora_group=16)),
], ids=["llama-all", "qwen2-rslora", "llama-qa-lora"])
def test_llama_cpp_applies_our_adapter_with_our_logits(family, config, tmp_path, default_model):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (a peer) is not installed")
    _, tok = default_model
    model, base = _adapted(family, len(tok), config)
    modelpress.export_gguf(base, tok, tmp_path / "base.gguf", "F32", progress=False)
    export_gguf_lora(model, tmp_path / "lora.gguf")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "base.gguf"), lora_path=str(tmp_path / "lora.gguf"), n_ctx=32,
                          n_threads=1, logits_all=True, verbose=False)
    llm.eval(IDS)
    theirs = torch.tensor(llm.scores[:len(IDS)])
    with torch.no_grad():
        ours = model(torch.tensor([IDS])).logits[0]
        plain = base(torch.tensor([IDS])).logits[0]
    assert (ours - plain).abs().max() > 0.1  # the adapter matters
    torch.testing.assert_close(theirs, ours, rtol=0, atol=5e-3 * max(1.0, ours.abs().max().item()))


def test_dora_has_no_llama_cpp_form(tmp_path):
    model = tiny("llama")
    add_lora(model, LoraConfig(r=4, dora=True))
    with pytest.raises(ModelpressError, match="DoRA"):
        export_gguf_lora(model, tmp_path / "a.gguf")
    assert not list(tmp_path.iterdir())
