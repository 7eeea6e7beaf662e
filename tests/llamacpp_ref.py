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


class _Tensor(ctypes.Structure):  # struct ggml_tensor (ggml/include/ggml.h, GGML_MAX_DIMS 4, GGML_MAX_SRC 10)
    pass


_Tensor._fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                    ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                    ("flags", ctypes.c_int32), ("src", ctypes.POINTER(_Tensor) * 10),
                    ("view_src", ctypes.POINTER(_Tensor)), ("view_offs", ctypes.c_size_t),
                    ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p),
                    ("padding", ctypes.c_char * 8)]


_quiet = None


def imatrix_ref(gguf_path: str | Path, windows: torch.Tensor, n_threads: int = 2) -> dict[str, tuple[np.ndarray, int]]:
    """{weight name: (sum of x^2 per column, rows)} collected from llama.cpp's own forward passes
    over `windows` (n, ctx), one window per fresh context, the way llama-imatrix's
    collect_imatrix does (tools/imatrix/imatrix.cpp: every MUL_MAT of a "blk." weight on an F32
    input of at least 16 rows)."""
    assert _lib is not None, MISSING
    import llama_cpp as L

    _lib.ggml_op_name.restype = ctypes.c_char_p
    got: dict[str, list] = {}

    def collect(t_ptr, ask, _user):  # noqa: ANN001
        t = ctypes.cast(t_ptr, ctypes.POINTER(_Tensor)).contents
        if _lib.ggml_op_name(t.op) != b"MUL_MAT":
            return False
        w, x = t.src[0].contents, t.src[1].contents
        name = w.name.decode()
        if x.ne[1] < 16 or x.type != 0 or not name.startswith("blk."):
            return False
        if ask:
            return True
        rows = x.ne[1] * x.ne[2] * x.ne[3]
        assert x.nb[1] == x.ne[0] * 4 and x.nb[2] == x.nb[1] * x.ne[1], "expects a contiguous input"
        a = np.ctypeslib.as_array(ctypes.cast(x.data, ctypes.POINTER(ctypes.c_float)), shape=(rows, x.ne[0]))
        acc = got.setdefault(name, [np.zeros(x.ne[0], np.float64), 0])
        acc[0] += np.einsum("ti,ti->i", a, a).astype(np.float64)
        acc[1] += rows
        return True

    cb = L.ggml_backend_sched_eval_callback(collect)
    global _quiet
    _quiet = _quiet or L.llama_log_callback(lambda level, text, user: None)  # lives as long as the library
    L.llama_log_set(_quiet, None)
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(str(gguf_path).encode(), mp)
    n, ctx_len = windows.shape
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = ctx_len, ctx_len, ctx_len
    cp.n_threads = cp.n_threads_batch = n_threads
    cp.cb_eval, cp.cb_eval_user_data = cb, None
    try:
        batch = L.llama_batch_init(ctx_len, 0, 1)
        for row in windows.tolist():  # every position's logits, as llama-imatrix asks (its perplexity)
            ctx = L.llama_init_from_model(model, cp)
            batch.n_tokens = len(row)
            for i, tok in enumerate(row):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, i, 1, 1
                batch.seq_id[i][0] = 0
            assert L.llama_decode(ctx, batch) == 0
            L.llama_free(ctx)
        L.llama_batch_free(batch)
    finally:
        L.llama_model_free(model)
    return {k: (v[0], v[1]) for k, v in got.items()}
