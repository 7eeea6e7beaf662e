"""Frozen quantized layers under a training graph (nn/frozen.py): the forward is the layer's own
(kernels included), the input's gradient is dy @ W with W the layer's dequantized weight (as
autograd through F.linear on that weight gives it), and the layer's storage gets no gradient."""
import pytest
import torch

import modelpress
from modelpress.model.walker import dense_weight
from tests.conftest import byte_tokenizer, tiny_llama

CONFIGS = {
    "nf4-dq": modelpress.NF4Config(double_quant=True),
    "nf4-bf16": modelpress.NF4Config(double_quant=True, compute_dtype="bfloat16"),
    "int8": modelpress.LLMInt8Config(),
    "rtn-w4": modelpress.RTNConfig(bits=4, group_size=32),
    "gptq-act-order": modelpress.GPTQConfig(bits=4, group_size=32, act_order=True, static_groups=False),
    "gguf-q8_0": "Q8_0",  # GGUF blocks: the model exported and loaded back
    "gguf-q4_0": "Q4_0",
}


def _quantized_layer(name, tmp_path):
    model = tiny_llama()
    if isinstance(CONFIGS[name], str):
        modelpress.export_gguf(model, byte_tokenizer(), tmp_path / "m.gguf", CONFIGS[name], progress=False)
        model, _ = modelpress.load(tmp_path / "m.gguf", keep_blocks=True)
    else:
        calib = [torch.randint(0, 261, (64,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
        modelpress.quantize(model, CONFIGS[name], calib)
    return model.model.layers[0].mlp.down_proj


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("rows", [3, 40])  # a decode-sized input (kernel path) and a larger one
def test_input_gradient_is_dy_times_the_dequantized_weight(name, rows, tmp_path):
    layer = _quantized_layer(name, tmp_path)
    assert hasattr(layer, "dequantize")  # a quantized layer (not a dense one)
    x = torch.randn(2, rows, layer.in_features, generator=torch.Generator().manual_seed(1), requires_grad=True)
    gy = torch.randn(2, rows, layer.out_features, generator=torch.Generator().manual_seed(2))
    y = layer(x)
    with torch.no_grad():
        y_ref = layer(x)  # the layer's forward outside a graph
    assert torch.equal(y, y_ref) and y.requires_grad
    y.backward(gy)
    w = dense_weight(layer)
    torch.testing.assert_close(x.grad, gy @ w, rtol=1e-5, atol=1e-5)
    assert all(p.grad is None for p in layer.parameters())
