"""AutoAWQ's GEMM layout: packing read by an independent unpacker written from the format's
definition, and a modelpress AWQ model back from it with the same logits."""
import json

import pytest
import torch
from safetensors.torch import load_file

import modelpress
from modelpress import AWQConfig
from modelpress.formats import awq as awq_format
from modelpress.record import record
from tests.conftest import gptq_act_order

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def unpack_reference(words: torch.Tensor) -> torch.Tensor:
    """(R, C) int32 -> (R, 8C) codes: nibble i of word c is column 8c + ORDER[i]."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros(w.shape[0], w.shape[1] * 8, dtype=torch.int64)
    for c in range(w.shape[1]):
        for i in range(8):
            out[:, 8 * c + ORDER[i]] = (w[:, c] >> (4 * i)) & 0xF
    return out


def test_layout_and_round_trip(tmp_path, tiny):
    model, tok = tiny
    calib = [torch.randint(0, 261, (64,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    modelpress.quantize(model, AWQConfig(bits=4, group_size=32, search_samples=4), calib)
    out = awq_format.save(model, tok, tmp_path / "awq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
                  "modules_to_not_convert": None}
    sd = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"  # in 160, out 96
    assert sd[f"{name}.qweight"].shape == (160, 12) and sd[f"{name}.qzeros"].shape == (5, 12)
    codes = unpack_reference(sd[f"{name}.qweight"])                  # (K, N)
    zeros = unpack_reference(sd[f"{name}.qzeros"])                   # (G, N)
    g = torch.arange(160) // 32
    W = (sd[f"{name}.scales"].float()[g] * (codes - zeros[g]).float()).t()
    assert torch.equal(W, model.get_submodule(name).dequantize())
    loaded, _ = modelpress.load(out)
    x = torch.randint(0, 261, (2, 24))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert record(loaded).config.method == "awq"


def test_act_order_is_refused(tmp_path, tiny):
    model, tok = tiny
    gptq_act_order(model)
    with pytest.raises(modelpress.ModelpressError, match="column order"):
        awq_format.save(model, tok, tmp_path / "awq")
    assert not (tmp_path / "awq").exists()
