"""llama.cpp's own quantizers, called through the ggml library that llama-cpp-python ships
(`quantize_q4_K(src, dst, nrow, n_per_row, imatrix)` and its siblings in ggml-quants.c): the
reference the GGUF block formats are compared against. `quantize_ref` is None where
llama-cpp-python is absent (`MISSING` says why)."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch

from modelpress.core.kquants import BLOCK

MISSING = ""
_lib = None
try:
    import llama_cpp

    _lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
except (ImportError, OSError) as e:  # pragma: no cover - depends on the machine
    MISSING = f"llama-cpp-python's ggml library is not available ({e}); pip install llama-cpp-python==0.3.36"


def quantize_ref(w: torch.Tensor, kind: str, imatrix: torch.Tensor | None = None) -> np.ndarray:
    """llama.cpp's bytes for w (rows, cols) as `kind`, with an importance vector (cols,) or none."""
    assert _lib is not None, MISSING
    fn = getattr(_lib, "quantize_" + kind.lower().replace("_k", "_K"))  # quantize_q4_0, quantize_q4_K
    fn.restype = ctypes.c_size_t
    rows, cols = w.shape
    n, nbytes = BLOCK[kind]
    out = np.zeros((rows, cols // n * nbytes), np.uint8)
    src = np.ascontiguousarray(w.detach().numpy(), dtype=np.float32)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix.numpy(), dtype=np.float32)
    fn(src.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(rows),
       ctypes.c_int64(cols), None if qw is None else qw.ctypes.data_as(ctypes.c_void_p))
    return out
