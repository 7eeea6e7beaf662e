"""compressed-tensors pack-quantized: a checkpoint llm-compressor wrote (tests/golden) loads with
the perplexity llm-compressor's own model gave, and its weights equal an independent unpacking."""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import modelpress
from modelpress.eval.perplexity import perplexity_of_windows

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
    assert model.modelpress_config.bits == 4 and model.modelpress_config.group_size == 32


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
