"""compressed-tensors pack-quantized: a checkpoint llm-compressor wrote (tests/golden) loads with
the perplexity llm-compressor's own model gave, and its weights equal an independent unpacking;
what modelpress writes unpacks the same way and loads back with the same logits."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import modelpress
from modelpress import GPTQConfig, RTNConfig
from modelpress.eval.perplexity import perplexity_of_windows
from modelpress.formats import compressed_tensors as ct_format
from modelpress.model.walker import dense_weight
from modelpress.record import record
from tests.conftest import gptq_act_order

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "llmcompressor_gptq_tiny"


def unpack_rows(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Codes along the last dim, from the definition: code i = bits [i*b, i*b + b) of the row's
    little-endian stream of 32-bit words."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros(*w.shape[:-1], n, dtype=torch.int64)
    for i in range(n):
        word, off = divmod(i * bits, 32)
        v = w[..., word] >> off
        if off + bits > 32:
            v = v | (w[..., word + 1] << (32 - off))
        out[..., i] = v & ((1 << bits) - 1)
    return out


def test_llm_compressor_checkpoint_loads_with_its_own_ppl():
    expected = json.loads((GOLDEN / "expected.json").read_text())
    model, _ = modelpress.load(GOLDEN)
    ppl = perplexity_of_windows(model, torch.tensor(expected["eval_ids"]), progress=False).ppl
    assert abs(ppl - expected["ppl_llmcompressor"]) < 1e-9 * ppl, (ppl, expected["ppl_llmcompressor"])
    assert record(model).config.bits == 4 and record(model).config.group_size == 32


def test_weights_equal_an_independent_unpacking():
    sd = load_file(str(GOLDEN / "model.safetensors"))
    model, _ = modelpress.load(GOLDEN)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        N, K = sd[f"{name}.weight_shape"].tolist()
        q = unpack_rows(sd[f"{name}.weight_packed"], 4, K) - 8                  # signed codes
        zp = unpack_rows(sd[f"{name}.weight_zero_point"].t(), 4, N).t() - 8     # (N, G), packed along N
        scale = sd[f"{name}.weight_scale"]
        g = torch.arange(K) // 32
        W = (q - zp[:, g]).float() * scale[:, g]
        assert torch.equal(model.get_submodule(name).dequantize(), W)


@pytest.mark.parametrize("config", [RTNConfig(bits=4, group_size=32), RTNConfig(bits=3, group_size=32, symmetric=True),
                                    GPTQConfig(bits=4, group_size=32, act_order=True, static_groups=True)],
                         ids=["rtn4", "rtn3-sym", "gptq-act-static"])
def test_written_folder_reads_back_and_unpacks_independently(tmp_path, tiny, config):
    model, tok = tiny
    calib = [torch.randint(0, 261, (64,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    modelpress.quantize(model, config, calib if config.calibrated else None)
    out = ct_format.save(model, tok, tmp_path / "ct")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    w = qc["config_groups"]["group_0"]["weights"]
    assert qc["format"] == "pack-quantized" and (w["num_bits"], w["group_size"]) == (config.bits, 32)
    sd = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    N, K = sd[f"{name}.weight_shape"].tolist()
    half = 2 ** (config.bits - 1)
    q = unpack_rows(sd[f"{name}.weight_packed"], config.bits, K) - half
    zp = (unpack_rows(sd[f"{name}.weight_zero_point"].t(), config.bits, N).t() - half
          if f"{name}.weight_zero_point" in sd else torch.zeros(N, K // 32, dtype=torch.int64))
    g = sd[f"{name}.weight_g_idx"].long() if f"{name}.weight_g_idx" in sd else torch.arange(K) // 32
    W = (q - zp[:, g]).float() * sd[f"{name}.weight_scale"].float()[:, g]
    mod = model.get_submodule(name)
    assert torch.equal(W, dense_weight(mod))
    loaded, _ = modelpress.load(out)
    x = torch.randint(0, 261, (2, 24))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_dynamic_act_order_is_refused(tmp_path, tiny):
    model, tok = tiny
    gptq_act_order(model)
    with pytest.raises(modelpress.ModelpressError, match="static-groups"):
        ct_format.save(model, tok, tmp_path / "ct")
