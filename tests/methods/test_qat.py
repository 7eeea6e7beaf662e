"""QAT (methods/qat.py, nn/fake_quant.py): the forward's weights are the exported file's, bit for bit;
the gradient passes straight through; training lowers the KL the real quantizer's model has."""
import copy

import pytest
import torch
import torch.nn.functional as F

import modelpress
from modelpress.errors import ModelpressError
from modelpress.methods.qat import QATTrainConfig, convert, distill_loss, prepare, qat
from modelpress.nn.fake_quant import FakeQuantLinear
from tests.conftest import tiny_llama


def _wide_llama():
    """A tiny Llama whose widths take the K types (rows of 256s)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=261, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


@pytest.mark.parametrize("mix", ["Q4_0", "Q4_K_M", "Q5_K_M", "Q3_K_M", "Q2_K", "Q8_0", "Q4_1", "Q5_0"])
def test_fake_quantized_weights_are_the_exported_gguf_bit_for_bit(tmp_path, mix):
    """Every layer's forward weight under `mix` equals the tensor of the GGUF the exporter writes from
    the same fp32 weights, dequantized by gguf-py (llama.cpp's own formats), with the mix's type per
    tensor; the layer's product is F.linear with that weight exactly."""
    gguf = pytest.importorskip("gguf", reason="gguf-py reads the exported file back")
    from modelpress.formats.gguf_writer import export_gguf
    from tests.conftest import byte_tokenizer

    model = _wide_llama()
    export_gguf(model, byte_tokenizer(), tmp_path / "m.gguf", mix, progress=False)
    prepare(model, mix)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    stored = {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}
    names = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # q / k: rows permuted in the file
    seen = set()
    for i, layer in enumerate(model.model.layers):
        for attr, gname in names.items():
            mod = layer.get_submodule(attr)
            assert isinstance(mod, FakeQuantLinear)
            kind, want = stored[f"blk.{i}.{gname}.weight"]
            assert mod.label == kind
            seen.add(kind)
            got = mod.rounded_weight()
            assert torch.equal(got, torch.from_numpy(want.copy()).float().reshape(got.shape)), (attr, kind)
    x = torch.randn(3, 256)
    lin = model.model.layers[0].mlp.up_proj
    assert torch.equal(lin(x), F.linear(x, lin.rounded_weight()))
    assert seen  # the types the mix picks (Q4_K_M: Q4_K and Q6_K)


def test_rtn_and_nf4_fake_weights_are_what_the_quantizer_stores():
    """RTN (asymmetric, groups of 32) and NF4 with double quantization: after convert, the real quantizer
    on the trained weights stores the values the forward used."""
    from modelpress.model.walker import dense_weight

    for config in (modelpress.RTNConfig(bits=4, group_size=32), modelpress.NF4Config(double_quant=True)):
        model = tiny_llama()
        prepare(model, config)
        with torch.no_grad():  # a "training step": the weights move
            for m in model.modules():
                if isinstance(m, FakeQuantLinear):
                    m.weight.add_(torch.randn_like(m.weight) * 0.01)
        fake = {n: m.rounded_weight() for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
        modelpress.quantize(convert(model), config)
        for n, w in fake.items():
            assert torch.equal(dense_weight(model.get_submodule(n)), w), (config.method, n)


def test_the_gradient_passes_straight_through():
    """d loss / d weight is the gradient of the product with the rounded weight, as if rounding were
    the identity."""
    lin = torch.nn.Linear(64, 8, bias=True)
    fq = FakeQuantLinear(lin, lambda w: torch.round(w * 4) / 4, "quarter steps")
    x, r = torch.randn(5, 64), torch.randn(5, 8)
    (fq(x) * r).sum().backward()
    wq = fq.rounded_weight().requires_grad_(True)
    (F.linear(x, wq, lin.bias.detach()) * r).sum().backward()
    assert not torch.equal(wq.detach(), fq.weight.detach())    # the rounding shows in the forward
    assert torch.equal(fq.weight.grad, wq.grad) and fq.bias.grad is None  # the bias does not train


def test_qat_lowers_the_kl_of_the_exported_q4_0_model(tmp_path):
    """Distillation against Q4_0's rounding: the trained model under Q4_0's real rounding is closer to the
    original (KL of next-token distributions on held-out text) than Q4_0 of the original (tiny model:
    0.024 -> 0.008); the model comes back float with its decoder layers as nn.Linear."""
    from modelpress.data import tokenize, windows
    from tests.conftest import byte_tokenizer

    tok = byte_tokenizer()
    words = ["thing", "cat", "tree", "house", "river", "stone"]
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"the {w} in the winter of {i}" for i, w in enumerate(words * 40)))
    held = windows(tokenize(tok, " ".join(f"a {w} by the summer {i}" for i, w in enumerate(words * 10))), 48, 4)
    base = tiny_llama()

    def q4_0_kl(model):
        m = copy.deepcopy(model)
        prepare(m, "Q4_0")  # the forward of Q4_0's stored weights, what llama.cpp computes with
        with torch.no_grad():
            return float(distill_loss(m.eval(), base, held))

    before = q4_0_kl(base)
    model = copy.deepcopy(base)
    hist = qat(model, tok, "Q4_0", text, QATTrainConfig(steps=30, batch=4, ctx=48, lr=3e-4), progress=False)
    assert len(hist) == 30 and hist[-1]["kl"] < 0.5 * hist[0]["kl"]
    assert all(type(m) is not FakeQuantLinear for m in model.modules())
    after = q4_0_kl(model)
    assert after < 0.6 * before, (before, after)


def test_qat_with_lora_trains_the_update_and_rounds_the_merged_weight(tmp_path):
    """lora_rank: only A and B train, the forward rounds W + s B A (not W's rounding plus an adapter), and
    convert leaves the merged weight; the Q4_0 KL to the original still drops."""
    from modelpress.core.kquants import rounded
    from tests.conftest import byte_tokenizer

    model = prepare(tiny_llama(), "Q4_0", lora_rank=4)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith(("lora_A", "lora_B")) for n in trained)
    lin = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        lin.lora_B.normal_(0, 0.05)
    x = torch.randn(3, 96)
    merged = lin.weight + lin.scaling * lin.lora_B @ lin.lora_A
    assert torch.equal(lin(x), F.linear(x, rounded(merged.detach(), "Q4_0")))
    assert torch.equal(convert(model).model.layers[0].mlp.up_proj.weight, merged.detach())

    tok = byte_tokenizer()
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"the {w} in the winter of {i}" for i, w in enumerate(["cat", "tree", "stone"] * 80)))
    model = tiny_llama()
    hist = qat(model, tok, "Q4_0", text, QATTrainConfig(steps=20, batch=4, ctx=48, lr=3e-3, lora_rank=4),
               progress=False)
    assert hist[-1]["kl"] < 0.7 * hist[0]["kl"], (hist[0]["kl"], hist[-1]["kl"])


def test_unsupported_targets_and_models_are_clear_errors():
    model = tiny_llama()
    with pytest.raises(ModelpressError, match="GGUF mix, RTN integers or NF4"):
        prepare(model, modelpress.AWQConfig())
    with pytest.raises(ModelpressError, match="unknown GGUF type"):
        prepare(tiny_llama(), "Q4_Z")
    quantized = modelpress.quantize(tiny_llama(), modelpress.RTNConfig(bits=4, group_size=32))
    with pytest.raises(ModelpressError, match="already quantized"):
        prepare(quantized, "Q4_0")
