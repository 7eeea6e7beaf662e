"""8-bit dynamic map, blockwise 8-bit and double quantization against bitsandbytes (bit-exact),
and golden values that pin them without it."""
import json
from pathlib import Path

import pytest
import torch

from modelpress.core import dynamic8
from modelpress.core.codebook4 import dequantize_4bit, quantize_4bit

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "bnb_8bit_blocks.json"


def _fp32(hexes):
    return torch.tensor([float.fromhex(h) for h in hexes], dtype=torch.float32)


def test_dynamic_map_shape():
    code = dynamic8.dynamic_map()
    assert code.shape == (256,) and torch.all(code[1:] >= code[:-1])
    assert code[-1] == 1.0 and (code == 0).sum() == 1 and -1 < code[0] < -0.99
    assert code.abs()[code != 0].min() < 1e-6  # 5.5e-7: the midpoint of [0.1, 1] times 1e-6


def test_golden_double_quant():
    g = json.loads(GOLDEN.read_text())["double_quant"]
    absmax = _fp32(g["absmax_fp32_hex"])
    q, absmax2, offset = dynamic8.double_quantize(absmax)
    assert float(offset).hex() == g["offset_fp32_hex"]
    assert q.tolist() == g["qabsmax"] and [float(v).hex() for v in absmax2.tolist()] == g["absmax2_fp32_hex"]


def test_zero_block_and_round_trip_error():
    x = torch.cat([torch.zeros(256), torch.randn(300, generator=torch.Generator().manual_seed(0))])
    q, absmax = dynamic8.quantize_blockwise8(x)
    assert absmax[0] == 0 and torch.all(q[:256] == 0)
    back = dynamic8.dequantize_blockwise8(q, absmax)
    assert torch.all(back[:256] == dynamic8.dynamic_map()[0] * 0)
    rel = ((back - x).abs() / absmax.repeat_interleave(256)[: x.numel()].clamp(min=1e-9))[256:]
    assert rel.max() < 0.02  # observed 0.007 (half the widest gap of the map is 0.007)


@pytest.mark.parametrize("n", [1, 100, 256, 1000, 12288, 40001])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
def test_blockwise8_bit_exact_with_bitsandbytes(n, scale):
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes (a peer) is not installed")
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * scale
    x = x - x.mean()
    assert torch.equal(dynamic8.dynamic_map(), F.create_dynamic_map())
    ref_q, state = F.quantize_blockwise(x, blocksize=256)
    q, absmax = dynamic8.quantize_blockwise8(x)
    assert torch.equal(q, ref_q.reshape(q.shape)) and torch.equal(absmax, state.absmax)
    assert torch.equal(dynamic8.dequantize_blockwise8(q, absmax), F.dequantize_blockwise(ref_q, state).reshape(-1))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape,blocksize", [((1536, 576), 64), ((577, 33), 64), ((64, 64), 32), ((300, 700), 256)])
def test_double_quant_bit_exact_with_bitsandbytes(quant_type, shape, blocksize):
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes (a peer) is not installed")
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.05
    ref_packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
    packed, absmax = quantize_4bit(w, blocksize, quant_type)
    q, absmax2, offset = dynamic8.double_quantize(absmax)
    assert torch.equal(packed, ref_packed.reshape(-1))
    assert torch.equal(q, state.absmax) and torch.equal(absmax2, state.state2.absmax)
    assert float(offset) == float(state.offset)
    deq = dequantize_4bit(packed, dynamic8.double_dequantize(q, absmax2, offset), shape, blocksize, quant_type)
    assert torch.equal(deq, F.dequantize_4bit(ref_packed, state))
