"""The calibrated methods on every family the decoder computes (tests/model/families.py): AWQ folds
its scales where each family's blocks put them (gemma's (1 + w) norms and pre-feedforward norm,
phi3's fused layers) without changing the function, and GPTQ / AWQ beat round-to-nearest."""
import copy

import pytest
import torch

import modelpress
from modelpress.errors import ModelpressError
from modelpress.methods.awq import MAPPINGS
from modelpress.model.decoder import FAMILIES
from tests.model.families import tiny

GEN = torch.Generator().manual_seed(0)
CALIB = [torch.randint(3, 261, (128,), generator=GEN) for _ in range(8)]
X = torch.randint(3, 261, (4, 64), generator=GEN)


def _logits(model):
    with torch.no_grad():
        return model(X).logits.float()


def _kl(ref, got):
    return torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                      reduction="batchmean").item()


def test_awq_knows_every_family():
    assert set(MAPPINGS) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_awq_scales_fold_without_changing_the_function(family):
    model = tiny(family)
    ref = _logits(model)
    scaled = modelpress.quantize(copy.deepcopy(model), modelpress.AWQConfig(bits=3, group_size=32,
                                                                          scales_only=True), CALIB)
    changed = [n for (n, p), q in zip(model.named_parameters(), scaled.parameters()) if not torch.equal(p, q)]
    # scales were folded in before the MLP (the pre-MLP norm) and before down_proj (from up, or from
    # phi3's fused gate_up, whose up part alone is divided)
    mlp_norm = "pre_feedforward_layernorm" if "gemma" in family else "post_attention_layernorm"
    assert {f"model.layers.0.{mlp_norm}.weight", "model.layers.0.mlp.down_proj.weight"} <= set(changed), changed
    if "gemma" in family:
        assert "model.layers.0.post_attention_layernorm.weight" not in changed  # it norms the attention's output
    torch.testing.assert_close(_logits(scaled), ref, rtol=0, atol=2e-4 * ref.abs().max().item())


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_and_awq_beat_round_to_nearest(family):
    model = tiny(family)
    ref = _logits(model)
    kl = {name: _kl(ref, _logits(modelpress.quantize(copy.deepcopy(model), cfg, CALIB)))
          for name, cfg in [("rtn", modelpress.RTNConfig(bits=3, group_size=32)),
                            ("gptq", modelpress.GPTQConfig(bits=3, group_size=32)),
                            ("awq", modelpress.AWQConfig(bits=3, group_size=32))]}
    assert kl["gptq"] < kl["rtn"] and kl["awq"] < kl["rtn"], kl


def test_awq_refuses_a_family_it_does_not_know():
    with pytest.raises(ModelpressError, match="'olmo'.*RTN"):  # blocks named as Llama's, of no family it knows
        modelpress.quantize(_olmo(), modelpress.AWQConfig(bits=4, group_size=32), CALIB)


def test_linear_only_methods_run_on_an_unknown_family_saying_so():
    with pytest.warns(UserWarning, match="'olmo' is not one of the model families"):
        modelpress.quantize(_olmo(), modelpress.RTNConfig(bits=4, group_size=32))
    with pytest.raises(ModelpressError, match="'olmo'"):
        modelpress.quantize(_olmo(), modelpress.GPTQConfig(bits=4, group_size=32), CALIB)


def _olmo():
    model = tiny("llama")
    model.config.model_type = "olmo"
    return model
