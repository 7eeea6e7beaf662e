"""The layer-wise Hessian of GPTQ / SparseGPT: H = 2 X^T X / n over n calibration rows of a
linear layer's input X (n, in_features), kept as a running sum so memory does not grow with the
calibration set; damping and the Cholesky factor of H^-1 that the column sweep reads.
"""
from __future__ import annotations

import warnings

import torch

_TILE = 256  # column tiles of the upper-triangle product


class HessianAccumulator:
    """Running X^T X and row count; `hessian()` gives H = 2 X^T X / n (fp32, in x in).

    X^T X is symmetric: only its upper triangle is computed, one strip of `_TILE` rows at a time
    (tile i times tiles i..end), about 60 % of the full product's work at 1536 columns."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        """x: (..., in_features); every leading position counts as one row."""
        x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
        for i in range(0, x2.shape[1], _TILE):  # fp32 GEMM, fp64 running sum
            self.xtx[i:i + _TILE, i:] += (x2[:, i:i + _TILE].t() @ x2[:, i:]).to(torch.float64)
        self.rows += x2.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.rows == 0:
            raise ValueError("no calibration rows reached this layer")
        full = torch.triu(self.xtx) + torch.triu(self.xtx, 1).t()
        return (2.0 * full / self.rows).to(torch.float32)


def prepare(H: torch.Tensor, W: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(H with dead columns fixed and damped, W with dead columns zeroed), copies.

    A column no calibration input ever reached (zero diagonal) gets H[i, i] = 1 and a zero weight,
    as in the GPTQ reference; then damp * mean(diag H) is added to the diagonal."""
    dtype = torch.promote_types(H.dtype, torch.float32)  # fp32, or fp64 if given
    H = H.clone().to(dtype)
    W = W.clone().to(dtype)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    return H, W


def inverse_cholesky(H: torch.Tensor, damp: float, max_tries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U), the form GPTQ's sweep reads.

    If H is not positive definite, damping is raised (x10 of mean(diag H), up to `max_tries`
    times) with a warning saying by how much; H must already carry `damp` (see prepare)."""
    mean_diag = torch.mean(torch.diag(H)).item()
    extra = 0.0
    for attempt in range(max_tries + 1):
        try:
            Hd = H if extra == 0 else H + torch.eye(H.shape[0], dtype=H.dtype, device=H.device) * extra
            L = torch.linalg.cholesky(Hd)
            Hinv = torch.cholesky_inverse(L)
            U = torch.linalg.cholesky(Hinv, upper=True)
            if extra:
                warnings.warn(f"GPTQ: the Hessian was not positive definite with damping {damp}; "
                              f"raised it to {damp + extra / mean_diag:.3g} of the mean diagonal", stacklevel=2)
            return U
        except torch.linalg.LinAlgError:
            extra = (damp if damp > 0 else 0.01) * mean_diag * (10 ** attempt)
    raise ValueError(f"the Hessian stays singular even with damping {damp + extra / mean_diag:.3g}; "
                     "calibrate with more or different text")
