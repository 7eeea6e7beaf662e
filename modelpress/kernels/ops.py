"""Typed wrappers of the C kernels: each checks its tensors (device, dtype, contiguity, shape),
allocates its outputs, and passes raw pointers; nothing outside kernels/ touches a pointer.
`lib` is the build to call (kernels.lib(), or one of its variants in the tests)."""
from __future__ import annotations

import ctypes

import torch

F32, BF16, F16, U8, I8, I64 = torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int8, torch.int64
# what a layer's weights are, for every kernel that takes a `kind`: mp_kernels.h's enum, mirrored
KIND = {"F32": 0, "AFFINE": 1, "Q4_0": 2, "Q8_0": 3, "Q5_0": 4, "Q4_K": 5, "Q6_K": 6, "Q8_0x16": 7, "CODE4": 8, "AFFINE4": 9,
        "AFFINE4_Q8": 10, "AFFINE_Q8": 11, "SPARSE24": 12,
        "SPARSE24_BF16": 13, "SPARSE24_F16": 14}
# a packed 2:4 layer's value dtype -> its kind (the kernels' value type: the kind minus SPARSE24)
SPARSE24_KIND = {F32: KIND["SPARSE24"], BF16: KIND["SPARSE24_BF16"], F16: KIND["SPARSE24_F16"]}
_I, _P = ctypes.c_int64, ctypes.c_void_p


def _p(t: torch.Tensor | None, dtype: torch.dtype | tuple[torch.dtype, ...], name: str) -> int | None:
    """t's address, after checking that a kernel may read it as `dtype`."""
    if t is None:
        return None
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.device.type != "cpu" or t.dtype not in dtypes or not t.is_contiguous():
        raise ValueError(f"{name}: a contiguous CPU tensor of {' or '.join(map(str, dtypes))} is needed, "
                         f"got {t.dtype} on {t.device}{'' if t.is_contiguous() else ', not contiguous'}")
    return t.data_ptr()


def _rows(x: torch.Tensor, k: int, name: str = "x") -> int:
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"{name}: (rows, {k}) expected, got {tuple(x.shape)}")
    return x.shape[0]


def aligned(t: torch.Tensor, nbytes: int) -> bool:
    """Whether t's data starts on an nbytes boundary (torch's AVX-512 int8 kernel loads aligned)."""
    return t.data_ptr() % nbytes == 0


def f32_gemv(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (m, k) @ w (n, k)^T, fp32."""
    n, k = w.shape
    m = _rows(x, k)
    y = torch.empty(m, n)
    lib.mp_f32_gemv(_p(x, F32, "x"), m, k, _p(w, F32, "w"), n, _p(y, F32, "y"))
    return y


def sparse24_gemv(lib: ctypes.CDLL, x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """x (m, k) @ W^T, W (n, k) 2:4-sparse as core/sparsity.pack_24 stores it (values (n, k / 2) fp32, bf16
    or fp16, meta (n, k / 8) uint8)."""
    n, k = values.shape[0], values.shape[1] * 2
    if k % 8 or meta.shape != (n, k // 8):
        raise ValueError(f"meta: expected ({n}, {k // 8}) for values {tuple(values.shape)}, got {tuple(meta.shape)}")
    m = _rows(x, k)
    y = torch.empty(m, n)
    vt = SPARSE24_KIND.get(values.dtype, KIND["SPARSE24"]) - KIND["SPARSE24"]
    lib.mp_sparse24_gemv(_p(x, F32, "x"), m, k, _p(values, (F32, BF16, F16), "values"), _p(meta, U8, "meta"), n,
                         _p(y, F32, "y"), vt)
    return y


def code4_gemv(lib: ctypes.CDLL, x: torch.Tensor, q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
               n: int, blocksize: int) -> torch.Tensor:
    """x (m, k) times 4-bit codes (two per byte) through a 16-entry code book, absmax per block."""
    m = x.shape[0]
    k = x.shape[1]
    y = torch.empty(m, n)
    lib.mp_code4_gemv(_p(x, F32, "x"), m, k, _p(q, U8, "q"), _p(absmax, F32, "absmax"), _p(code, F32, "code"), n,
                      blocksize, _p(y, F32, "y"))
    return y


def code4_dequant(lib: ctypes.CDLL, q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                  shape: tuple[int, int], blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight of 4-bit codes (two per byte, first high) through a code book, absmax per
    block, as fp32 or bf16 (rounded as torch rounds the fp32 values)."""
    w = torch.empty(shape, dtype=dtype)
    lib.mp_code4_dequant(_p(q, U8, "q"), _p(absmax, F32, "absmax"), _p(code, F32, "code"), w.numel(), blocksize,
                         _p(w, dtype, "w"), int(dtype == torch.bfloat16))
    return w


W8A8_MODES = {"static": 0, "token": 1, "tensor": 2}  # gemm_int8.c's activation scale modes


def w8a8_pack(lib: ctypes.CDLL, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed int8 (ceil(n/16), ceil(k/4), 16, 4), colsum int32) of int8 weights w (n, k)."""
    n, k = w.shape
    packed = torch.empty((n + 15) // 16 * ((k + 3) // 4) * 64, dtype=I8)
    colsum = torch.empty((n + 15) // 16 * 16, dtype=torch.int32)
    lib.mp_w8a8_pack(_p(w, I8, "w"), n, k, _p(packed, I8, "packed"), _p(colsum, torch.int32, "colsum"))
    return packed, colsum


def w8a8_linear(lib: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor, colsum: torch.Tensor, ws: torch.Tensor,
                bias: torch.Tensor | None, n: int, mode: str, xs: torch.Tensor | None = None,
                with_sums: bool = False, variant: int = 0, threads: int = 0
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x (m, k) fp32 through int8 weights (packed by w8a8_pack) with int8 activations: `mode`
    'static' (scale xs), 'token' or 'tensor' (dynamic); with_sums: also the int32 sums (m, n).
    variant: tile shape (its index in w8a8_tiles(lib)) + W8A8_ROWS_OUTER for row tiles outermost;
    threads: OpenMP threads, 0 for all. Every variant gives the same numbers."""
    m, k = x.shape
    y = torch.empty(m, n)
    acc = torch.empty(m, n, dtype=torch.int32) if with_sums else None
    lib.mp_w8a8_linear(_p(x, F32, "x"), m, k, _p(packed, I8, "packed"), _p(colsum, torch.int32, "colsum"),
                       _p(ws, F32, "weight_scale"), _p(bias, F32, "bias"), n, W8A8_MODES[mode],
                       _p(xs, F32, "input_scale"), _p(y, F32, "y"), _p(acc, torch.int32, "sums"), variant, threads)
    return (y, acc) if with_sums else y


W8A8_ROWS_OUTER = 16  # gemm_int8.c: variant = tile + W8A8_ROWS_OUTER * (row tiles outermost)


def w8a8_tiles(lib: ctypes.CDLL) -> list[str]:
    """The tile shapes (rows x 16-column blocks, "8x2") a build has, in variant order."""
    return lib.mp_w8a8_tiles().decode().split(",")


def int8_linear(lib: ctypes.CDLL, x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None,
                threshold: float) -> torch.Tensor:
    """LLM.int8(): x (m, k) against int8 rows cb (n, k) with row scales scb, outlier columns in fp32."""
    n, k = cb.shape
    m = _rows(x, k)
    y = torch.empty(m, n)
    lib.mp_int8_linear(_p(x, F32, "x"), m, k, _p(cb, I8, "weight"), _p(scb, F32, "SCB"), _p(bias, F32, "bias"), n,
                       threshold, _p(y, F32, "y"))
    return y


def affine_gemv(lib: ctypes.CDLL, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                group: int) -> torch.Tensor:
    """x (m, k) times uint8 codes q (n, k) with a scale and an offset per group of `group`."""
    n, k = q.shape
    m = _rows(x, k)
    y = torch.empty(m, n)
    lib.mp_affine_gemv(_p(x, F32, "x"), m, k, _p(q, U8, "q"), _p(scale, F32, "scale"), _p(offset, F32, "offset"),
                       n, group, _p(y, F32, "y"))
    return y


def affine_dequant(lib: ctypes.CDLL, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                   group: int) -> torch.Tensor:
    """The fp32 weight (n, k) of uint8 codes q with a scale and an offset per group."""
    n, k = q.shape
    w = torch.empty(n, k)
    lib.mp_affine_dequant(_p(q, U8, "q"), _p(scale, F32, "scale"), _p(offset, F32, "offset"), n, k, group,
                          _p(w, F32, "w"))
    return w


def block_gemv(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, kind: int, n: int, k: int) -> torch.Tensor:
    """x (m, k) times GGUF blocks w (n rows of whole blocks, as stored), int8 activations."""
    m = _rows(x, k)
    y = torch.empty(m, n)
    lib.mp_block_gemv(_p(x, F32, "x"), m, k, _p(w, U8, "blocks"), kind, n, _p(y, F32, "y"))
    return y


def pack_q8_0x16(lib: ctypes.CDLL, w: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Q8_0 blocks (n rows) repacked 16 rows at a time (KIND["Q8_0x16"]), as many bytes."""
    out = torch.empty_like(w)
    lib.mp_pack_q8_0x16(_p(w, U8, "blocks"), n, k, _p(out, U8, "out"))
    return out


def make_qx_quants(lib: ctypes.CDLL, x: torch.Tensor, qw: torch.Tensor | None, nmax: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants over each row of x (B, n): (scale (B,), codes (B, n) uint8)."""
    B, n = x.shape
    scale, codes = torch.empty(B), torch.empty(B, n, dtype=U8)
    lib.mp_make_qx_quants(_p(x, F32, "x"), _p(qw, F32, "weights"), B, n, nmax, _p(scale, F32, "scale"),
                          _p(codes, U8, "codes"))
    return scale, codes


def make_qkx2_quants(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                     nstep: int, use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's make_qkx2_quants over each row of x (B, n): (scale, min, codes uint8)."""
    B, n = x.shape
    scale, the_min, codes = torch.empty(B), torch.empty(B), torch.empty(B, n, dtype=U8)
    lib.mp_make_qkx2_quants(_p(x, F32, "x"), _p(w, F32, "weights"), B, n, nmax, ctypes.c_float(rmin),
                            ctypes.c_float(rdelta), nstep, int(use_mad), _p(scale, F32, "scale"),
                            _p(the_min, F32, "min"), _p(codes, U8, "codes"))
    return scale, the_min, codes


def quantize_legacy(lib: ctypes.CDLL, x: torch.Tensor, kind: int, block_bytes: int) -> torch.Tensor:
    """Q4_0 / Q5_0 / Q8_0 blocks of x (a multiple of 32 values), ggml's reference quantizers."""
    nblocks = x.numel() // 32
    out = torch.empty(nblocks * block_bytes, dtype=U8)
    lib.mp_quantize_legacy(_p(x, F32, "x"), nblocks, kind, _p(out, U8, "out"))
    return out


def paged_attention(lib: ctypes.CDLL, q: torch.Tensor, n_kv: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    index: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """One query row per sequence, q (B, heads, head_dim), against its keys and values at the cache
    slots index[b, :lens[b]] (caches (slots, n_kv, head_dim) fp32)."""
    B, heads, hd = q.shape
    out = torch.empty_like(q)
    lib.mp_paged_attention(_p(q, F32, "q"), B, heads, n_kv, hd, _p(k_cache, F32, "k_cache"),
                           _p(v_cache, F32, "v_cache"), _p(index, I64, "index"), _p(lens, I64, "lens"),
                           index.shape[1], _p(out, F32, "out"))
    return out


# -- the fused decoder's structures (blocks.c's mp_linear and mp_layer) -----------------------------
class Linear(ctypes.Structure):
    _fields_ = [("kind", _I), ("n", _I), ("k", _I), ("g", _I), ("w", _P), ("scale", _P), ("offset", _P),
                ("zero", ctypes.c_float), ("bias", _P), ("perm", _P), ("idx", _P)]


class Layer(ctypes.Structure):
    _fields_ = [("attn_norm", _P), ("ffn_norm", _P)] + [(n, Linear) for n in
                ("q", "k", "v", "o", "gate", "up", "down")] + [("k_cache", _P), ("v_cache", _P), ("q_norm", _P),
                                                             ("k_norm", _P), ("post_attn_norm", _P),
                                                             ("post_ffw_norm", _P), ("act", _I), ("window", _I),
                                                             ("rope", _I), ("attn_scale", ctypes.c_float),
                                                             ("softcap", ctypes.c_float)]


def linear(kind: int, n: int, k: int, group: int, w: torch.Tensor, scale: torch.Tensor | None = None,
           offset: torch.Tensor | None = None, zero: float = 0.0, bias: torch.Tensor | None = None,
           perm: torch.Tensor | None = None, idx: torch.Tensor | None = None) -> Linear:
    """An mp_linear over tensors the caller keeps alive: fp32 rows (kinds F32), uint8 codes with scales
    (AFFINE; offset None: symmetric, offset = zero * scale) or GGUF blocks as bytes; a bias (n,) fp32
    added to its outputs, or None; perm (k,) int64 (F32 / AFFINE): stored column j multiplies x[perm[j]];
    SPARSE24 (_BF16, _F16): w the kept values (n, k / 2) fp32 (bf16, fp16), idx their positions (n, k / 8) uint8."""
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias: expected ({n},), got {tuple(bias.shape)}")
    if perm is not None and (perm.shape != (k,) or kind not in (KIND["F32"], KIND["AFFINE"], KIND["AFFINE4"],
                                                                  KIND["AFFINE4_Q8"], KIND["AFFINE_Q8"])):
        raise ValueError(f"perm: ({k},) for F32 / AFFINE(4) layers, got {tuple(perm.shape)} for kind {kind}")
    return Linear(kind, n, k, group, _p(w, (F32, U8, BF16, F16), "w"), _p(scale, F32, "scale"), _p(offset, F32, "offset"), zero,
                  _p(bias, F32, "bias"), _p(perm, I64, "perm"), _p(idx, U8, "idx"))


def linear_apply(lib: ctypes.CDLL, lin: Linear, x: torch.Tensor) -> torch.Tensor:
    """(B, n) = the mp_linear `lin` applied to x (B, k) fp32 as the fused decode applies it."""
    y = torch.empty(_rows(x, lin.k), lin.n)
    lib.mp_linear_apply(ctypes.byref(lin), _p(x, F32, "x"), x.shape[0], _p(y, F32, "y"))
    return y


def layer(attn_norm: torch.Tensor, ffn_norm: torch.Tensor, linears: list[Linear], q_norm: torch.Tensor | None = None,
          k_norm: torch.Tensor | None = None, post_attn_norm: torch.Tensor | None = None,
          post_ffw_norm: torch.Tensor | None = None, gelu: bool = False, window: int = 0, rope: int = 0,
          attn_scale: float = 0.0, softcap: float = 0.0) -> Layer:
    """A block's weights and its kind (blocks.c's mp_layer): q_norm / k_norm (head_dim,), the per-head
    RMSNorm of queries and keys (qwen3, gemma3); gemma's post-attention and post-feedforward norms,
    GELU (tanh) for SiLU, the score scale (0: 1 / sqrt(head_dim)), soft-cap (0: none), sliding
    window (0: none) and rotary table."""
    return Layer(_p(attn_norm, F32, "attn_norm"), _p(ffn_norm, F32, "ffn_norm"), *linears, None, None,
                 _p(q_norm, F32, "q_norm"), _p(k_norm, F32, "k_norm"), _p(post_attn_norm, F32, "post_attn_norm"),
                 _p(post_ffw_norm, F32, "post_ffw_norm"), int(gelu), window, rope, attn_scale, softcap)


def bind_caches(layer_: Layer, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    half = (torch.float32, torch.float16)
    layer_.k_cache, layer_.v_cache = _p(k_cache, half, "k_cache"), _p(v_cache, half, "v_cache")


def llama_decode(lib: ctypes.CDLL, layers: ctypes.Array, x: torch.Tensor, d_ff: int, n_heads: int, n_kv: int,
                 head_dim: int, eps: float, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                 lens: torch.Tensor, kv_f16: bool) -> None:
    """Every block of the model for B tokens (x (B, d), in place): decode.c's mp_llama_decode; cos / sin
    (tables, B, head_dim)."""
    B, d = x.shape
    if cos.dim() != 3 or cos.shape[1:] != (B, head_dim) or sin.shape != cos.shape:
        raise ValueError(f"cos / sin: expected (tables, {B}, {head_dim}), got {tuple(cos.shape)} / {tuple(sin.shape)}")
    lib.mp_llama_decode(ctypes.addressof(layers), len(layers), _p(x, F32, "x"), B, d, d_ff, n_heads, n_kv, head_dim,
                        eps, _p(cos, F32, "cos"), _p(sin, F32, "sin"), _p(slots, I64, "slots"),
                        _p(lens, I64, "lens"), slots.shape[1], int(kv_f16))


def llama_logits(lib: ctypes.CDLL, head: Linear, norm: torch.Tensor, eps: float, x: torch.Tensor,
                 rows: torch.Tensor) -> torch.Tensor:
    """The final norm then the head, for the rows of x (B, d) listed in `rows`: (len(rows), vocab)."""
    logits = torch.empty(rows.numel(), head.n)
    lib.mp_llama_logits(ctypes.byref(head), _p(norm, F32, "norm"), eps, _p(x, F32, "x"), x.shape[1],
                        _p(rows, I64, "rows"), rows.numel(), _p(logits, F32, "logits"))
    return logits
