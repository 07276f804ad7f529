"""Monte Carlo pricing of European options from variance paths: the spot scheme and the estimators.

Spot (S₀ = 1, zero rates), on a uniform grid t_n = n h with the variance frozen at the left point:

    log S_{n+1} = log S_n − ½ V_n h + √V_n ΔB_n,     ΔB_n = ρ ΔW_n + √(1−ρ²) ΔW⊥_n,

W the Brownian motion that drives the variance, W⊥ an independent one drawn here from the same generator.

Estimators (:class:`PriceAccumulator`): out-of-the-money payoffs (put for k < 0, call for k ≥ 0), optionally
averaged over antithetic pairs, with the spot itself as control variate (E S_T = 1 exactly, also for every
approximation used here): X − β(S_T − 1), β the in-sample regression coefficient. The estimator is differentiated as
a whole (β included), so its gradient is exactly that of the reported price.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["log_spot_at", "PriceAccumulator", "maturity_indices"]


def maturity_indices(maturities: torch.Tensor, steps: int) -> tuple[torch.Tensor, float]:
    """Grid of ``steps`` equal steps on [0, max T]; the index of each maturity on it, and the step h.

    Raises:
        ValueError: a maturity is not on the grid (to 1e-9 relative): choose ``steps`` so that every maturity is a
            multiple of max(maturities)/steps.
    """
    T = float(maturities.max())
    h = T / steps
    pos = maturities.to(torch.float64) / h
    idx = torch.round(pos).to(torch.int64)
    if bool(((pos - idx).abs() > 1e-9 * steps).any()) or bool((idx < 1).any()):
        raise ValueError(f"every maturity must lie on the grid of steps={steps} equal steps on [0, {T:g}]; got "
                         f"maturities {maturities.tolist()}: choose steps so that each is a multiple of {h:g}")
    return idx, h


def log_spot_at(v_left: torch.Tensor, dw: torch.Tensor, dw_perp: torch.Tensor, rho, h: float,
                idx: torch.Tensor) -> torch.Tensor:
    """log S at the grid indices ``idx`` (M,) from variances at the left points ``v_left`` (paths, N) and the
    increments ``dw``, ``dw_perp`` (paths, N). Returns (M, paths). Negative variances are read as 0."""
    v = v_left.clamp(min=0.0)
    incr = -0.5 * v * h + v.sqrt() * (rho * dw + sqrt_one_minus_sq(rho) * dw_perp)
    csum = torch.cumsum(incr, dim=1)
    return csum[:, idx - 1].T


@dataclass
class PriceAccumulator:
    """Running sums for out-of-the-money option prices at log-strikes (M, S) over maturities M.

    ``add(log_s)`` takes log S_T of shape (M, n) — or, with ``antithetic``, (M, 2, n): a path and its antithetic
    partner, averaged as a pair first. ``result()`` returns (price, std_error, info), prices (M, S).
    """

    log_strikes: torch.Tensor        # (M, S) or (S,)
    antithetic: bool
    control_variate: bool

    def __post_init__(self):
        self.strikes = torch.exp(self.log_strikes.to(torch.float64))
        self.is_put = self.log_strikes < 0
        self.n = 0
        self.sums = None

    def _payoffs(self, log_s):
        s = torch.exp(log_s)[..., None]                                 # (M, [2,] n, 1)
        k = self.strikes[:, None, :] if not self.antithetic else self.strikes[:, None, None, :]
        put = self.is_put[:, None, :] if not self.antithetic else self.is_put[:, None, None, :]
        x = torch.where(put, (k - s).clamp(min=0.0), (s - k).clamp(min=0.0))
        c = s[..., 0] - 1.0
        if self.antithetic:
            x, c = x.mean(dim=1), c.mean(dim=1)
        return x, c                                                      # (M, n, S), (M, n)

    def add(self, log_s: torch.Tensor) -> None:
        x, c = self._payoffs(log_s)
        new = {"x": x.sum(dim=1), "c": c.sum(dim=1), "xx": (x * x).sum(dim=1), "cc": (c * c).sum(dim=1),
               "xc": (x * c[..., None]).sum(dim=1)}
        self.sums = new if self.sums is None else {key: self.sums[key] + new[key] for key in new}
        self.n += x.shape[1]

    def result(self):
        """(price (M, S), std_error (M, S), info) where info has the variance-reduction factor of the control."""
        n = self.n
        sm = self.sums
        mx, mc = sm["x"] / n, sm["c"] / n                               # (M, S), (M,)
        var_x = (sm["xx"] / n - mx ** 2).clamp(min=0.0) * n / max(n - 1, 1)
        var_c = (sm["cc"] / n - mc ** 2).clamp(min=0.0) * n / max(n - 1, 1)
        cov_xc = (sm["xc"] / n - mx * mc[:, None]) * n / max(n - 1, 1)
        if self.control_variate:
            beta = torch.where(var_c[:, None] > 0, cov_xc / var_c[:, None].clamp(min=1e-300), torch.zeros_like(cov_xc))
            price = mx - beta * mc[:, None]
            var = (var_x - 2 * beta * cov_xc + beta ** 2 * var_c[:, None]).clamp(min=0.0)
        else:
            price, var = mx, var_x
        var, var_x = var.detach(), var_x.detach()
        se = torch.sqrt(var / n)
        gain = torch.where(var > 0, var_x / var.clamp(min=1e-300), torch.ones_like(var))
        return price, se, {"control_variance_ratio": gain, "samples": n}


def otm_to_call(otm: torch.Tensor, log_strikes: torch.Tensor) -> torch.Tensor:
    """Call prices from out-of-the-money prices (parity C = P + 1 − K for k < 0)."""
    k = log_strikes.to(torch.float64)
    return torch.where(k < 0, otm + 1.0 - torch.exp(k), otm)


def chunk_sizes(total: int, per_chunk: int):
    """Split ``total`` into chunks of at most ``per_chunk``."""
    out = []
    while total > 0:
        out.append(min(total, per_chunk))
        total -= out[-1]
    return out


def default_chunk(steps: int, width: int, budget_bytes: float = 64e6) -> int:
    """Paths per chunk so that a (paths, steps, width) float64 block stays within ``budget_bytes``."""
    return max(256, int(budget_bytes // (8 * max(steps, 1) * max(width, 1))))


def sqrt_one_minus_sq(rho):
    return torch.sqrt(1 - torch.as_tensor(rho, dtype=torch.float64) ** 2) if isinstance(rho, torch.Tensor) \
        else math.sqrt(1 - rho * rho)
