"""GGUFLinear: a GGUF tensor's blocks run as a layer, equal to the dequantized weight."""
import pytest
import torch

import modelpress
from modelpress.core import kquants
from modelpress.nn.gguf_linear import GGUFLinear


@pytest.mark.parametrize("kind", kquants.TYPES)
def test_layer_computes_with_the_dequantized_weight(kind):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(64, 512, generator=gen)
    data = kquants.quantize(w, kind)
    layer = GGUFLinear.from_blocks(data, kind, 512)
    dense = kquants.dequantize(data, kind, 512)
    assert torch.equal(layer.dequantize(), dense)
    for rows in (1, 4, 20):  # the decode kernel (<= 8 rows) and the prefill path
        x = torch.randn(rows, 512, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ dense.t(), rtol=0, atol=1e-4 * (x @ dense.t()).abs().max().item())


def test_refuses_rows_of_partial_blocks():
    with pytest.raises(ValueError, match="whole blocks of 256"):
        GGUFLinear(300, 8, "Q4_K")


@pytest.mark.parametrize("mix", ["Q8_0", "Q4_0", "Q5_1"])
def test_a_gguf_model_runs_on_its_blocks_like_its_fp32_copy(tmp_path, mix):
    from modelpress.formats.gguf_writer import write_gguf
    from modelpress.model.load import default_model_path
    from tests.conftest import tiny_llama

    try:
        source = default_model_path()
    except modelpress.ModelpressError as e:
        pytest.skip(f"the default model's GGUF supplies the tokenizer: {e}")
    path = tmp_path / f"{mix}.gguf"
    write_gguf(path, tiny_llama(vocab_size=49152), mix, source, progress=False)
    dense, _ = modelpress.load(path)
    blocks, _ = modelpress.load(path, keep_blocks=True)
    kept = [n for n, m in blocks.named_modules() if isinstance(m, GGUFLinear)]
    assert len(kept) == 14  # every projection of both blocks (q/k rows re-ordered like the fp32 ones)
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in (12, 3):
            a, b = dense(ids[:, :t]).logits, blocks(ids[:, :t]).logits
            torch.testing.assert_close(b, a, rtol=0, atol=1e-4 * a.abs().max().item())
