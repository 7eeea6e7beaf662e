"""eval/sensitivity.py: the predicted KL of rounding one layer to Q4_0 against the KL measured by rounding
it, layer by layer, on the tiny model; the map's grid; compare's report carries it."""
import copy

import torch

from modelpress.core import kquants
from modelpress.eval.divergence import divergence, reference
from modelpress.eval.sensitivity import grid, layer_sensitivity
from tests.conftest import tiny_llama


def test_predicted_kl_follows_the_measured_one():
    model = tiny_llama()
    calib = [torch.randint(1, 261, (64,), generator=torch.Generator().manual_seed(i)) for i in range(16)]
    pred = layer_sensitivity(model, calib, windows=16)
    assert len(pred) == 14 and all(v > 0 for v in pred.values())
    held = torch.stack(calib)
    ref = reference(model, held, progress=False)
    meas = {}
    for fqn in pred:
        m = copy.deepcopy(model)
        lin = m.get_submodule(fqn)
        with torch.no_grad():
            lin.weight.copy_(kquants.rounded(lin.weight, "Q4_0"))
        meas[fqn] = divergence(m, held, ref, progress=False).kl_mean
    ratios = [pred[f] / meas[f] for f in pred]
    assert 0.6 < min(ratios) and max(ratios) < 1.6, ratios        # second order: observed 0.88 .. 1.29 here
    p, q = torch.tensor([pred[f] for f in pred]).argsort().argsort(), torch.tensor([meas[f] for f in pred]).argsort().argsort()
    rho = 1 - 6 * float(((p - q).float() ** 2).sum()) / (14 * (14 ** 2 - 1))
    assert rho > 0.7, (rho, pred, meas)                             # and the same order


def test_grid_is_blocks_by_projections():
    sens = {"model.layers.1.self_attn.q_proj": 2.0, "model.layers.0.self_attn.q_proj": 1.0,
            "model.layers.0.mlp.down_proj": 3.0}
    blocks, names, values = grid(sens)
    assert blocks == [0, 1] and names == ["q_proj", "down_proj"] and values == [[1.0, 3.0], [2.0, None]]
