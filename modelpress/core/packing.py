"""Bit packing, written down once.

`pack_bits` stores `bits`-wide unsigned codes as a little-endian bit stream along the last
dimension: code i occupies bits [i*bits, (i+1)*bits) of the row's stream, byte 0 holding the
lowest bits. Eight codes always fill exactly `bits` bytes, so the row is zero-padded to a multiple
of eight codes first. For 4 bits this is two codes per byte, low nibble first; for 2 bits four per
byte; for 3 bits eight codes in three bytes.
    codes (..., n) uint8 -> packed (..., ceil(n / 8) * bits) uint8
"""
from __future__ import annotations

import math
import sys

import torch


def packed_len(n: int, bits: int) -> int:
    return math.ceil(n / 8) * bits


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    *lead, n = codes.shape
    pad = (-n) % 8
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, pad)).reshape(*lead, -1, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=codes.device) * bits
    word = (c << shifts).sum(-1, keepdim=True)  # (..., n/8, 1): 8*bits <= 64 bits
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=codes.device) * 8
    out = (word >> byte_shifts) & 0xFF
    return out.reshape(*lead, -1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    if bits == 8:
        return packed[..., :n].contiguous()
    *lead, m = packed.shape
    b = packed.to(torch.int64).reshape(*lead, m // bits, bits)
    dev = packed.device
    word = (b << (torch.arange(bits, dtype=torch.int64, device=dev) * 8)).sum(-1, keepdim=True)
    codes = (word >> (torch.arange(8, dtype=torch.int64, device=dev) * bits)) & ((1 << bits) - 1)
    return codes.reshape(*lead, -1)[..., :n].to(torch.uint8)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The same little-endian stream in int32 words: word k holds bits [32k, 32k + 32), i.e.
    `32 / bits` codes for 2, 4, 8 bits, the lowest code in the lowest bits (GPTQ's, AWQ's and
    compressed-tensors' convention; for 3 bits a code may straddle two words, as in AutoGPTQ).
    codes (..., n) with n * bits % 32 == 0 -> int32 (..., n * bits / 32)"""
    n = codes.shape[-1]
    if (n * bits) % 32:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole 32-bit words")
    if sys.byteorder != "little":
        raise RuntimeError("int32 packing assumes a little-endian machine")
    return pack_bits(codes, bits).contiguous().view(torch.int32)


def unpack_int32(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_int32: uint8 codes (..., n). The last word may be partly padding (as
    compressed-tensors writes rows whose bits do not fill whole words)."""
    if sys.byteorder != "little":
        raise RuntimeError("int32 packing assumes a little-endian machine")
    return unpack_bits(words.contiguous().view(torch.uint8)[..., :packed_len(n, bits)], bits, n)
