"""Classical (non-Bayesian) estimators of the Hurst index, batched in torch.

All three regress a log statistic on log scale and read H off the slope:

* :func:`variogram_hurst` — on a *path* (fBM-like levels): mean |x_{t+m} − x_t|^p ∝ m^{pH}
  ("variogram" for p = 2, log-increment regression in general). Small lags, the most
  efficient of the three for exact fBM.
* :func:`rescaled_range_hurst` — Hurst's R/S on *increments* (fGn-like noise), optionally with
  the Anis–Lloyd small-sample correction (Weron 2002).
* :func:`dfa_hurst` — detrended fluctuation analysis on *increments*: the profile's RMS residual
  around a local polynomial trend grows like w^H.

Convert a path to increments with ``torch.diff(path, dim=-1)``. Inputs are ``(*batch, n)``;
the estimate has shape ``(*batch,)``. Computation is float64.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import _validation as V

__all__ = ["HurstEstimate", "variogram_hurst", "rescaled_range_hurst", "dfa_hurst", "anis_lloyd_expected_rs"]


class HurstEstimate(NamedTuple):
    hurst: torch.Tensor        # (*batch,) the estimate
    scales: torch.Tensor       # (m,) lags or window sizes used in the regression
    statistic: torch.Tensor    # (*batch, m) the statistic at each scale (before logs)
    slope: torch.Tensor        # (*batch,) slope of the log–log regression
    intercept: torch.Tensor    # (*batch,)


def _as_series(x, name: str, min_len: int) -> torch.Tensor:
    V.check_has_data(x, name)
    x = torch.as_tensor(x).to(torch.float64)
    if x.dim() < 1:
        raise ValueError(f"{name} must have a time axis (last dimension); got a scalar")
    if x.shape[-1] < min_len:
        raise ValueError(f"{name} needs at least {min_len} time points; got {x.shape[-1]}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite")
    return x


def _loglog_fit(scales: torch.Tensor, stat: torch.Tensor):
    """Least-squares line through (log scales, log stat); returns slope, intercept (*batch,)."""
    lx = torch.log(scales)
    ly = torch.log(stat)
    xc = lx - lx.mean()
    slope = (xc * (ly - ly.mean(-1, keepdim=True))).sum(-1) / (xc ** 2).sum()
    intercept = ly.mean(-1) - slope * lx.mean()
    return slope, intercept


def _window_grid(min_window: int, max_window: int, num: int) -> torch.Tensor:
    """Distinct integer window sizes, geometrically spaced in [min_window, max_window]."""
    grid = torch.logspace(math.log10(min_window), math.log10(max_window), num, dtype=torch.float64)
    return torch.unique(torch.round(grid)).to(torch.long)


def _check_windows(min_window: int, max_window: int | None, n: int, default_max: int, name: str):
    V.check_positive_int(min_window, "min_window", 2)
    max_window = default_max if max_window is None else V.check_positive_int(max_window, "max_window", 2)
    if max_window > n:
        raise ValueError(f"max_window must be <= the series length {n}; got {max_window}")
    if max_window <= min_window:
        raise ValueError(f"{name}: need max_window > min_window; got min_window={min_window}, "
                         f"max_window={max_window} (series length {n})")
    return max_window


# ---------------------------------------------------------------------------------------- variogram
def variogram_hurst(path, lags: Sequence[int] | None = None, max_lag: int = 16, p: float = 2.0) -> HurstEstimate:
    """Hurst index from the scaling of mean |x_{t+m} − x_t|^p ∝ m^{pH} over lags m (slope / p).

    Args:
        path: ``(*batch, n)`` levels on a uniform grid (e.g. fBM samples, cumulative sums).
        lags: the lags to regress over; default ``1 .. min(max_lag, n // 4)``.
        p: the moment (2 = variogram; 1 = madogram, more robust to outliers).

    Exact fBM has E|Δ_m x|^p = c m^{pH} at every lag, so short lags carry the most information
    and the estimate is nearly unbiased.
    """
    x = _as_series(path, "path", 8)
    p = V.check_positive_float(p, "p")
    n = x.shape[-1]
    if lags is None:
        V.check_positive_int(max_lag, "max_lag", 2)         # a regression needs two lags
        lags = range(1, min(max_lag, n // 4) + 1)
    lag_t = torch.as_tensor(list(lags), dtype=torch.long)
    if lag_t.numel() < 2 or bool((lag_t < 1).any()) or bool((lag_t >= n).any()):
        raise ValueError(f"lags must hold at least two integers in [1, {n - 1}]; got {lag_t.tolist()}")
    stat = torch.stack([(x[..., m:] - x[..., :-m]).abs().pow(p).mean(-1) for m in lag_t.tolist()], -1)
    if bool((stat <= 0).any()):
        raise ValueError("path is constant over some lag; the variogram is zero and its log undefined")
    scales = lag_t.to(torch.float64)
    slope, intercept = _loglog_fit(scales, stat)
    return HurstEstimate(slope / p, scales, stat, slope, intercept)


# ---------------------------------------------------------------------------------------- R/S
def anis_lloyd_expected_rs(window) -> torch.Tensor:
    """Expected R/S of n i.i.d. Gaussians (Anis & Lloyd 1976), S the block's population std.

    E[R/S](n) = Γ((n−1)/2) / (√π Γ(n/2)) · Σ_{i=1}^{n−1} √((n − i)/i), computed with log-gamma
    (no overflow, so no large-n switch is needed). Peters' extra factor (n − ½)/n is not used:
    for this definition of R/S the plain formula matches simulation (tested to 4 standard errors).
    """
    n = torch.as_tensor(window, dtype=torch.float64)
    out = []
    for m in n.reshape(-1).tolist():
        i = torch.arange(1, int(m), dtype=torch.float64)
        ratio = torch.exp(torch.lgamma(torch.tensor((m - 1) / 2)) - torch.lgamma(torch.tensor(m / 2)))
        out.append(ratio / math.sqrt(math.pi) * torch.sqrt((m - i) / i).sum())
    return torch.stack(out).reshape(n.shape).to(torch.float64)


def rescaled_range_hurst(increments, min_window: int = 16, max_window: int | None = None,
                         num_windows: int = 12, correction: str = "anis-lloyd") -> HurstEstimate:
    """Hurst's rescaled-range (R/S) estimate from increments (fGn-like noise).

    The series is cut into non-overlapping blocks of each window size w; in each block
    R = range of the cumulative demeaned sum and S = the block's standard deviation; the mean
    R/S over blocks scales like w^H. Plain R/S is biased upwards at small w (it reads ≈ 0.55–0.6
    on white noise), so by default the slope is taken relative to the white-noise expectation:
    H = ½ + slope of log(R/S) − log E_AL[R/S] (``correction="anis-lloyd"``; ``None`` for plain R/S).

    Args:
        increments: ``(*batch, n)``.
        min_window, max_window: window sizes (default max: n // 4, so every size has ≥ 4 blocks).
        num_windows: number of geometrically spaced sizes.
    """
    x = _as_series(increments, "increments", 32)
    V.check_choice(correction, "correction", ("anis-lloyd", None))
    n = x.shape[-1]
    max_window = _check_windows(min_window, max_window, n, n // 4, "rescaled_range_hurst")
    windows = _window_grid(min_window, max_window, num_windows)
    stats = []
    for w in windows.tolist():
        blocks = x[..., : (n // w) * w].reshape(x.shape[:-1] + (n // w, w))
        dev = blocks - blocks.mean(-1, keepdim=True)
        profile = torch.cumsum(dev, -1)
        r = profile.amax(-1).clamp(min=0) - profile.amin(-1).clamp(max=0)
        s = dev.pow(2).mean(-1).sqrt()
        if bool((s <= 0).any()):
            raise ValueError(f"a block of length {w} is constant; R/S is undefined")
        stats.append((r / s).mean(-1))
    stat = torch.stack(stats, -1)
    scales = windows.to(torch.float64)
    if correction is None:
        slope, intercept = _loglog_fit(scales, stat)
        return HurstEstimate(slope, scales, stat, slope, intercept)
    slope, intercept = _loglog_fit(scales, stat / anis_lloyd_expected_rs(scales))
    return HurstEstimate(0.5 + slope, scales, stat, slope, intercept)


# ---------------------------------------------------------------------------------------- DFA
def dfa_hurst(increments, min_window: int = 10, max_window: int | None = None, num_windows: int = 12,
              order: int = 1) -> HurstEstimate:
    """Detrended fluctuation analysis (DFA-``order``) from increments (fGn-like noise).

    Profile Y = cumsum(x − mean x); for each window size w it is cut into non-overlapping
    blocks from both ends (so no data are dropped), a degree-``order`` polynomial is fitted in
    each block by least squares, and F(w) = RMS of the residuals. F(w) ∝ w^H for fGn.

    Args:
        increments: ``(*batch, n)``.
        min_window: smallest window; must exceed ``order + 1`` (DFA is biased for tiny windows).
        max_window: default n // 4.
    """
    x = _as_series(increments, "increments", 32)
    V.check_positive_int(order, "order", 0)
    if min_window <= order + 1:
        raise ValueError(f"min_window must exceed order + 1 = {order + 1}; got {min_window}")
    n = x.shape[-1]
    max_window = _check_windows(min_window, max_window, n, n // 4, "dfa_hurst")
    windows = _window_grid(min_window, max_window, num_windows)
    profile = torch.cumsum(x - x.mean(-1, keepdim=True), -1)
    stats = []
    for w in windows.tolist():
        nb = n // w
        head = profile[..., : nb * w].reshape(x.shape[:-1] + (nb, w))
        tail = profile[..., n - nb * w:].reshape(x.shape[:-1] + (nb, w))
        blocks = torch.cat([head, tail], -2)
        t = torch.linspace(-1.0, 1.0, w, dtype=torch.float64)
        basis = torch.stack([t ** k for k in range(order + 1)], -1)           # (w, order + 1)
        q, _ = torch.linalg.qr(basis)                                          # orthonormal columns
        resid = blocks - (blocks @ q) @ q.T
        stats.append(resid.pow(2).mean((-1, -2)).sqrt())
    stat = torch.stack(stats, -1)
    if bool((stat <= 0).any()):
        raise ValueError("increments are constant (or a polynomial of degree <= order) over some window: the DFA "
                         "fluctuation is zero and its log undefined")
    scales = windows.to(torch.float64)
    slope, intercept = _loglog_fit(scales, stat)
    return HurstEstimate(slope, scales, stat, slope, intercept)
