import pytest
import torch

import modelpress
from modelpress import RTNConfig
from modelpress.config import BaseConfig
from modelpress.nn import IntxLinear
from modelpress.record import record
from tests.conftest import tiny_llama


@pytest.mark.parametrize("kwargs", [dict(bits=5), dict(group_size=0), dict(group_size=-8), dict(bits=4, group_size=2.5)])
def test_config_rejects_impossible_settings(kwargs):
    with pytest.raises(ValueError, match="bits|group size"):
        RTNConfig(**kwargs)


def test_config_round_trips_through_dict():
    c = RTNConfig(bits=3, group_size=None, symmetric=True, ignore=(r"lm_head", r"mlp"))
    d = c.to_dict()
    assert d["method"] == "rtn" and d["version"] == 1
    assert BaseConfig.from_dict(d) == c


def test_quantize_replaces_targets_but_not_head_or_embeddings():
    model = tiny_llama(tied=False)
    modelpress.quantize(model, RTNConfig(bits=4, group_size=32))
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["model.layers.0.self_attn.q_proj"] == "IntxLinear"
    assert kinds["model.layers.1.mlp.down_proj"] == "IntxLinear"
    assert kinds["lm_head"] == "DenseLinear"  # unquantized: an nn.Linear with the decode kernel
    assert kinds["model.embed_tokens"] == "Embedding"
    assert sum(isinstance(m, IntxLinear) for m in model.modules()) == 2 * 7
    assert record(model).config == RTNConfig(bits=4, group_size=32)


def test_targets_and_ignore():
    model = tiny_llama()
    modelpress.quantize(model, RTNConfig(bits=8, group_size=None, targets=(r"mlp\.",), ignore=(r"down_proj",)))
    q = {n for n, m in model.named_modules() if isinstance(m, IntxLinear)}
    assert q == {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj")}


def test_rtn_output_close_to_float_and_int8_closer_than_int4():
    x = torch.randint(0, 261, (2, 32))
    ref = tiny_llama()(x).logits
    errs = {}
    for bits in (8, 4):
        m = modelpress.quantize(tiny_llama(), RTNConfig(bits=bits, group_size=32))
        with torch.no_grad():
            errs[bits] = ((m(x).logits - ref).norm() / ref.norm()).item()
    assert errs[8] < 0.03 and errs[4] < 0.5 and errs[8] < errs[4] / 8  # observed 0.015 and 0.26
