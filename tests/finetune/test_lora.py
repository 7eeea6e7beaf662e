"""LoRA adapters (finetune/lora.py) against PEFT's definitions, and PEFT's format both ways
(finetune/adapters.py): PEFT opens what modelpress writes with our logits, modelpress opens what PEFT
wrote with PEFT's logits; on fp32 and on quantized bases."""
import copy
import json

import pytest
import torch

import modelpress
from modelpress.errors import ModelpressError
from modelpress.finetune.adapters import load_adapter, save_adapter
from modelpress.finetune.lora import LoraConfig, LoraLinear, add_lora, lora_layers
from modelpress.model.walker import dense_weight
from tests.conftest import byte_tokenizer, tiny_llama

X = torch.randint(0, 261, (2, 16), generator=torch.Generator().manual_seed(0))
CASES = {
    "lora": LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj")),
    "rslora-all": LoraConfig(r=4, alpha=8, targets="all-linear", rslora=True),
    "dora": LoraConfig(r=4, alpha=16, targets=("q_proj", "down_proj"), dora=True),
}


def _logits(model):
    with torch.no_grad():
        return model(X).logits


def _random_b(model, seed=1):
    """A trained-looking adapter: B random (it starts at zero), so the update shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.05)
            if layer.lora_magnitude_vector is not None:
                layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(layer.out_features, generator=gen))


def test_a_fresh_adapter_leaves_the_model_unchanged_and_only_it_trains():
    model = tiny_llama()
    ref = _logits(model)
    add_lora(model, LoraConfig(r=4, targets="all-linear", dora=True))
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=1e-5)  # DoRA's m / |W| rounds
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) for n in trainable)
    assert "lm_head" not in " ".join(lora_layers(model))  # all-linear leaves the output head alone
    assert len(lora_layers(model)) == 2 * 7


def test_scaling_and_init_are_peft_s():
    assert LoraConfig(r=16, alpha=32).scaling == 2.0
    assert LoraConfig(r=16, alpha=32, rslora=True).scaling == 8.0
    torch.manual_seed(0)
    layer = LoraLinear(torch.nn.Linear(64, 32), LoraConfig(r=8))
    assert torch.equal(layer.lora_B.weight, torch.zeros(32, 8))
    bound = 1 / 64 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 3
    g = LoraLinear(torch.nn.Linear(64, 32), LoraConfig(r=8, init="gaussian"))
    assert abs(g.lora_A.weight.std().item() - 1 / 8) < 0.03


@pytest.mark.parametrize("case", CASES)
def test_peft_opens_our_adapter_with_our_logits(case, tmp_path):
    peft = pytest.importorskip("peft", reason="peft (a peer) is not installed")
    model = tiny_llama()
    add_lora(model, CASES[case])
    _random_b(model)
    ours = _logits(model)
    save_adapter(model, CASES[case], tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(theirs), ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_we_open_peft_s_adapter_with_its_logits(case, tmp_path):
    peft = pytest.importorskip("peft", reason="peft (a peer) is not installed")
    c = CASES[case]
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=c.r, lora_alpha=c.alpha, target_modules=c.targets if c.targets == "all-linear" else list(c.targets),
        use_rslora=c.rslora, use_dora=c.dora, init_lora_weights="gaussian"))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n or "magnitude" in n:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    theirs.eval().save_pretrained(tmp_path / "peft")
    model, config = load_adapter(tiny_llama(), tmp_path / "peft")
    assert config.dora == c.dora and config.rslora == c.rslora
    torch.testing.assert_close(_logits(model), _logits(theirs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("base", ["nf4-dq", "rtn-w4", "int8", "gguf-q4_0"])
def test_adapters_on_a_quantized_base(base, tmp_path):
    """QLoRA and friends: the base stays in its format and the adapter adds exactly s B A x to its
    output; where the base's product is its dequantized weight's (NF4; integers past the decode-sized
    kernels' 32 rows), the model equals the same adapters on those float weights."""
    if base.startswith("gguf"):  # LoRA on a GGUF base: the file's blocks stay as they are
        modelpress.export_gguf(tiny_llama(), byte_tokenizer(), tmp_path / "m.gguf", "Q4_0", progress=False)
        q, _ = modelpress.load(tmp_path / "m.gguf", keep_blocks=True)
    else:
        q = modelpress.quantize(tiny_llama(), {"nf4-dq": modelpress.NF4Config(double_quant=True),
                                               "rtn-w4": modelpress.RTNConfig(bits=4, group_size=32),
                                               "int8": modelpress.LLMInt8Config()}[base])
    dense = copy.deepcopy(q)
    for fqn, mod in list(dense.named_modules()):
        if hasattr(mod, "dequantize") and hasattr(mod, "in_features"):
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=False)
            lin.weight.data = dense_weight(mod)
            parent, _, child = fqn.rpartition(".")
            setattr(dense.get_submodule(parent), child, lin)
    lora = LoraConfig(r=4, alpha=8, targets="all-linear")
    for m in (q, dense):
        torch.manual_seed(0)
        add_lora(m, lora)
        _random_b(m)
    layer = q.model.layers[0].mlp.down_proj
    assert hasattr(layer.base_layer, "dequantize")
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        update = layer.scaling * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
        torch.testing.assert_close(layer(x) - layer.base_layer(x), update, rtol=0, atol=1e-6)
    if base != "int8":  # LLM.int8 rounds activations to int8: not a product with its dequantized weight
        x80 = torch.randint(0, 261, (2, 40), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            ref = dense(x80).logits
            torch.testing.assert_close(q(x80).logits, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_pissa_keeps_the_function_and_moves_the_top_directions_into_the_adapter():
    model = tiny_llama()
    ref = _logits(model)
    w = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    add_lora(model, LoraConfig(r=4, alpha=8, init="pissa"))
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=1e-4)
    layer = model.model.layers[0].self_attn.q_proj
    s_full = torch.linalg.svdvals(w)
    s_residual = torch.linalg.svdvals(layer.base_layer.weight.detach())
    torch.testing.assert_close(s_residual[:8], s_full[4:12], rtol=1e-4, atol=1e-5)


def test_loftq_fits_the_quantization_error_better_than_the_quantized_base_alone():
    model = tiny_llama()
    w = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    nf4 = modelpress.NF4Config(double_quant=True)
    add_lora(model, LoraConfig(r=8, alpha=16, targets=("q_proj",), init="loftq", loftq_iter=2), base_config=nf4)
    layer = model.model.layers[0].self_attn.q_proj
    assert hasattr(layer.base_layer, "dequantize")  # the base is NF4 now
    plain = modelpress.quantize(tiny_llama(), nf4).model.layers[0].self_attn.q_proj
    err_plain = (dense_weight(plain) - w).norm()
    err_loftq = (dense_weight(layer.base_layer) + layer.delta_weight() - w).norm()
    assert err_loftq < 0.8 * err_plain, (err_loftq, err_plain)  # observed ~0.6x at r=8 on 96 x 96


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="init must be one of"):
        LoraConfig(init="olora")
    with pytest.raises(ModelpressError, match="no linear layer matches.*q_proj"):
        add_lora(tiny_llama(), LoraConfig(targets=("query",)))
    with pytest.raises(ModelpressError, match="not a LoRA adapter folder"):
        load_adapter(tiny_llama(), tmp_path)
    model = add_lora(tiny_llama(), LoraConfig(r=4))
    save_adapter(model, LoraConfig(r=4), tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "bias": "all"}))
    with pytest.raises(ModelpressError, match="bias='all'"):
        load_adapter(tiny_llama(), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj", "o_proj"]}))
    with pytest.raises(ModelpressError, match="does not fit this model: no tensor for .*o_proj"):
        load_adapter(tiny_llama(), tmp_path / "a")


def test_a_model_with_adapters_is_not_saved_exported_or_quantized_as_a_base(tmp_path):
    """Its files would hold the wrapped layers (…q_proj.base_layer.weight) where the format expects the
    base's: a checkpoint that does not load, a GGUF missing the adapted tensors."""
    model = add_lora(tiny_llama(), LoraConfig(r=4))
    for call in (lambda: modelpress.save(model, byte_tokenizer(), tmp_path / "ck"),
                 lambda: modelpress.export_gguf(model, byte_tokenizer(), tmp_path / "m.gguf", "F32", progress=False),
                 lambda: modelpress.quantize(model, modelpress.RTNConfig())):
        with pytest.raises(ModelpressError, match="carries LoRA adapters; merge them first"):
            call()
    assert not list(tmp_path.iterdir())
