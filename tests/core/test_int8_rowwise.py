"""LLM.int8() numerics against bitsandbytes (bit-exact) and a golden case that pins them without it."""
import json
from pathlib import Path

import pytest
import torch

from modelpress.core import int8_rowwise

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "bnb_8bit_blocks.json"


def _fp32(hexes, shape):
    return torch.tensor([float.fromhex(h) for h in hexes], dtype=torch.float32).reshape(shape)


def test_golden_llm_int8():
    g = json.loads(GOLDEN.read_text())["llm_int8"]
    w = _fp32(g["weight_fp32_hex"], (6, 32))
    cb, scb = int8_rowwise.quantize_rows(w)
    assert cb.tolist() == g["CB"] and [float(v).hex() for v in scb.tolist()] == g["SCB_fp32_hex"]
    y = int8_rowwise.int8_linear(_fp32(g["x_fp32_hex"], (3, 32)), cb, scb, None, g["threshold"])
    # the outlier columns go through an fp32 GEMM (torch addmm, as in bitsandbytes), whose summation
    # order depends on the CPU's vector width: bit-exact on AVX2 (where the golden values were made),
    # 1 ulp apart on an AVX-512 machine (seen on a lent GPU machine's CPU)
    expect = torch.tensor([float.fromhex(h) for h in g["y_fp32_hex"]]).reshape(y.shape)
    torch.testing.assert_close(y, expect, rtol=1e-6, atol=1e-7)


def test_int_matmul_is_exact_past_fp32_range():
    a = torch.full((2, 3000), 127, dtype=torch.int8)
    b = torch.full((3, 3000), -127, dtype=torch.int8)
    b[0, 0] = -126  # a sum of 48.4M, past 2^24: one fp32 GEMM would round the last digits
    out = int8_rowwise.int_matmul(a, b)
    assert out.dtype == torch.int32 and out[0, 0] == -127 * 127 * 3000 + 127 and out[1, 1] == -127 * 127 * 3000


def test_outlier_columns_run_in_full_precision():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 0.1
    cb, scb = int8_rowwise.quantize_rows(w)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 0.5
    x[2, 7] = 40.0  # one huge input would otherwise crush the other values of its row to 0
    exact = x @ int8_rowwise.dequantize_rows(cb, scb).t()
    with_outliers = int8_rowwise.int8_linear(x, cb, scb, None, 6.0)
    without = int8_rowwise.int8_linear(x, cb, scb, None, 0.0)
    err_with = (with_outliers - exact)[2].abs().max()
    err_without = (without - exact)[2].abs().max()
    assert err_with < 0.02 < err_without  # observed 0.003 and 0.15


@pytest.mark.parametrize("shape", [(64, 64), (1536, 576), (576, 1536), (100, 96)])
@pytest.mark.parametrize("rows", [1, 3, 37])
@pytest.mark.parametrize("threshold", [0.0, 3.0, 6.0])
def test_bit_exact_with_bitsandbytes(shape, rows, threshold):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (a peer) is not installed")
    from bitsandbytes.autograd._functions import MatmulLtState

    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(*shape, generator=gen) * 0.05
    ref_cb, ref_scb, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16))
    cb, scb = int8_rowwise.quantize_rows(w)
    assert torch.equal(cb, ref_cb) and torch.equal(scb, ref_scb)
    x = torch.randn(rows, shape[1], generator=gen)
    x[:, 5] *= 8  # an outlier column for the thresholds above 0
    bias = torch.randn(shape[0], generator=gen)
    state = MatmulLtState()
    state.CB, state.SCB, state.threshold, state.has_fp16_weights, state.is_training = cb, scb, threshold, False, False
    ref = bnb.matmul(x, cb, state=state, threshold=threshold, bias=bias)
    assert torch.equal(int8_rowwise.int8_linear(x, cb, scb, bias, threshold), ref)
