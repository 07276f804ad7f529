"""Monte Carlo pricing of European options from variance paths: the spot scheme and the estimators.

Spot (S₀ = 1, zero rates), on a uniform grid t_n = n h with the variance frozen at the left point:

    log S_{n+1} = log S_n − ½ V_n h + √V_n ΔB_n,     ΔB_n = ρ ΔW_n + √(1−ρ²) ΔW⊥_n,

W the Brownian motion that drives the variance, W⊥ an independent one. Given the variance path and W, the W⊥ part
up to a maturity, √(1−ρ²) Σ √V_n ΔW⊥_n, is Gaussian with variance (1−ρ²) h Σ V_n, independently over the intervals
between maturities; so :class:`SpotSums` draws it as one normal per maturity instead of one per step — the same law
of (log S at the maturities) as stepping W⊥, at a fraction of the normals (the variance paths and ΔW are never
needed beyond the running sums Σ V_n and Σ √V_n ΔW_n, so the paths can stream through in time blocks).

Estimators (:class:`PriceAccumulator`): out-of-the-money payoffs (put for k < 0, call for k ≥ 0), optionally
averaged over antithetic pairs, with the spot itself as control variate (E S_T = 1 exactly, also for every
approximation used here): X − β(S_T − 1), β the in-sample regression coefficient. The estimator is differentiated as
a whole (β included), so its gradient is exactly that of the reported price.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["SpotSums", "PriceAccumulator", "maturity_indices"]


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


class SpotSums:
    """Running sums of the spot scheme along paths, at the maturities: fed a time block at a time.

    Args:
        idx: (M,) maturities as step counts (log S at maturity m is the sum over steps 0..idx[m] − 1).
        h: the step.
        rho: correlation of W and B (a number or a 0-d tensor, differentiable).

    :meth:`add` takes the variances at the left points ``v`` (n, c), ≥ 0, and the increments ``dw`` (n, c) of
    steps ``first``..``first + c − 1`` (in any dtype: a block's sums are taken in it, the running sums in float64);
    :meth:`log_spot` turns the sums and one standard normal per maturity and path into log S (M, n).
    """

    def __init__(self, idx: torch.Tensor, h: float, rho):
        self.idx = [int(i) for i in idx]
        self.h = h
        self.rho = rho
        self.sum_v: torch.Tensor | None = None      # Σ V_n up to each maturity, (M, n) float64
        self.sum_vw: torch.Tensor | None = None     # Σ √V_n ΔW_n

    def add(self, first: int, v: torch.Tensor, dw: torch.Tensor) -> None:
        c = v.shape[1]
        vw = v.sqrt() * dw
        if any(first < i < first + c for i in self.idx):     # a maturity strictly inside the block: partial sums
            cv, cw = torch.cumsum(v, dim=1), torch.cumsum(vw, dim=1)
            tot_v, tot_w = cv[:, -1], cw[:, -1]
        else:
            tot_v, tot_w = v.sum(dim=1), vw.sum(dim=1)
        rows_v, rows_w = [], []
        for i in self.idx:
            if i >= first + c:
                rows_v.append(tot_v)
                rows_w.append(tot_w)
            elif i > first:
                rows_v.append(cv[:, i - first - 1])
                rows_w.append(cw[:, i - first - 1])
            else:
                rows_v.append(torch.zeros_like(tot_v))
                rows_w.append(torch.zeros_like(tot_w))
        # block sums in the block's dtype (≤ a few hundred terms: float32 keeps them to ~1e−6 relative), running
        # sums in float64
        add_v, add_w = torch.stack(rows_v).to(torch.float64), torch.stack(rows_w).to(torch.float64)
        if self.sum_v is None or self.sum_vw is None:
            self.sum_v, self.sum_vw = add_v, add_w
        else:
            self.sum_v, self.sum_vw = self.sum_v + add_v, self.sum_vw + add_w

    def log_spot(self, z: torch.Tensor) -> torch.Tensor:
        """log S at the maturities, (M, n), from standard normals ``z`` (M, n): the W⊥ part over the m-th interval
        between sorted maturities is √((1−ρ²) h ΔΣV) z_m."""
        h, rho = self.h, self.rho
        if self.sum_v is None or self.sum_vw is None:
            raise ValueError("SpotSums.log_spot: no steps were added")
        drift = -0.5 * h * self.sum_v + rho * self.sum_vw
        order = torch.argsort(torch.as_tensor(self.idx), stable=True)
        q = self.sum_v[order] * h                                       # (M, n), sorted by maturity
        dq = torch.diff(q, dim=0, prepend=torch.zeros_like(q[:1])).clamp(min=0.0)
        pos = dq > 0
        root = torch.where(pos, dq, torch.ones_like(dq)).sqrt() * pos   # √ΔQ with a finite gradient at 0
        perp = torch.cumsum(root * z, dim=0) * sqrt_one_minus_sq(rho)
        return drift + perp[torch.argsort(order)]


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
