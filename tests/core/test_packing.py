import pytest
import torch

from modelpress.core.packing import pack_bits, packed_len, unpack_bits


def _reference_pack(codes: list[int], bits: int) -> list[int]:
    """Bit by bit, from the definition: code i at bits [i*bits, (i+1)*bits) of a little-endian stream."""
    n = -(-len(codes) // 8) * 8
    stream = [0] * (n * bits)
    for i, c in enumerate(codes):
        for b in range(bits):
            stream[i * bits + b] = (c >> b) & 1
    return [sum(stream[8 * k + j] << j for j in range(8)) for k in range(len(stream) // 8)]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 70, 576])
def test_round_trip_and_reference(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2 ** bits, (3, n), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    if bits < 8:
        assert packed.shape == (3, packed_len(n, bits))
        assert packed[0].tolist() == _reference_pack(codes[0].tolist(), bits)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_golden_bytes():
    # 4 bits: low nibble first
    assert pack_bits(torch.tensor([[1, 2, 3]], dtype=torch.uint8), 4)[0, :2].tolist() == [0x21, 0x03]
    # 2 bits: four per byte, first code lowest
    assert pack_bits(torch.tensor([[3, 0, 1, 2]], dtype=torch.uint8), 2)[0, 0].item() == 0b10_01_00_11
    # 3 bits: codes 0..7 -> 0b111_110_101_100_011_010_001_000 = 0xFAC688, little-endian
    assert pack_bits(torch.arange(8, dtype=torch.uint8)[None], 3)[0].tolist() == [0x88, 0xC6, 0xFA]


def test_bad_bits():
    with pytest.raises(ValueError):
        pack_bits(torch.zeros(1, 8, dtype=torch.uint8), 9)
