"""NF4 / FP4 against bitsandbytes (bit-exact), and golden blocks that pin the format without it."""
import json
from pathlib import Path

import pytest
import torch

from modelpress.core.codebook4 import FP4_CODE, NF4_CODE, dequantize_4bit, quantize_4bit

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "bnb_4bit_blocks.json"


def test_code_books():
    assert NF4_CODE[7] == 0 and NF4_CODE[0] == -1 and NF4_CODE[15] == 1
    assert torch.all(NF4_CODE[1:] > NF4_CODE[:-1])
    assert FP4_CODE.abs().max() == 1 and FP4_CODE[3] == 1 and FP4_CODE[1] == 0.0625 / 12
    assert torch.equal(FP4_CODE[8:], -FP4_CODE[:8])   # bit 3 is the sign


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_golden_blocks(quant_type):
    g = json.loads(GOLDEN.read_text())
    w = torch.tensor([float.fromhex(h) for h in g["input_fp32_hex"]])
    packed, absmax = quantize_4bit(w, 32, quant_type)
    ref = g[quant_type]
    assert bytes(packed.tolist()).hex() == ref["packed_hex"]
    assert [float(x).hex() for x in absmax.tolist()] == ref["absmax_fp32_hex"]
    deq = dequantize_4bit(packed, absmax, w.shape, 32, quant_type)
    assert [float(x).hex() for x in deq.tolist()] == ref["dequantized_fp32_hex"]


def test_high_nibble_first():
    packed, absmax = quantize_4bit(torch.tensor([-1.0, 1.0, 0.0]), 32, "nf4")
    assert packed.tolist() == [0x0F, 0x77] and absmax.tolist() == [1.0]  # pad nibble = code of 0


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 4096])
@pytest.mark.parametrize("shape", [(64, 64), (7, 33), (576, 1536), (1000,), (3, 5)])
def test_bit_exact_with_bitsandbytes(quant_type, blocksize, shape):
    bnb = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes (a peer) is not installed")
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(blocksize)) * 0.05
    w.view(-1)[:3] = 0
    packed, absmax = quantize_4bit(w, blocksize, quant_type)
    ref_packed, state = bnb.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    assert torch.equal(packed, ref_packed.reshape(-1)) and torch.equal(absmax, state.absmax)
    deq = dequantize_4bit(packed, absmax, w.shape, blocksize, quant_type)
    theirs = bnb.dequantize_4bit(ref_packed, state).reshape(w.shape)
    if not torch.equal(deq, theirs):
        # the format's definition: each code's value times its block's absmax (high nibble first)
        idx = torch.stack([packed.long() >> 4, packed.long() & 15], 1).reshape(-1)[:w.numel()]
        code = (NF4_CODE if quant_type == "nf4" else FP4_CODE)[idx]
        definition = (code * absmax.repeat_interleave(blocksize)[:w.numel()]).reshape(w.shape)
        assert torch.equal(deq, definition)
        if not torch.equal(theirs, definition):
            pytest.xfail(f"bitsandbytes' CPU dequantize_4bit disagrees with its own codes x absmax at blocksize "
                         f"{blocksize} on this CPU (seen with 0.50.2 on AVX-512, blocksizes 128 and 256; cf. "
                         "bitsandbytes#1828 for 2048 / 4096): a peer bug, not ours")
        assert False, "differs from bitsandbytes' dequantize, which follows the definition"


def test_bad_arguments():
    with pytest.raises(ValueError, match="blocksize"):
        quantize_4bit(torch.zeros(64), 48)
    with pytest.raises(ValueError, match="quant_type"):
        quantize_4bit(torch.zeros(64), 64, "nf5")
