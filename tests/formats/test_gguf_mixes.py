"""llama.cpp's mixes as data: the per-tensor types for the default model's layout (30 blocks,
576-wide rows, 3 of 9 heads for keys and values), whose counts llama.cpp's own quantizer gave on
the real model (Q4_K_M: 166 Q5_0, 61 F32, 16 Q4_K, 15 Q8_0, 14 Q6_K), and the rules behind them."""
from collections import Counter

import pytest

from modelpress.formats.gguf_mixes import MIXES, tensor_types

LAYERS = 30


def smollm_tensors(layers: int = LAYERS, tied: bool = True):
    out = [("token_embd.weight", (49152, 576))]
    for i in range(layers):
        out += [(f"blk.{i}.attn_norm.weight", (576,)), (f"blk.{i}.attn_q.weight", (576, 576)),
                (f"blk.{i}.attn_k.weight", (192, 576)), (f"blk.{i}.attn_v.weight", (192, 576)),
                (f"blk.{i}.attn_output.weight", (576, 576)), (f"blk.{i}.ffn_norm.weight", (576,)),
                (f"blk.{i}.ffn_gate.weight", (1536, 576)), (f"blk.{i}.ffn_up.weight", (1536, 576)),
                (f"blk.{i}.ffn_down.weight", (576, 1536))]
    out.append(("output_norm.weight", (576,)))
    if not tied:
        out.append(("output.weight", (49152, 576)))
    return out


def _types(mix, **kw):
    return tensor_types(smollm_tensors(**kw), mix, n_head=9, n_head_kv=3)


# use_more_bits(i, 30): i < 3 or i >= 26 or (i - 3) % 3 == 2
MORE_BITS = [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def test_q4_k_m_matches_llama_cpp_counts_and_layers():
    t = _types("Q4_K_M")
    assert Counter(t.values()) == {"Q5_0": 166, "F32": 61, "Q4_K": 16, "Q8_0": 15, "Q6_K": 14}
    assert t["token_embd.weight"] == "Q8_0"  # tied output: Q6_K, which 576 columns turn into Q8_0
    assert [i for i in range(LAYERS) if t[f"blk.{i}.ffn_down.weight"] == "Q6_K"] == MORE_BITS
    assert [i for i in range(LAYERS) if t[f"blk.{i}.attn_v.weight"] == "Q8_0"] == MORE_BITS  # Q6_K -> Q8_0
    assert {t[f"blk.{i}.attn_q.weight"] for i in range(LAYERS)} == {"Q5_0"}  # Q4_K -> Q5_0 on 576 columns


def test_other_mixes_follow_their_rules():
    q3m = _types("Q3_K_M")
    assert [q3m[f"blk.{i}.attn_v.weight"] for i in range(3)] == ["Q5_1", "Q5_1", "Q5_0"]  # Q5_K / Q4_K fall back
    assert [q3m[f"blk.{i}.ffn_down.weight"] for i in (0, 1)] == ["Q5_K", "Q4_K"]  # i < 30 // 16
    assert q3m["blk.0.attn_output.weight"] == "Q5_0"
    q2 = _types("Q2_K")
    assert q2["blk.0.ffn_down.weight"] == "Q3_K" and q2["blk.3.attn_q.weight"] == "Q4_0"
    assert q2["blk.3.attn_v.weight"] == "Q4_0"  # n_head / n_head_kv = 3 < 4: Q3_K, falling back
    q4s = _types("Q4_K_S")
    assert [q4s[f"blk.{i}.ffn_down.weight"] for i in (1, 2, 3)] == ["Q5_K", "Q5_K", "Q4_K"]  # i < 30 // 8
    assert _types("Q8_0")["token_embd.weight"] == "Q8_0"
    assert _types("Q4_0")["token_embd.weight"] == "Q8_0"  # Q6_K for the output, then its fallback
    untied = _types("Q6_K", tied=False)
    assert untied["output.weight"] == "Q8_0" and untied["token_embd.weight"] == "Q8_0"
    f16 = _types("F16")
    assert f16["blk.0.attn_q.weight"] == "F16" and f16["blk.0.attn_norm.weight"] == "F32"
    assert _types("Q4_0", layers=8)["blk.0.ffn_down.weight"] == "Q4_0"
    assert tensor_types(smollm_tensors(8), "Q4_0", 9, 3, imatrix=True)["blk.0.ffn_down.weight"] == "Q4_1"


def test_every_mix_is_known_and_unknown_ones_are_refused():
    for mix in MIXES:
        assert len(_types(mix, layers=2)) == 2 + 9 * 2
    with pytest.raises(ValueError, match="unknown GGUF mix 'Q4_K_X'"):
        _types("Q4_K_X")
