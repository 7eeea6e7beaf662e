"""bitsandbytes' 8-bit dynamic map and blockwise 8-bit quantization, and the double quantization
of 4-bit absmax constants built on them (QLoRA, arXiv:2305.14314, section 3).

Dynamic map (Dettmers 2015, arXiv:1511.04561): 256 sorted fp32 values in [-1, 1]; for exponents
10^-6 .. 10^0 the midpoints of a linear grid on [0.1, 1] with 2^i + 1 points, each with both
signs, then 0 and 1.0. The first entry is -0.99297 (not -1).

Blockwise 8-bit, as bitsandbytes 0.50's CPU library quantizes: per block of `blocksize` values,
absmax = max |x|; a value maps to a 65536-entry table over [-1, 1] indexed by
    i = trunc((clamp(x * (1 / absmax), -1, 1) + 1) * 0.5 * 65535 + 0.5)
whose entry is the first code index whose upper midpoint is not below -1 + 2i / 65535. The table
makes a few values that lie within ~1e-5 of a midpoint take the farther entry; we follow it, as
bit-exact files are the point. Dequantization: code[q] * absmax.

Double quantization of 4-bit absmax (n_blocks,):
    offset = mean(absmax); (qabsmax uint8, absmax2 fp32) = blockwise8(absmax - offset, 256)
    absmax = code[qabsmax] * absmax2[block] + offset
"""
from __future__ import annotations

import torch

LUT_SIZE = 65536
NESTED_BLOCKSIZE = 256
_cache: dict[str, torch.Tensor] = {}


def dynamic_map(max_exponent_bits: int = 7) -> torch.Tensor:
    """The signed 8-bit dynamic map, fp32 (256,), sorted."""
    key = f"map{max_exponent_bits}"
    if key not in _cache:
        _cache[key] = _build_dynamic_map(max_exponent_bits)
    return _cache[key].clone()


def _build_dynamic_map(max_exponent_bits: int) -> torch.Tensor:
    values: list[float] = []
    for i in range(max_exponent_bits):
        grid = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        mids = (grid[:-1] + grid[1:]) / 2.0
        scale = 10 ** (i - max_exponent_bits + 1)  # 1e-6 .. 1, applied in fp32 as bitsandbytes does
        values += (scale * mids).tolist() + (-scale * mids).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def _lut(code: torch.Tensor) -> torch.Tensor:
    key = code.numpy().tobytes().hex()
    if key not in _cache:
        mids = 0.5 * (code[:-1] + code[1:])
        points = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32)) / float(LUT_SIZE - 1)
        _cache[key] = torch.searchsorted(mids, points, side="left").clamp(max=255).to(torch.uint8)
    return _cache[key]


def quantize_blockwise8(x: torch.Tensor, code: torch.Tensor | None = None,
                        blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes of x's shape, fp32 absmax (ceil(n / blocksize),)); code defaults to dynamic_map()."""
    code = dynamic_map() if code is None else code.float().contiguous()
    flat = x.reshape(-1).float()
    n = flat.numel()
    pad = -n % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, blocksize)
    absmax = blocks.abs().amax(-1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    scaled = (blocks * inv[:, None]).clamp(-1.0, 1.0)
    idx = (((scaled + 1.0) * 0.5) * float(LUT_SIZE - 1) + 0.5).to(torch.int64)
    q = _lut(code)[idx]
    q[absmax == 0] = 0  # an all-zero block has no scale; bitsandbytes writes code 0 for it
    return q.reshape(-1)[:n].reshape(x.shape), absmax


def dequantize_blockwise8(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor | None = None,
                          blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    code = dynamic_map() if code is None else code.float()
    flat = q.reshape(-1).long()
    return (code[flat] * absmax.repeat_interleave(blocksize)[: flat.numel()]).reshape(q.shape)


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qabsmax uint8, absmax2 fp32, offset fp32 0-d) for fp32 4-bit absmax constants."""
    offset = absmax.mean()
    qabsmax, absmax2 = quantize_blockwise8(absmax - offset)
    return qabsmax, absmax2, offset


def double_dequantize(qabsmax: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor | float,
                      code: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 absmax constants back from their double quantization."""
    return dequantize_blockwise8(qabsmax, absmax2, code) + offset
