"""The compiled GGUF quantization searches (kernels/quantize.c), installed into core/kquants.py's
COMPILED table when kernels/ is imported: the same operations as its torch references, so the same
bytes, ~50x faster on a CPU. Each returns None for input it does not take (then core runs its torch
reference). kernels/__init__.py calls `install` with its loader and its table of kinds.
"""
from __future__ import annotations

import ctypes
from typing import Callable

import torch

from ..core import kquants
from . import ops

F32 = torch.float32
_LEGACY = ("Q4_0", "Q5_0", "Q8_0")  # mp_quantize_legacy's types


def make_qx_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    so = _lib()
    if so is None or x.device.type != "cpu" or x.shape[1] > 64:
        return None
    qw = None if qw is None else qw.to(F32).contiguous()
    scale, L = ops.make_qx_quants(so, x.to(F32).contiguous(), qw, nmax)
    return scale, L.to(F32)


def make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    so = _lib()
    if so is None or x.device.type != "cpu" or x.shape[1] > 64:
        return None
    scale, the_min, L = ops.make_qkx2_quants(so, x.to(F32).contiguous(), w.to(F32).contiguous(), nmax, rmin, rdelta,
                                             nstep, use_mad)
    return scale, the_min, L.to(F32)


def quantize_legacy(x: torch.Tensor, kind: str, nbytes: int) -> torch.Tensor | None:
    """Blocks of the contiguous fp32 x, flat; None for the other types."""
    so = _lib()
    if so is None or x.device.type != "cpu" or kind not in _LEGACY:
        return None
    return ops.quantize_legacy(so, x, _KIND[kind], nbytes)


_lib: Callable[[], ctypes.CDLL | None] = lambda: None
_KIND: dict[str, int] = {}


def install(lib: Callable[[], ctypes.CDLL | None], kinds: dict[str, int]) -> None:
    """Make core/kquants.py run these, loading the kernels with `lib()` (kernels.lib)."""
    global _lib, _KIND
    _lib, _KIND = lib, kinds
    kquants.COMPILED.update(make_qx_quants=make_qx_quants, make_qkx2_quants=make_qkx2_quants,
                            quantize_legacy=quantize_legacy)
