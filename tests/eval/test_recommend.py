"""eval/recommend.py: the smallest row within the limits (then the fastest, then the most accurate), the
runtimes each row's file loads in, and the command that makes it."""
import pytest

from modelpress.eval.compare import recipe
from modelpress.eval.recommend import command, recommend, runtimes_of


def _row(name, mb, ppl_pct, tps):
    return {"method": name, "recipe": recipe(name).__dict__, "size_bytes": mb * 1e6, "ppl": 10 * (1 + ppl_pct / 100),
            "ppl_change_pct": ppl_pct, "decode_tokens_per_s": tps}


ROWS = [_row("fp32", 538, 0.0, 24), _row("q8_0", 145, 0.1, 166), _row("q4_k_m", 105, 6.6, 99),
        _row("gptq-w4", 120, 11.0, 68), _row("awq-w4", 120, 8.0, 88), _row("nf4-dq", 110, 29.0, 62),
        _row("wanda-50", 538, 40.0, 24)]


def test_runtimes_and_commands():
    by = {r["method"]: r for r in ROWS}
    assert runtimes_of(by["q4_k_m"]) == {"llama.cpp", "modelpress"}
    assert runtimes_of(by["awq-w4"]) == {"vllm", "transformers", "modelpress"}
    assert runtimes_of(by["nf4-dq"]) == {"transformers", "modelpress"}
    assert runtimes_of(by["wanda-50"]) == {"llama.cpp", "vllm", "transformers", "modelpress"}  # still float
    packed = _row("sparsegpt-2:4-packed", 300, 90.0, 40)
    assert runtimes_of(packed) == {"modelpress"}  # Sparse24Linear layers
    assert command(packed, None).startswith("modelpress prune --method sparsegpt") and "--pattern 2:4" in command(
        packed, None) and command(packed, None).count("--pack") == 1
    assert command(by["q4_k_m"], None) == "modelpress export --type Q4_K_M --out q4_k_m.gguf"
    assert command(by["awq-w4"], "m.gguf").startswith("modelpress quantize m.gguf --method awq --bits 4 --group-size 64")
    assert command(by["wanda-50"], None).startswith("modelpress prune --method wanda --sparsity 0.5")


def test_the_limits_choose_the_smallest_then_fastest():
    (one,) = recommend(ROWS, max_ppl_increase=10, runtime="vllm")
    assert one.startswith("**awq-w4**") and "modelpress quantize --method awq" in one   # gptq-w4: +11 %
    (one,) = recommend(ROWS, max_size_mb=200, min_tokens_per_s=120)
    assert one.startswith("**q8_0**")
    (none,) = recommend(ROWS, max_size_mb=50)
    assert none.startswith("No row meets the limits")
    per_runtime = recommend(ROWS)  # no limits: each runtime's pick within +10 %
    assert [t.split("**")[1] for t in per_runtime] == ["q4_k_m", "awq-w4", "awq-w4", "q4_k_m"]
    with pytest.raises(ValueError, match="runtime"):
        recommend(ROWS, runtime="onnx")
