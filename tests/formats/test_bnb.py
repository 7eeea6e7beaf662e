"""bitsandbytes' serialized layout, both ways: transformers + bitsandbytes loads what modelpress
writes, and modelpress loads what they write; same tensors, same logits."""
import json

import pytest
import torch

import modelpress
from modelpress import FP4Config, LLMInt8Config, ModelpressError, NF4Config
from modelpress.record import record

CASES = [
    (NF4Config(), dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")),
    (NF4Config(double_quant=True), dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)),
    (FP4Config(), dict(load_in_4bit=True, bnb_4bit_quant_type="fp4")),
    (LLMInt8Config(), dict(load_in_8bit=True)),
]
IDS = ["nf4", "nf4-dq", "fp4", "int8"]


def _peers():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes (a peer) is not installed")
    pytest.importorskip("accelerate", reason="accelerate (transformers needs it for bitsandbytes) is not installed")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    return AutoModelForCausalLM, BitsAndBytesConfig


def test_config_json_names_bitsandbytes(tmp_path, tiny):
    model, tok = tiny
    modelpress.quantize(model, NF4Config(double_quant=True, compute_dtype="bfloat16"))
    out = modelpress.save(model, tok, tmp_path / "ck")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_use_double_quant"]
    assert qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_compute_dtype"] == "bfloat16"
    assert qc["llm_int8_skip_modules"] == ["lm_head"]
    rtn = modelpress.quantize(modelpress.load(out)[0], modelpress.RTNConfig())  # a requantized model
    out2 = modelpress.save(rtn, tok, tmp_path / "ck2")
    assert "quantization_config" not in json.loads((out2 / "config.json").read_text())


def test_other_quant_methods_are_refused(tmp_path, tiny):
    model, tok = tiny
    out = modelpress.save(model, tok, tmp_path / "f")
    (out / "modelpress.json").unlink()
    data = json.loads((out / "config.json").read_text())
    data["quantization_config"] = {"quant_method": "hqq", "nbits": 4}
    (out / "config.json").write_text(json.dumps(data))
    with pytest.raises(ModelpressError, match="hqq"):
        modelpress.load(out)


def _fp32_path(model: torch.nn.Module) -> torch.nn.Module:
    """bitsandbytes' own fp32 forward, which modelpress' equals bit for bit. On CPUs with AVX-512
    BF16, bitsandbytes (0.50.2) otherwise repacks 4-bit weights at the first forward for a bf16
    matmul: other numbers (bf16 absmax), and rows that are not whole 64-value blocks (this tiny
    model's 96) fail in its _convert_weight_packed_for_cpu."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def _xfail_where_bnb_dequantizes_wrongly(config) -> None:  # noqa: ANN001
    """bitsandbytes 0.50.2's CPU dequantize_4bit on AVX-512 CPUs (Zen 5 here) disagrees with its own
    codes x absmax for rows that are not whole 64-value blocks (this tiny model's 96 and 160; see
    also test_codebook4): its logits are then not the format's. A peer bug; what was loaded is still
    checked above (the module types; the other way, every tensor bit for bit)."""
    if isinstance(config, LLMInt8Config):
        return
    import bitsandbytes.functional as bnbf

    from modelpress.core.codebook4 import dequantize_4bit

    w = torch.randn(96, 96, generator=torch.Generator().manual_seed(0)) * 0.05
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    if not torch.equal(bnbf.dequantize_4bit(packed, state).reshape(w.shape),
                       dequantize_4bit(packed.reshape(-1), state.absmax, w.shape, 64, "nf4")):
        pytest.xfail("bitsandbytes' CPU dequantize_4bit on this CPU disagrees with its own codes x absmax "
                     "for 96-wide rows at blocksize 64 (peer bug, bitsandbytes 0.50.2 with AVX-512)")


@pytest.mark.parametrize("config,bnb_kwargs", CASES, ids=IDS)
def test_transformers_loads_a_modelpress_checkpoint(tmp_path, tiny, config, bnb_kwargs):
    auto, _ = _peers()
    model, tok = tiny
    modelpress.quantize(model, config)
    out = modelpress.save(model, tok, tmp_path / "ck")
    theirs = _fp32_path(auto.from_pretrained(out, device_map="cpu", dtype=torch.float32))
    assert type(theirs.model.layers[0].mlp.down_proj).__module__.startswith("bitsandbytes")
    x = torch.randint(0, 261, (2, 24))
    _xfail_where_bnb_dequantizes_wrongly(config)
    with torch.no_grad():
        assert torch.equal(model(x).logits, theirs(x).logits)  # prefill: the same arithmetic exactly
        # decode-sized input: our kernel sums in another order (observed <= 2e-6)
        torch.testing.assert_close(model(x[:1, :4]).logits, theirs(x[:1, :4]).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("config,bnb_kwargs", CASES, ids=IDS)
def test_modelpress_loads_a_transformers_bitsandbytes_checkpoint(tmp_path, tiny_hf_dir, config, bnb_kwargs):
    auto, bnb_config = _peers()
    fp_dir, fp_model, tok = tiny_hf_dir
    theirs = _fp32_path(auto.from_pretrained(fp_dir, quantization_config=bnb_config(**bnb_kwargs), device_map="cpu",
                                             dtype=torch.float32))
    theirs.save_pretrained(tmp_path / "bnb")
    tok.save_pretrained(tmp_path / "bnb")
    loaded, _ = modelpress.load(tmp_path / "bnb")
    assert record(loaded).config == config
    ours = modelpress.quantize(fp_model, config)
    mine, their_sd = ours.state_dict(), loaded.state_dict()
    assert sorted(mine) == sorted(their_sd)
    for key in mine:  # every tensor, quant_state JSON included, bit for bit
        assert torch.equal(mine[key], their_sd[key]), key
    x = torch.randint(0, 261, (2, 24))
    _xfail_where_bnb_dequantizes_wrongly(config)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, theirs(x).logits)
