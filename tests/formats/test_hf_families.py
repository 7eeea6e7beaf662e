"""Checkpoints in the HF layouts for every family the decoder computes (tests/model/families.py):
transformers opens what modelpress writes and computes our logits: bitsandbytes' NF4 and LLM.int8
(with bitsandbytes), compressed-tensors pack-quantized GPTQ and AWQ (with compressed-tensors).
The GPTQ and AWQ layouts (transformers opens them only through optimum + GPTQModel, which do not
install beside torch 2.13 here; see ../shared/PEERS.md) hold one packed layer for every linear
layer of transformers' model of that family, by its name, and read back with the same logits."""
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import modelpress
from modelpress.model.decoder import FAMILIES
from tests.conftest import byte_tokenizer
from tests.model.families import configs, tiny

GEN = torch.Generator().manual_seed(0)
CALIB = [torch.randint(3, 261, (64,), generator=GEN) for _ in range(4)]
X = torch.randint(3, 261, (2, 24), generator=GEN)


def _logits(model):
    with torch.no_grad():
        return model(X).logits.float()


def _transformers(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32).eval()
    for m in model.modules():  # bitsandbytes' own fp32 forward (tests/formats/test_bnb._fp32_path)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("config", [modelpress.NF4Config(), modelpress.LLMInt8Config()], ids=["nf4", "int8"])
def test_transformers_opens_a_bitsandbytes_checkpoint(family, config, tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes (a peer) is not installed")
    pytest.importorskip("accelerate", reason="accelerate (transformers needs it for bitsandbytes) is not installed")
    cfg = configs()[family]
    # rows of whole 64-value blocks: bitsandbytes' CPU dequantize of others can be wrong on AVX-512
    # CPUs (a peer bug; tests/formats/test_bnb._xfail_where_bnb_dequantizes_wrongly)
    cfg.intermediate_size = 128
    model = modelpress.quantize(tiny(family, config=cfg), config)
    theirs = _transformers(modelpress.save(model, byte_tokenizer(), tmp_path / "ck"))
    linears = [n for n, m in theirs.named_modules() if type(m).__module__.startswith("bitsandbytes")]
    assert len(linears) == 3 * (4 if family == "phi3" else 7), linears  # phi3: qkv and gate_up fused
    ours = _logits(model)
    torch.testing.assert_close(_logits(theirs), ours, rtol=0, atol=1e-5 * ours.abs().max().item())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_transformers_opens_a_compressed_tensors_checkpoint(family, method, tmp_path):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors (transformers needs it for the layout) "
                                                     "is not installed")
    config = (modelpress.GPTQConfig if method == "gptq" else modelpress.AWQConfig)(bits=4, group_size=32, symmetric=True)
    model = modelpress.quantize(tiny(family), config, CALIB)
    theirs = _transformers(modelpress.save(model, byte_tokenizer(), tmp_path / "ck", format="compressed-tensors"))
    assert hasattr(theirs.model.layers[0].mlp.down_proj, "quantization_scheme")
    ours = _logits(model)
    torch.testing.assert_close(_logits(theirs), ours, rtol=0, atol=1e-5 * ours.abs().max().item())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_transformers_opens_a_w8a8_checkpoint_and_we_read_it_back(family, activations, tmp_path):
    """int-quantized W8A8 (vLLM's int8 checkpoints): compressed-tensors computes every layer with the
    int8 weights dequantized and the activations fake-quantized; given the same input, each of its
    layers gives our layer's output (static scales: ours, stored; dynamic ones it computes as
    max / 127.5 where vLLM's kernels and ours take max / 127, hence a looser bound). Logits are
    compared layer by layer because a float difference of 1e-8 in a layer's input can move a value
    at a rounding midpoint by one int8 step, which later layers carry on. modelpress reads the
    folder back to the very same layers."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors (transformers needs it for the layout) "
                                                     "is not installed")
    model = modelpress.quantize(tiny(family), modelpress.W8A8Config(activations=activations, smoothquant=0.5), CALIB)
    out = modelpress.save(model, byte_tokenizer(), tmp_path / "ck", format="compressed-tensors")
    theirs = _transformers(out)
    seen = {}

    def keep(name):
        def hook(module, args, y):
            seen.setdefault(name, (args[0], y))
        return hook

    for name, m in theirs.named_modules():
        if hasattr(m, "quantization_scheme"):
            m.register_forward_hook(keep(name))
    _logits(theirs)
    ours = dict(model.named_modules())
    assert len(seen) == 3 * (4 if family == "phi3" else 7)
    for name, (x, y) in seen.items():
        with torch.no_grad():
            mine = ours[name](x)
        # observed: static <= 3e-7 of the outputs' range, dynamic <= 2e-2
        bound = 1e-6 if activations == "static" else 4e-2
        torch.testing.assert_close(mine, y, rtol=0, atol=bound * y.abs().max().item())
    back, _ = modelpress.load(out)
    assert torch.equal(_logits(back), _logits(model))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_gptq_and_awq_layouts_name_every_linear_layer(family, fmt, tmp_path):
    model = modelpress.quantize(tiny(family), modelpress.AWQConfig(bits=4, group_size=32), CALIB)
    with torch.no_grad():  # the layouts keep biases (qwen2's) in fp16
        for m in model.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(m.bias.half().float())
    out = modelpress.save(model, byte_tokenizer(), tmp_path / "ck", format=fmt)
    with safe_open(out / "model.safetensors", "pt") as f:
        packed = {k.removesuffix(".qweight") for k in f.keys() if k.endswith(".qweight")}
    reference = tiny(family)  # transformers' module names for the family
    linears = {n for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert packed == linears
    loaded, _ = modelpress.load(out)
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=1e-5 * _logits(model).abs().max().item())
