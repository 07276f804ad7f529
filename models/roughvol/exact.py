"""The exact joint law of the rough Bergomi driver Y and its Brownian motion W on a grid (Bayer, Friz & Gatheral 2016).

Y_t = √(2H) ∫₀ᵗ (t−s)^{H−½} dW_s (Var Y_t = t^{2H}). For s ≤ t (derived by u = s·v and Euler's integral for ₂F₁):

    Cov(Y_s, Y_t) = 2H ∫₀ˢ (s−u)^{H−½} (t−u)^{H−½} du = 2H/(H+½) · s^{H+½} t^{H−½} · ₂F₁(½−H, 1; H+3/2; s/t),
    Cov(Y_t, W_s) = √(2H)/(H+½) · (t^{H+½} − (t − min(s, t))^{H+½}),      Cov(W_s, W_t) = min(s, t).

The 2N × 2N covariance of (Y_{t_1..t_N}, W_{t_1..t_N}) is factored once in float64 (Cholesky, with an eigenvalue
fallback for the numerically singular corner) and every path is one product with the factor: exact in law on the
grid, O(N²) per path.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from scipy.special import hyp2f1

__all__ = ["joint_covariance", "joint_factor"]


def joint_covariance(hurst: float, times) -> torch.Tensor:
    """(2N, 2N) float64 covariance of (Y_{t_1..t_N}, W_{t_1..t_N}) for times t_i > 0 (any order)."""
    t = np.asarray(times, dtype=np.float64)
    if t.ndim != 1 or not np.all(t > 0):
        raise ValueError(f"times must be a 1-D array of positive times; got {t.tolist()[:8]}")
    H = float(hurst)
    s, u = np.minimum.outer(t, t), np.maximum.outer(t, t)
    yy = 2 * H / (H + 0.5) * s ** (H + 0.5) * u ** (H - 0.5) * hyp2f1(0.5 - H, 1.0, H + 1.5, s / u)
    yw = math.sqrt(2 * H) / (H + 0.5) * (t[:, None] ** (H + 0.5) - (t[:, None] - s) ** (H + 0.5))
    ww = s
    cov = np.block([[yy, yw], [yw.T, ww]])
    return torch.from_numpy(0.5 * (cov + cov.T))


@lru_cache(maxsize=4)
def _factor(hurst: float, times: tuple) -> torch.Tensor:
    cov = joint_covariance(hurst, times)
    L, info = torch.linalg.cholesky_ex(cov)
    if int(info) == 0:
        return L
    evals, evecs = torch.linalg.eigh(cov)
    return evecs * torch.sqrt(evals.clamp(min=0.0))[None, :]


def joint_factor(hurst: float, times: torch.Tensor) -> torch.Tensor:
    """A factor L (L Lᵀ = :func:`joint_covariance`) for the grid, float64; the last 4 grids are cached."""
    return _factor(float(hurst), tuple(float(x) for x in times.tolist()))
