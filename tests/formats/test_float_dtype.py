"""Issue 27: the tensors a method leaves unquantized (embeddings, norms) in the model's own dtype, in memory and
in every checkpoint format, as transformers, AutoGPTQ, AutoAWQ and bitsandbytes keep them; float_dtype="float32"
keeps fp32. The saved file loads back to the same logits."""
import pytest
import torch
from safetensors.torch import load_file

import modelpress
from tests.conftest import byte_tokenizer, tiny_llama

CALIB = [torch.randint(1, 261, (64,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
# (format, method): the modelpress checkpoint of NF4 is bitsandbytes' serialized layout
FORMATS = {"modelpress": ("modelpress", modelpress.RTNConfig(bits=4, group_size=32)),
           "gptq": ("gptq", modelpress.GPTQConfig(bits=4, group_size=32)),
           "awq": ("awq", modelpress.AWQConfig(bits=4, group_size=32, search_samples=2)),
           "bitsandbytes": ("modelpress", modelpress.NF4Config(double_quant=True)),
           "compressed-tensors": ("compressed-tensors", modelpress.RTNConfig(bits=4, group_size=32, symmetric=False))}


def _bf16_model():
    model = tiny_llama(tied=False)
    model.config.dtype = torch.bfloat16  # as a bf16 model's config says
    return model


@pytest.mark.parametrize("layout", list(FORMATS))
def test_unquantized_tensors_are_stored_in_the_models_dtype(tmp_path, layout):
    fmt, config = FORMATS[layout]
    model = modelpress.quantize(_bf16_model(), config, CALIB)
    embed = model.model.embed_tokens.weight
    assert embed.dtype == torch.float32 and torch.equal(embed, embed.bfloat16().float())  # rounded in memory
    out = modelpress.save(model, byte_tokenizer(), tmp_path / fmt, format=fmt)
    sd = load_file(str(out / "model.safetensors"))
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                "model.layers.0.input_layernorm.weight"):
        assert sd[key].dtype == torch.bfloat16, key
    ids = torch.randint(1, 261, (1, 20), generator=torch.Generator().manual_seed(3))
    back, _ = modelpress.load(out)
    assert back.model.embed_tokens.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_float32_keeps_them_as_computed(tmp_path):
    base = _bf16_model()
    small = modelpress.quantize(_bf16_model(), modelpress.RTNConfig(bits=4, group_size=32))
    full = modelpress.quantize(_bf16_model(), modelpress.RTNConfig(bits=4, group_size=32, float_dtype="float32"))
    assert torch.equal(full.model.embed_tokens.weight, base.model.embed_tokens.weight)
    a = modelpress.save(small, byte_tokenizer(), tmp_path / "a")
    b = modelpress.save(full, byte_tokenizer(), tmp_path / "b")
    assert load_file(str(b / "model.safetensors"))["model.embed_tokens.weight"].dtype == torch.float32
    saved = {p: (p / "model.safetensors").stat().st_size for p in (a, b)}
    embed_bytes = base.model.embed_tokens.weight.numel() * 2
    assert saved[b] - saved[a] > 2 * embed_bytes * 0.99  # embedding and head: 2 bytes a value fewer
    untouched = modelpress.quantize(tiny_llama(), modelpress.RTNConfig(bits=4, group_size=32))  # no dtype: fp32
    assert torch.equal(untouched.model.embed_tokens.weight, tiny_llama().model.embed_tokens.weight)
    with pytest.raises(ValueError, match="float_dtype"):
        modelpress.quantize(tiny_llama(), modelpress.RTNConfig(float_dtype="half"))
