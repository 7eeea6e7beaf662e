"""4-bit code-book formats of bitsandbytes: NF4 and FP4, blockwise absmax (QLoRA, arXiv:2305.14314).

The tensor is flattened and cut into blocks of `blocksize` consecutive values (a last partial
block keeps its own absmax). Each value is scaled into [-1, 1] by its block's absmax and
replaced by the index of the nearest code-book entry; two indices share a byte, the FIRST in the
HIGH nibble (bitsandbytes' order; modelpress' own bit packing in core/packing.py is low-first).
    packed: uint8 (ceil(n / 2),)    absmax: fp32 (ceil(n / blocksize),)
    value = code[index] * absmax[block]
Rounding follows bitsandbytes 0.50's CPU path exactly, since bit-exact files are the point:
the scaled value is x * (1 / absmax) for full blocks and x / absmax for the partial one, clamped
to [-1, 1], then bucketed against the midpoints of the sorted code book (a value exactly on a
midpoint takes the lower entry).
"""
from __future__ import annotations

import math

import torch

# NF4: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero (QLoRA, appendix E)
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)
# FP4 (e2m1-like, bitsandbytes' layout): sign bit 3, the magnitudes below, divided by 12
FP4_CODE = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                         -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0], dtype=torch.float32) / 12.0
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def _code(quant_type: str) -> torch.Tensor:
    if quant_type not in CODES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return CODES[quant_type]


def quantize_4bit(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8, absmax fp32) of `w` flattened; see the module docstring for the layout."""
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    code = _code(quant_type)
    order = torch.argsort(code)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    flat = w.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(-1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, (flat[full:] / tail_max).clamp(-1, 1)])
    if n % 2:  # an odd count: the last byte's low nibble encodes 0
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    idx = order[torch.bucketize(scaled, bounds)].to(torch.uint8)
    return (idx[0::2] << 4) | idx[1::2], absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...] | torch.Size,
                    blocksize: int = 64, quant_type: str = "nf4") -> torch.Tensor:
    """fp32 values of `shape` from (packed, absmax)."""
    code = _code(quant_type)
    n = math.prod(shape)
    idx = torch.stack([packed >> 4, packed & 0xF], -1).reshape(-1)[:n].long()
    scale = absmax.repeat_interleave(blocksize)[:n]
    return (code[idx] * scale).reshape(shape)
