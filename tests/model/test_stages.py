"""True-sequential stages of a Llama block: without compression they reproduce the block exactly;
each stage's inputs are what the block would feed those layers with the earlier layers already
replaced; blocks that do not fit get None (the caller falls back to the generic passes)."""
import torch

from modelpress.model import sequential
from modelpress.model.stages import LINEARS, ResidualStages
from tests.conftest import tiny_llama


def _inputs(model, n=5, length=24):
    wins = [torch.randint(0, 261, (length,), generator=torch.Generator().manual_seed(i)) for i in range(n)]
    return sequential.capture_inputs(model, wins, batch_size=2)


def _linears(block):
    return {n: block.get_submodule(n) for n in LINEARS}


def test_stages_reproduce_the_block_exactly():
    model = tiny_llama()
    block, inputs = sequential.blocks_of(model)[0], _inputs(model)
    stages = ResidualStages.of(block, inputs, _linears(block))
    assert stages is not None
    names = [n for n, _ in stages]
    assert names == [LINEARS[:3], LINEARS[3:4], LINEARS[4:6], LINEARS[6:]]
    ref = sequential.run_block(block, inputs)
    assert len(stages.outputs) == len(ref) == 3
    for got, want in zip(stages.outputs, ref):
        assert torch.equal(got, want)


def _perturbed(lin, seed):
    new = torch.nn.Linear(lin.in_features, lin.out_features, bias=False)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        new.weight.copy_(lin.weight + 0.05 * torch.randn(lin.weight.shape, generator=g))
    return new


def test_each_stage_sees_the_layers_replaced_before_it():
    model = tiny_llama()
    block, inputs = sequential.blocks_of(model)[1], _inputs(model)
    stages = ResidualStages.of(block, inputs, _linears(block))
    seen = {}
    for k, (names, xs) in enumerate(stages):
        seen[names[0]] = xs
        for n in names:  # "compress": replace the layers this stage fed
            parent, attr = n.rsplit(".", 1)
            setattr(block.get_submodule(parent), attr, _perturbed(block.get_submodule(n), k))
    # the replaced block run normally: hooks see the same inputs, the outputs are the same
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        got = []
        h = block.get_submodule(name).register_forward_pre_hook(lambda m, a: got.append(a[0]))
        sequential.run_block(block, inputs, keep=False)
        h.remove()
        if name != "self_attn.q_proj":  # q's input (the norm of h) does not depend on replacements
            for a, b in zip(seen[name], got):
                assert torch.equal(a, b), name
    for got, want in zip(stages.outputs, sequential.run_block(block, inputs)):
        assert torch.equal(got, want)


def test_blocks_that_do_not_fit_get_none():
    model = tiny_llama()
    block, inputs = sequential.blocks_of(model)[0], _inputs(model)
    assert ResidualStages.of(block, inputs, {"lm_head": model.lm_head}) is None
    assert ResidualStages.of(block.mlp, inputs, {}) is None

    class Scaled(torch.nn.Module):  # same parts, different forward: the exactness check refuses it
        def __init__(self, inner):
            super().__init__()
            self.input_layernorm, self.self_attn = inner.input_layernorm, inner.self_attn
            self.post_attention_layernorm, self.mlp, self.inner = inner.post_attention_layernorm, inner.mlp, inner

        def forward(self, h, **kw):
            return self.inner(h, **kw) * 2

    assert ResidualStages.of(Scaled(block), inputs, _linears(block)) is None
