"""methods/prune.py on a model: every decoder linear pruned to the pattern (the head and embeddings
left alone), the calibrated criteria closer to the original than magnitude, the joint SparseGPT + int4
checkpoint round trip, and the compare rows."""
import copy

import pytest
import torch

import modelpress
from modelpress.eval.divergence import divergence, reference
from modelpress.methods.prune import parse_pattern, weight_sparsity
from modelpress.nn import IntxLinear
from tests.conftest import tiny_llama


def _windows(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 261, (48,), generator=g) for _ in range(n)]


@pytest.mark.parametrize("config", [modelpress.MagnitudeConfig(pattern="2:4"), modelpress.WandaConfig(),
                                    modelpress.SparseGPTConfig(pattern="4:8")], ids=lambda c: c.describe())
def test_every_decoder_linear_gets_the_pattern(config):
    base = tiny_llama()
    model = modelpress.quantize(copy.deepcopy(base), config, _windows(8, 0))
    n, m = parse_pattern(config.pattern)
    for fqn, mod in model.named_modules():
        if fqn.startswith("model.layers.") and isinstance(mod, torch.nn.Linear):
            zero = mod.weight == 0
            if m:
                assert (zero.reshape(zero.shape[0], -1, m).sum(-1) >= n).all(), fqn
            else:
                assert abs(zero.float().mean().item() - config.sparsity) < 0.02, fqn
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert abs(weight_sparsity(model) - 0.5) < 0.01


def test_calibrated_criteria_stay_closer_to_the_model():
    """KL from the original on held-out windows: SparseGPT and Wanda below magnitude at 50 %."""
    base = tiny_llama()
    held = torch.stack(_windows(4, 9))
    ref = reference(base, held, progress=False)
    kl = {}
    for name, cfg in (("magnitude", modelpress.MagnitudeConfig()), ("wanda", modelpress.WandaConfig()),
                      ("sparsegpt", modelpress.SparseGPTConfig())):
        m = modelpress.quantize(copy.deepcopy(base), cfg, _windows(16, 1))
        kl[name] = divergence(m, held, ref, progress=False).kl_mean
    assert kl["sparsegpt"] < kl["magnitude"] and kl["wanda"] < kl["magnitude"], kl


def test_joint_sparsegpt_int4_checkpoint_round_trip(tmp_path):
    model = modelpress.quantize(tiny_llama(), modelpress.SparseGPTConfig(pattern="2:4", bits=4, group_size=32),
                                _windows(8, 2))
    lin = model.model.layers[0].mlp.up_proj
    assert isinstance(lin, IntxLinear)
    w = lin.dequantize()
    assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) >= 2).all()
    from tests.conftest import byte_tokenizer

    modelpress.save(model, byte_tokenizer(), tmp_path / "ckpt")
    back, _ = modelpress.load(tmp_path / "ckpt")
    assert torch.equal(back.model.layers[0].mlp.up_proj.dequantize(), w)


def test_bad_patterns_are_clear_errors():
    for bad in ("2-4", "4:4", "0:4", "x"):
        with pytest.raises(ValueError, match="N:M"):
            modelpress.WandaConfig(pattern=bad)
    with pytest.raises(ValueError, match="sparsity"):
        modelpress.MagnitudeConfig(sparsity=1.0)
    with pytest.raises(ValueError, match="bits"):
        modelpress.SparseGPTConfig(bits=5)
    from modelpress.errors import ModelpressError

    quantized = modelpress.quantize(tiny_llama(), modelpress.RTNConfig(bits=4, group_size=32))
    for cfg in (modelpress.MagnitudeConfig(), modelpress.WandaConfig()):
        with pytest.raises(ModelpressError, match="already quantized"):
            modelpress.quantize(quantized, cfg, _windows(2, 0))


def test_structured_pruning_removes_the_least_important_channels(tmp_path):
    """Channels whose down_proj columns are zero score 0 and go first: the narrower model computes what
    the original did (up to the order of sums); config.intermediate_size follows; transformers reloads
    the saved folder and the GGUF export holds the narrower tensors."""
    from transformers import AutoModelForCausalLM

    base = tiny_llama()
    dead = torch.arange(0, 160, 3)[:40]  # 40 of 160 channels contribute nothing
    with torch.no_grad():
        for layer in base.model.layers:
            layer.mlp.down_proj.weight[:, dead] = 0
    ids = torch.randint(1, 261, (1, 24), generator=torch.Generator().manual_seed(4))
    ref = base(ids).logits
    model = modelpress.quantize(copy.deepcopy(base), modelpress.StructuredConfig(mlp=0.25, multiple=8), _windows(8, 3))
    assert model.config.intermediate_size == 120
    for layer, orig in zip(model.model.layers, base.model.layers):
        assert layer.mlp.gate_proj.weight.shape == (120, 96) and layer.mlp.down_proj.weight.shape == (96, 120)
        alive = [j for j in range(160) if j not in set(dead.tolist())]
        assert torch.equal(layer.mlp.up_proj.weight, orig.mlp.up_proj.weight[alive])  # the live ones, in order
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path / "hf")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(again(ids).logits, ref, rtol=0, atol=1e-5)
    from gguf import GGUFReader

    from tests.conftest import byte_tokenizer

    modelpress.export_gguf(model, byte_tokenizer(), tmp_path / "m.gguf", "Q8_0", progress=False)
    shapes = {t.name: tuple(int(v) for v in t.shape) for t in GGUFReader(tmp_path / "m.gguf").tensors}
    assert shapes["blk.0.ffn_down.weight"] == (120, 96)
    with pytest.raises(ValueError, match="fraction"):
        modelpress.StructuredConfig(mlp=1.0)


def _worded_text():
    """(calibration windows, held-out windows) of a small worded text: random tokens teach nothing that
    carries over to held-out text."""
    from modelpress.data import tokenize, windows
    from tests.conftest import byte_tokenizer

    tok, words = byte_tokenizer(), ["thing", "cat", "tree", "house", "river", "stone"]
    calib = list(windows(tokenize(tok, " ".join(f"the {w} in the winter of {i}" for i, w in enumerate(words * 40))),
                         48, 32))
    held = windows(tokenize(tok, " ".join(f"a {w} by the summer {i}" for i, w in enumerate(words * 10))), 48, 4)
    return calib, held


def test_structured_recovery_lowers_the_kl():
    """recover: distillation steps from the unpruned model after the cut; the KL on held-out text drops."""
    calib, held = _worded_text()
    base = tiny_llama()
    ref = reference(base, held, progress=False)
    kl = {}
    for steps in (0, 30):
        cfg = modelpress.StructuredConfig(mlp=0.5, multiple=8, recover=steps, recover_lr=3e-4)
        m = modelpress.quantize(copy.deepcopy(base), cfg, calib)
        kl[steps] = divergence(m, held, ref, progress=False).kl_mean
    assert kl[30] < 0.92 * kl[0], kl  # tiny model, 30 steps: 0.0362 -> 0.0315


def test_unstructured_recovery_keeps_the_mask_and_lowers_the_kl():
    """Wanda 2:4 then 30 recovery steps: exactly the same weights are zero (the pruned ones' gradients are
    masked), the kept ones moved, and the KL on held-out text drops."""
    calib, held = _worded_text()
    base = tiny_llama()
    ref = reference(base, held, progress=False)
    out = {s: modelpress.quantize(copy.deepcopy(base), modelpress.WandaConfig(pattern="2:4", recover=s, recover_lr=3e-4),
                                  calib) for s in (0, 30)}
    for fqn, mod in out[0].named_modules():
        if fqn.startswith("model.layers.") and isinstance(mod, torch.nn.Linear):
            after = out[30].get_submodule(fqn).weight
            assert torch.equal(after == 0, mod.weight == 0), fqn
            assert not torch.equal(after, mod.weight), fqn
    kl = {s: divergence(m, held, ref, progress=False).kl_mean for s, m in out.items()}
    assert kl[30] < 0.92 * kl[0], kl
    with pytest.raises(ValueError, match="integer codes"):
        modelpress.SparseGPTConfig(pattern="2:4", bits=4, recover=5)


def test_packed_2_4_layers_compute_the_pruned_model_and_round_trip(tmp_path):
    """pack: every pruned layer a Sparse24Linear holding the same weights in 17/32 of the bytes; decode-sized
    inputs (the kernel) and prefill (the dense rebuild) match the unpacked model; the checkpoint reloads
    bit for bit."""
    from modelpress.nn import Sparse24Linear
    from tests.conftest import byte_tokenizer

    base = tiny_llama()
    dense = modelpress.quantize(copy.deepcopy(base), modelpress.WandaConfig(pattern="2:4"), _windows(8, 5))
    packed = modelpress.quantize(copy.deepcopy(base), modelpress.WandaConfig(pattern="2:4", pack=True), _windows(8, 5))
    lin, ref = packed.model.layers[1].self_attn.q_proj, dense.model.layers[1].self_attn.q_proj
    assert isinstance(lin, Sparse24Linear) and torch.equal(lin.dequantize(), ref.weight)
    assert lin.values.numel() * 4 + lin.indices.numel() == 17 / 32 * ref.weight.numel() * 4
    ids = torch.randint(1, 261, (1, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, dense(ids).logits, rtol=0, atol=1e-5)
        x = torch.randn(3, lin.in_features)
        torch.testing.assert_close(lin(x), ref(x), rtol=1e-5, atol=1e-5)
    modelpress.save(packed, byte_tokenizer(), tmp_path / "ckpt")
    back, _ = modelpress.load(tmp_path / "ckpt")
    assert torch.equal(back.model.layers[1].self_attn.q_proj.values, lin.values)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, packed(ids).logits)
    with pytest.raises(ValueError, match="2:4"):
        modelpress.WandaConfig(pack=True)
    with pytest.raises(ValueError, match="integer codes"):
        modelpress.SparseGPTConfig(pattern="2:4", bits=4, pack=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_values_of_a_half_model_are_half(tmp_path, dtype):
    """A bf16 / fp16 model (config.dtype) keeps its packed values so: 9/32 of the fp32 bytes, the same products
    as the dense layer of those half weights (the kernel at decode, the rebuild at prefill), the checkpoint
    smaller than the fp32 values' by the values' half and reloaded bit for bit; float_dtype="float32" keeps fp32."""
    from modelpress.nn import Sparse24Linear
    from tests.conftest import byte_tokenizer

    base = tiny_llama()
    base.config.dtype = dtype
    cfg = dict(pattern="2:4", pack=True)
    half = modelpress.quantize(copy.deepcopy(base), modelpress.MagnitudeConfig(**cfg))
    full = modelpress.quantize(copy.deepcopy(base), modelpress.MagnitudeConfig(**cfg, float_dtype="float32"))
    lin, ref = half.model.layers[1].mlp.down_proj, full.model.layers[1].mlp.down_proj
    assert isinstance(lin, Sparse24Linear) and lin.values.dtype == dtype and ref.values.dtype == torch.float32
    assert lin.values.numel() * 2 + lin.indices.numel() == 9 / 32 * lin.in_features * lin.out_features * 4
    assert torch.equal(lin.values, ref.values.to(dtype)) and torch.equal(lin.indices, ref.indices)
    w = lin.dequantize()
    with torch.no_grad():
        for rows in (1, 3, 40):  # the kernel (decode-sized) and the dense rebuild
            x = torch.randn(rows, lin.in_features, generator=torch.Generator().manual_seed(rows))
            torch.testing.assert_close(lin(x), x @ w.T, rtol=1e-5, atol=1e-5)
    sizes = {}
    for name, m in (("half", half), ("full", full)):
        sizes[name] = (modelpress.save(m, byte_tokenizer(), tmp_path / name) / "model.safetensors").stat().st_size
    packed_values = sum(m.values.numel() for m in full.modules() if isinstance(m, Sparse24Linear))
    assert sizes["full"] - sizes["half"] >= 2 * packed_values
    back, _ = modelpress.load(tmp_path / "half")
    assert torch.equal(back.model.layers[1].mlp.down_proj.values, lin.values)
    ids = torch.randint(1, 261, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, half(ids).logits)


def test_torch_prune_form_is_written_and_read(tmp_path):
    """to_torch_prune: each pruned decoder linear reparametrized by torch.nn.utils.prune with its non-zeros'
    mask (weight_orig / weight_mask in the state dict; torch's own methods prune on from there). A folder
    saved from such a model (weight_orig / weight_mask keys, no weight) loads with weight = orig * mask, and
    quantize makes torch's hooks permanent first, so a method's writes are not undone at the next forward."""
    from torch.nn.utils import prune

    from modelpress.model.torch_prune import to_torch_prune
    from tests.conftest import byte_tokenizer

    model = modelpress.quantize(tiny_llama(), modelpress.MagnitudeConfig(pattern="2:4"))
    ids = torch.randint(1, 261, (1, 16), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = model(ids).logits
    to_torch_prune(model)
    up = model.model.layers[0].mlp.up_proj
    assert prune.is_pruned(up) and torch.equal(up.weight_mask, (up.weight_orig != 0).float())
    sd = model.state_dict()
    assert "model.layers.0.mlp.up_proj.weight_mask" in sd and "model.layers.0.mlp.up_proj.weight" not in sd
    prune.l1_unstructured(up, "weight", amount=0.75)  # torch prunes on: the earlier zeros stay zeros
    assert float((up.weight == 0).float().mean()) >= 0.75
    with torch.no_grad():
        up.weight_orig.add_(1.0)  # the mask, not the stored values, decides what is zero
    model.save_pretrained(tmp_path / "hf")
    byte_tokenizer().save_pretrained(tmp_path / "hf")
    back, _ = modelpress.load(tmp_path / "hf")
    assert torch.equal(back.model.layers[0].mlp.up_proj.weight, up.weight_orig * up.weight_mask)
    modelpress.quantize(model, modelpress.MagnitudeConfig(sparsity=0.9))  # hooks removed, then pruned
    assert not prune.is_pruned(up) and float((model.model.layers[0].mlp.up_proj.weight == 0).float().mean()) > 0.89
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, ref)


def test_structured_heads_and_depth_give_a_standard_smaller_model(tmp_path):
    """heads: whole key / value groups go (a group whose o_proj columns are zero scores 0 and goes first),
    config heads / kv heads / head_dim follow and the model computes what it did (that group added
    nothing); layers: the block that leaves its input most unchanged goes (an identity block: all its
    output projections zero), the rest renumbered. transformers reloads the folder and the engine decodes it."""
    from transformers import AutoModelForCausalLM

    from modelpress.methods.prune import block_influence

    base = tiny_llama()
    base.config.num_hidden_layers = 3
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    base.model.layers.append(LlamaDecoderLayer(base.config, 2))
    with torch.no_grad():
        for layer in base.model.layers:
            layer.self_attn.o_proj.weight[:, 48:] = 0      # kv group 1 (query heads 3..5) contributes nothing
        ident = base.model.layers[1]
        ident.self_attn.o_proj.weight.zero_()
        ident.mlp.down_proj.weight.zero_()                  # block 1 returns its input
    calib = _windows(8, 6)
    assert int(block_influence(base, calib, 4).argmin()) == 1
    ids = torch.randint(1, 261, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = base(ids).logits
    model = modelpress.quantize(copy.deepcopy(base), modelpress.StructuredConfig(mlp=0, heads=0.5, layers=1), calib)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 3, 1, 16)
    assert len(model.model.layers) == 2 and [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    attn = model.model.layers[1].self_attn
    assert attn.q_proj.weight.shape == (48, 96) and attn.k_proj.weight.shape == (16, 96)
    assert torch.equal(attn.o_proj.weight, base.model.layers[2].self_attn.o_proj.weight[:, :48])
    assert torch.equal(attn.v_proj.weight, base.model.layers[2].self_attn.v_proj.weight[:16])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path / "hf")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ref, rtol=0, atol=1e-5)
    from tests.conftest import byte_tokenizer, hf_greedy_ids

    sp = modelpress.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    got = modelpress.Engine(model, byte_tokenizer()).generate([ids[0].tolist()], sp)[0].outputs[0].token_ids
    assert got == hf_greedy_ids(model, ids, 12)
    with pytest.raises(ValueError, match="something to remove"):
        modelpress.StructuredConfig(mlp=0)
    with pytest.raises(modelpress.ModelpressError, match="key / value groups"):
        modelpress.quantize(copy.deepcopy(base), modelpress.StructuredConfig(mlp=0, heads=0.2), calib)
