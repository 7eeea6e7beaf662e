"""The block-by-block pipeline: replaying the captured block inputs through every block gives the
model's own hidden states; compress() sees each block once, in order, with working hooks."""
import torch

from modelpress.model import sequential
from modelpress.model.capture import HessianCapture
from tests.conftest import tiny_llama


def test_replayed_blocks_equal_the_model():
    model = tiny_llama()
    wins = [torch.randint(0, 261, (32,), generator=torch.Generator().manual_seed(i)) for i in range(6)]
    inputs = sequential.capture_inputs(model, wins, batch_size=4)
    assert [h.shape for h in inputs.hidden] == [(4, 32, 96), (2, 32, 96)]
    for block in sequential.blocks_of(model):
        inputs = sequential.BlockInputs(sequential.run_block(block, inputs), inputs.kwargs)
    with torch.no_grad():  # the model's output is its final norm of the last block's output
        ref = model.model(input_ids=torch.stack(wins), use_cache=False).last_hidden_state
        torch.testing.assert_close(model.model.norm(torch.cat(inputs.hidden)), ref, rtol=0, atol=1e-6)


def test_compress_sees_each_block_with_hooks():
    model = tiny_llama()
    wins = [torch.randint(0, 261, (16,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    seen = []

    def compress(i, block, run):
        mods = {"q": block.self_attn.q_proj, "k": block.self_attn.k_proj, "down": block.mlp.down_proj}
        with HessianCapture(mods) as cap:
            run()
        assert cap.key("k") == "q"  # q and k read the same tensor: one accumulator
        assert cap.hessian("q").shape == (96, 96) and cap.hessian("down").shape == (160, 160)
        assert cap.acc["q"].rows == 4 * 16
        seen.append(i)

    stats = sequential.run_sequential(model, wins, compress, batch_size=2)
    assert seen == [0, 1] and stats.blocks == 2 and stats.peak_rss_bytes > 0
