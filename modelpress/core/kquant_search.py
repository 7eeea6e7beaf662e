"""llama.cpp's scale searches for the GGUF block formats (ggml/src/ggml-quants.c: `make_qx_quants`,
`make_qp_quants`, `make_q3_quants`, `make_qkx2_quants`), vectorized over blocks, each with its loops
in the C code's order and its fp32 arithmetic grouped as C groups it, so that they take the same
branches and return the same bits (core/kquants.py packs their results into blocks). Compiled
versions that return the same values (kernels/searches.py installs them in COMPILED: core/ imports
nothing of the layers above it) run where available; `torch_reference()` forces the torch ones."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator

import numpy as np
import torch

F32 = torch.float32
_EPS = np.float32(1e-15)  # GROUP_MAX_EPS


def _f(v: float) -> float:
    """A constant rounded to fp32, as a Python float (a tensor op then computes in fp32; a numpy
    scalar would not stay in torch)."""
    return float(np.float32(v))


def _div(a: float | torch.Tensor, b: float | torch.Tensor) -> torch.Tensor:
    """a / b in fp32, correctly rounded, one of them a constant (torch computes `scalar / tensor`
    as scalar * (1 / tensor), which differs from C's division in the last bit)."""
    t = b if isinstance(b, torch.Tensor) else a
    a = a if isinstance(a, torch.Tensor) else torch.full_like(t, _f(a))
    b = b if isinstance(b, torch.Tensor) else torch.full_like(t, _f(b))
    return a / b


def _sqrt(t: torch.Tensor) -> torch.Tensor:
    """sqrtf, correctly rounded: torch's vectorized fp32 sqrt is not always (it differs from C's
    sqrtf in the last bit for some inputs); a double square root rounded to fp32 is exact."""
    return torch.sqrt(t.double()).to(F32)


def _f3(a: float, b: float, c: float) -> float:
    """fp32 a + b * c, as C computes `a + b*c` in float."""
    return float(np.float32(a) + np.float32(b) * np.float32(c))


# ---------------------------------------------------------------- llama.cpp's searches, vectorized


def _round(t: torch.Tensor) -> torch.Tensor:
    return torch.round(t)  # nearest_int: round half to even


def _first_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, the signed value there) per row, the first of equal maxima; (0, 0) for a zero row."""
    ax = x.abs()
    i = ax.argmax(1, keepdim=True)
    amax = ax.gather(1, i)[:, 0]
    return amax, torch.where(amax > 0, x.gather(1, i)[:, 0], torch.zeros_like(amax))


def _pos_max(t: torch.Tensor) -> torch.Tensor:
    """max(0, rows' maxima) with +0.0 where none is positive (the reference starts from 0 and
    takes only larger values, so -0.0 never wins)."""
    m = t.amax(1)
    return torch.where(m > 0, m, torch.zeros_like(m))


# The searches below take x (B, n) and return codes (B, n), but work on transposed copies (n, B):
# the element loops then read contiguous rows, which is several times faster than columns.


def _cols(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous()


def make_qx_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants with rmse_type 1: (scale (B,), L (B, n) in [0, 2 nmax)); weights qw, or x^2.
    Runs the compiled search (kernels/searches.py, the same operations) where one is installed."""
    fast = _compiled("make_qx_quants")
    out = fast(x, nmax, qw) if fast is not None else None
    return out if out is not None else make_qx_quants_reference(x, nmax, qw)


# Compiled versions of the searches below, which return the same values (or None for input they do
# not take). kernels/searches.py installs them: core/ imports nothing of the layers above it.
COMPILED: dict[str, Callable[..., Any]] = {}
_USE_COMPILED: contextvars.ContextVar[bool] = contextvars.ContextVar("modelpress_kquants_compiled", default=True)


def _compiled(name: str) -> Callable[..., Any] | None:
    return COMPILED.get(name) if _USE_COMPILED.get() else None


@contextlib.contextmanager
def torch_reference() -> Iterator[None]:
    """Inside this block (this thread), the quantization searches run their torch reference instead
    of the compiled kernels (the tests compare the two)."""
    token = _USE_COMPILED.set(False)
    try:
        yield
    finally:
        _USE_COMPILED.reset(token)


def make_qx_quants_reference(x: torch.Tensor, nmax: int, qw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch implementation of make_qx_quants (vectorized over blocks)."""
    amax, mx = _first_absmax(x)
    zero = amax < _EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    X = _cols(x)
    W = _cols(qw) if qw is not None else X * X

    def sums(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lv = _round(iscale[None, :] * X).clamp(-nmax, nmax - 1)
        slx = torch.zeros_like(amax)
        sl2 = torch.zeros_like(amax)
        for i in range(X.shape[0]):
            slx = slx + W[i] * X[i] * lv[i]
            sl2 = sl2 + W[i] * lv[i] * lv[i]
        return lv, slx, sl2

    L, sumlx, suml2 = sums(_div(-nmax, mx))
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        lv, slx, sl2 = sums(_div(-_f3(nmax, 0.1, step), mx))
        better = (sl2 > 0) & (slx * slx > best * sl2)
        L = torch.where(better[None, :], lv, L)
        scale = torch.where(better, slx / sl2, scale)
        best = torch.where(better, scale * slx, best)
    L = torch.where(zero[None, :], torch.full_like(L, -nmax), L) + nmax
    return torch.where(zero, torch.zeros_like(scale), scale), L.t()


def _descend(X: torch.Tensor, W: torch.Tensor, L: torch.Tensor, sumlx: torch.Tensor, suml2: torch.Tensor,
             active: torch.Tensor, lo: int | None, hi: int, qp: bool) -> tuple:
    """Up to 5 rounds of coordinate descent on each code (X, W, L transposed: (n, B)), keeping a
    change when it raises sumlx^2 / suml2 (make_q3_quants; make_qp_quants with qp=True: codes
    only capped at hi, the move tried only where suml2 without the code is positive)."""
    for _ in range(5):
        changed = torch.zeros_like(active)
        for i in range(X.shape[0]):
            wi, xi, li = W[i], X[i], L[i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0) if qp else slx > 0
            new = _round(xi * sl2 / torch.where(ok, slx, torch.ones_like(slx))).clamp(lo, hi)
            slx2 = slx + wi * xi * new
            sl22 = sl2 + wi * new * new
            take = active & ok & (new != li) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            if not qp:
                take &= sl22 > 0
            L[i] = torch.where(take, new, li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
            changed |= take
        active = active & changed
        if not active.any():
            break
    return L, sumlx, suml2


def _ratio(sumlx: torch.Tensor, suml2: torch.Tensor) -> torch.Tensor:
    """suml2 > 0 ? sumlx / suml2 : 0"""
    pos = suml2 > 0
    return torch.where(pos, sumlx / torch.where(pos, suml2, torch.ones_like(suml2)), torch.zeros_like(suml2))


def make_qp_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qp_quants: (scale, L in [.., nmax]) for non-negative x (the sub-block scales or mins
    of the K types with an importance matrix), weights qw."""
    mx = x.amax(1)
    zero = ~(mx >= _EPS)
    mx = torch.where(zero, torch.ones_like(mx), mx)
    X, W = _cols(x), _cols(qw)

    def mse(iscale: torch.Tensor, cap: bool) -> torch.Tensor:
        lv = _round(iscale[None, :] * X)
        lv = lv.clamp(max=nmax) if cap else lv
        scale = _div(1, iscale)
        err = torch.zeros_like(mx)
        for i in range(X.shape[0]):
            diff = X[i] - scale * lv[i]
            err = err + W[i] * diff * diff
        return err

    iscale = _div(nmax, mx)
    best = mse(iscale, cap=False)
    for step in range(-4, 5):
        if step:
            cand = _div(_f3(nmax, 0.1, step), mx)
            err = mse(cand, cap=True)
            better = err < best
            best, iscale = torch.where(better, err, best), torch.where(better, cand, iscale)
    L = _round(iscale[None, :] * X).clamp(max=nmax)
    sumlx = torch.zeros_like(mx)
    suml2 = torch.zeros_like(mx)
    for i in range(X.shape[0]):
        sumlx = sumlx + W[i] * X[i] * L[i]
        suml2 = suml2 + W[i] * L[i] * L[i]
    L, sumlx, suml2 = _descend(X, W, L, sumlx, suml2, ~zero, None, nmax, qp=True)
    return torch.where(zero, torch.zeros_like(mx), _ratio(sumlx, suml2)), torch.where(zero[None, :], torch.zeros_like(L), L).t()


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants with do_rmse: (scale, L in [0, 2 nmax)); the 5 tries of coordinate descent."""
    amax, mx = _first_absmax(x)
    zero = amax < _EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    X = _cols(x)
    W = X * X
    L = _round(_div(-nmax, mx)[None, :] * X).clamp(-nmax, nmax - 1)
    sumlx = torch.zeros_like(amax)
    suml2 = torch.zeros_like(amax)
    for i in range(X.shape[0]):
        sumlx = sumlx + W[i] * X[i] * L[i]
        suml2 = suml2 + W[i] * L[i] * L[i]
    L, sumlx, suml2 = _descend(X, W, L, sumlx, suml2, ~zero, -nmax, nmax - 1, qp=False)
    L = torch.where(zero[None, :], torch.full_like(L, -nmax), L) + nmax
    return torch.where(zero, torch.zeros_like(amax), _ratio(sumlx, suml2)), L.t()


def make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2_quants (and make_qkx3_quants, the same search): (scale, the_min = -min (>= 0),
    L in [0, nmax]) per row of x with weights w. Runs the compiled search where it is available."""
    fast = _compiled("make_qkx2_quants")
    out = fast(x, w, nmax, _f(rmin), _f(rdelta), nstep, use_mad) if fast is not None else None
    if out is not None:
        return out
    return make_qkx2_quants_reference(x, w, nmax, rmin, rdelta, nstep, use_mad)


def make_qkx2_quants_reference(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                               use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch implementation of make_qkx2_quants (vectorized over blocks)."""
    X, W = _cols(x), _cols(w)
    n = X.shape[0]
    lo, hi = X[0].clone(), X[0].clone()
    sum_w = W[0].clone()
    sum_x = sum_w * X[0]
    for i in range(1, n):
        lo = torch.where(X[i] < lo, X[i], lo)
        hi = torch.where(X[i] > hi, X[i], hi)
        sum_w = sum_w + W[i]
        sum_x = sum_x + W[i] * X[i]
    lo = torch.where(lo > 0, torch.zeros_like(lo), lo)
    flat = hi == lo

    def error(scale: torch.Tensor, mn: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
        err = torch.zeros_like(scale)
        for i in range(n):
            diff = scale * lv[i] + mn - X[i]
            err = err + W[i] * (diff.abs() if use_mad else diff * diff)
        return err

    iscale = _div(nmax, torch.where(flat, torch.ones_like(hi), hi - lo))
    scale = _div(1, iscale)
    L = _round(iscale[None, :] * (X - lo[None, :])).clamp(0, nmax)
    best = error(scale, lo, L)
    mn = lo
    for step in range(nstep + 1):  # the reference reads `min` as the search last left it
        span = torch.where(flat, torch.ones_like(hi), hi - mn)
        iscale = _div(float(np.float32(_f3(rmin, rdelta, step)) + np.float32(nmax)), span)
        la = _round(iscale[None, :] * (X - mn[None, :])).clamp(0, nmax)
        sum_l = torch.zeros_like(scale)
        sum_l2 = torch.zeros_like(scale)
        sum_xl = torch.zeros_like(scale)
        for i in range(n):
            wl = W[i] * la[i]
            sum_l = sum_l + wl
            sum_l2 = sum_l2 + wl * la[i]
            sum_xl = sum_xl + wl * X[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = torch.where(ok, D, torch.ones_like(D))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        neg = this_min > 0
        this_scale = torch.where(neg, sum_xl / torch.where(neg, sum_l2, torch.ones_like(sum_l2)), this_scale)
        this_min = torch.where(neg, torch.zeros_like(this_min), this_min)
        cur = error(this_scale, this_min, la)
        better = ok & ~flat & (cur < best)
        L = torch.where(better[None, :], la, L)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    L = torch.where(flat[None, :], torch.zeros_like(L), L)
    return torch.where(flat, torch.zeros_like(scale), scale), -mn, L.t()
