"""Linear fractional dynamics dX = μ(t) X dt + g(t) dB̂, per coordinate, as an augmented linear SDE.

With B̂ the type II Markov approximation of fBM (REFERENCE §2), Z = (X, Y_1..Y_K) solves

    dZ = F(t) Z dt + G(t) dW,   F = [[μ, −g ω_1γ_1, …, −g ω_Kγ_K], [0, −diag(γ)]],   G = (g Σω, 1, …, 1)ᵀ

with ONE scalar Brownian motion W per coordinate. Given x_0, Z_t is Gaussian with mean (c(t) x_0, 0, …)
(c = exp ∫μ) and a covariance Σ(t) that does not depend on x_0. Everything a diffusion model needs is a
function of t alone and is computed once, in float64, on a fine grid, then stored as cubic-spline buffers
and evaluated on the device (no host round-trip per call):

* ``c``, ``μ``, ``g``                          — from the schedule, exact;
* ``cov_yy``                                   — closed form (1 − e^{−(γ_i+γ_j)t})/(γ_i+γ_j);
* ``cov_xx``, ``cov_xy``                       — closed form for the VE-type schedule, otherwise the
  Lyapunov ODE Σ' = FΣ + ΣFᵀ + GGᵀ solved once (DOP853, rtol 1e-11);
* the conditional law of X given Y:  η = Σ_YY⁻¹ Σ_YX,  σ̃² = Σ_XX − Σ_XY Σ_YY⁻¹ Σ_YX,
  and δ = G_x − 1ᵀη, κ = δ/σ̃, ζ = Σ_YY⁻¹ 1 (the coefficients of the reverse-time dynamics).

Near t = 0 the Y_k are all ≈ W_t, so Σ_YY has eigenvalues ~ t, t³, …, t^{2K−1} (cond(Σ_YY) ≈ 1e28 for
K = 5 at t = 1e-3) and σ̃² ~ t^{2K+1} is the difference of two numbers ~ t. Schur complements of Σ in
float64 are then meaningless (see :func:`naive_conditionals`). The stable parameterisation used here:

1. the Newton basis Ỹ = N Y (divided differences of γ ↦ Y_γ): dỸ = −B Ỹ dt + e_0 dW with B lower
   bidiagonal (diag γ, sub-diagonal 1); the kernel of Ỹ_j is e^{−Bs}e_0, of size s^j/j!, so after the
   scaling S = diag(t^{j+½}) its Gram matrix is well conditioned (≈ a Hilbert matrix);
2. X = g(t) ωᵀY + R, where R has no noise, dR = (μR + (μg − g′) ωᵀY) dt (the leading part of X is an
   exact linear function of Y, removed analytically);
3. the kernels of (Ỹ, R) are evaluated on a graded Gauss–Legendre rule over [0, t] and factorised by a
   Householder QR, which yields σ̃ and δ with an absolute error ~ ε‖R‖ instead of ε‖X‖²/σ̃;
4. where even that is not enough (σ̃/‖R‖ below ~1e-9, only for K ≥ 4 at t ≲ 1e-3) the power law
   σ̃² ∝ t^p (p measured just above, ≈ 2K + 1) continues log σ̃², and κ² = d log σ̃²/dt − 2μ follows
   from the exact identity (σ̃²)′ = 2μσ̃² + δ².
"""
from __future__ import annotations

import abc
import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise
from typing import cast

import numpy as np
import torch
from scipy.integrate import solve_ivp
from scipy.interpolate import CubicSpline
from torch import nn

from . import _validation as V
from ._warnings import PriorMismatchWarning, user_stacklevel
from .kinds import get_kind
from .noise import MarkovNoise
from .numerics import augmented_system, check_shape, log_linear_grid, log_linear_grid_times

__all__ = ["Schedule", "VPSchedule", "VESchedule", "LinearFractionalDynamics", "Marginal",
           "newton_basis", "naive_conditionals", "augmented_covariance"]

_EPS = float(np.finfo(np.float64).eps)
# The QR determines σ̃ to about _EPS·‖R‖; below this relative accuracy the power-law continuation takes over.
_CONTINUATION_TOL = 1e-7
#: largest max(γ_max, |μ|)·T accepted: the Lyapunov solve's cost grows linearly in it (~5 s at 2e4 with K = 1,
#: measured; 2e7 ran for hours), and from K = 2 on the tables stop resolving far below it anyway
_MAX_RATE_HORIZON = 2e4
#: PriorMismatchWarning above this terminal log-SNR λ(T) (the prior then ignores a signal of e^{λ(T)/2} ≳ 8 %)
PRIOR_MISMATCH_LOG_SNR = -5.0


# ---------------------------------------------------------------------------------------------- schedules
class Schedule(abc.ABC):
    """Coefficients μ(t), g(t) of dX = μ X dt + g dB̂ on [0, horizon] (torch float64 in, same out).

    Subclasses implement :meth:`mu`, :meth:`g`, :meth:`dg` (= g′) and :meth:`log_c` (= ∫_0^t μ), and may
    implement :meth:`brownian_variance` (Var X_t given x_0 when B̂ is Brownian motion: ∫ e^{2∫_s^t μ} g² ds).
    ``closed_form = "ve"`` marks μ ≡ 0, g = a e^{λt}, whose covariance has a closed form.

    The coefficient tables of :class:`LinearFractionalDynamics` are cached by :meth:`cache_key`, built from the
    schedule's class and the values of its attributes; a subclass holding anything else than numbers, strings
    and arrays overrides it (or returns ``None`` to disable caching).
    """

    closed_form: str | None = None

    def __init__(self, horizon: float = 1.0):
        self.horizon = V.check_positive_float(horizon, "horizon")

    @abc.abstractmethod
    def mu(self, t: torch.Tensor) -> torch.Tensor:
        """Drift coefficient μ(t)."""

    @abc.abstractmethod
    def g(self, t: torch.Tensor) -> torch.Tensor:
        """Diffusion coefficient g(t)."""

    @abc.abstractmethod
    def dg(self, t: torch.Tensor) -> torch.Tensor:
        """g′(t)."""

    @abc.abstractmethod
    def log_c(self, t: torch.Tensor) -> torch.Tensor:
        """log c(t) = ∫_0^t μ."""

    def brownian_variance(self, t: torch.Tensor) -> torch.Tensor:
        """Var X_t given x_0 when B̂ = W (optional closed form; the Lyapunov ODE is used without it)."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-form Brownian variance")

    @property
    def has_closed_variance(self) -> bool:
        """Whether :meth:`brownian_variance` is implemented by the subclass."""
        return type(self).brownian_variance is not Schedule.brownian_variance

    def cache_key(self) -> tuple | None:
        """A hashable key equal for schedules with equal coefficients (``None``: do not cache)."""
        items: list[tuple] = []
        for name, value in sorted(vars(self).items()):
            if isinstance(value, (bool, int, float, str)) or value is None:
                items.append((name, value))
            elif isinstance(value, (np.ndarray, torch.Tensor)):
                arr = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
                items.append((name, str(arr.dtype), arr.shape, arr.tobytes()))
            else:
                return None
        return (type(self).__module__, type(self).__qualname__, tuple(items))


class VPSchedule(Schedule):
    """Variance preserving: β(t) = β_min + (β_max − β_min) t/T, μ = −β/2, g = √β (Song et al. 2021).

    Args:
        beta_min: β(0) > 0, in units of 1/time.
        beta_max: β(T) >= beta_min, in units of 1/time.
        horizon: T > 0, the end of the time interval [0, T].

    Raises:
        ValueError: a non-positive value or beta_max < beta_min, naming the parameter and the value.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, horizon: float = 1.0):
        super().__init__(horizon)
        self.beta_min = V.check_positive_float(beta_min, "beta_min")
        self.beta_max = V.check_positive_float(beta_max, "beta_max")
        if self.beta_max < self.beta_min:
            raise ValueError(f"beta_max must be >= beta_min; got beta_min={beta_min}, beta_max={beta_max}")
        self._slope = (self.beta_max - self.beta_min) / self.horizon

    def beta(self, t):
        return self.beta_min + self._slope * t

    def mu(self, t):
        return -0.5 * self.beta(t)

    def g(self, t):
        return torch.sqrt(self.beta(t))

    def dg(self, t):
        return 0.5 * self._slope / torch.sqrt(self.beta(t))

    def log_c(self, t):
        return -0.5 * (self.beta_min * t + 0.5 * self._slope * t * t)

    def brownian_variance(self, t):
        return -torch.expm1(2.0 * self.log_c(t))

    def __repr__(self):
        return f"VPSchedule(beta_min={self.beta_min:g}, beta_max={self.beta_max:g}, horizon={self.horizon:g})"


class VESchedule(Schedule):
    """Variance exploding: μ = 0, g = σ_min √(2λ/T) e^{λt/T}, λ = ln(σ_max/σ_min), so Var = σ_min²(e^{2λt/T} − 1).

    Args:
        sigma_min: σ_min > 0, the noise scale at t = 0 (in the units of the data).
        sigma_max: σ_max > sigma_min, the noise scale at t = T.
        horizon: T > 0, the end of the time interval [0, T].

    Raises:
        ValueError: a non-positive value or sigma_max <= sigma_min, naming the parameter and the value.
    """

    closed_form = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, horizon: float = 1.0):
        super().__init__(horizon)
        self.sigma_min = V.check_positive_float(sigma_min, "sigma_min")
        self.sigma_max = V.check_positive_float(sigma_max, "sigma_max")
        if self.sigma_max <= self.sigma_min:
            raise ValueError(f"sigma_max must be > sigma_min; got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.rate = math.log(self.sigma_max / self.sigma_min) / self.horizon       # λ/T
        self.amplitude = self.sigma_min * math.sqrt(2.0 * self.rate)

    def mu(self, t):
        return torch.zeros_like(t)

    def g(self, t):
        return self.amplitude * torch.exp(self.rate * t)

    def dg(self, t):
        return self.rate * self.g(t)

    def log_c(self, t):
        return torch.zeros_like(t)

    def brownian_variance(self, t):
        return self.sigma_min ** 2 * torch.expm1(2.0 * self.rate * t)

    def __repr__(self):
        return f"VESchedule(sigma_min={self.sigma_min:g}, sigma_max={self.sigma_max:g}, horizon={self.horizon:g})"


# ---------------------------------------------------------------------------------------------- Newton basis
def newton_basis(gammas) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, N⁻¹, B) for distinct rates γ: Ỹ = N Y are the divided differences Ỹ_j = [γ_1..γ_{j+1}] Y.

    N 1 = e_0 and N diag(γ) N⁻¹ = B, lower bidiagonal with diagonal γ and sub-diagonal 1, so
    dỸ = −BỸ dt + e_0 dW. Float64.
    """
    g = torch.as_tensor(gammas, dtype=torch.float64).cpu()
    K = g.numel()
    diff = g[:, None] - g[None, :]
    if K > 1 and float(diff.abs()[~torch.eye(K, dtype=torch.bool)].min()) <= 1e-12 * float(g.abs().max()):
        raise ValueError(f"gammas must be distinct for the Newton basis; got {g.tolist()}")
    N = torch.zeros(K, K, dtype=torch.float64)
    Ninv = torch.zeros(K, K, dtype=torch.float64)
    for j in range(K):
        for m in range(j + 1):
            others = [i for i in range(j + 1) if i != m]
            N[j, m] = 1.0 / torch.prod(g[m] - g[others]) if others else 1.0
        for k in range(K):   # Newton interpolation: Y_k = Σ_j Ỹ_j Π_{l<j} (γ_k − γ_l)
            Ninv[k, j] = torch.prod(g[k] - g[:j]) if j > 0 else 1.0
    B = torch.diag(g) + torch.diag(torch.ones(K - 1, dtype=torch.float64), -1) if K > 0 else torch.zeros(0, 0)
    return N, Ninv, B


# ---------------------------------------------------------------------------------------------- quadrature
@lru_cache(maxsize=8)
def _graded_rule(order: int = 16):
    """Composite Gauss–Legendre on [0, 1] (r/t), graded towards both ends: geometrically towards 0, where
    schedules like √β(t) have a nearby singularity (edges 4^{−5}, …, 4^{−1}), and towards 1, where the kernels
    decay like e^{−2γ_max t(1 − x)} (edges 1 − ¾·2^{−k}). Returns (nodes, weights), weights summing to 1."""
    x, w = np.polynomial.legendre.leggauss(order)
    edges = np.concatenate([[0.0], 4.0 ** -np.arange(5, 0, -1), 1 - 0.75 * 2.0 ** -np.arange(1, 6), [1.0]])
    nodes, weights = [], []
    for a, b in pairwise(edges):
        nodes.append(a + (b - a) * (x + 1) / 2)
        weights.append((b - a) * w / 2)
    return np.concatenate(nodes), np.concatenate(weights)


def _expm_first_column(M: np.ndarray) -> np.ndarray:
    """First column of e^M for a batch of small matrices (Taylor of degree 18 with scaling and squaring).

    Used for M = S⁻¹(−Bs)S, whose exponential has a sign pattern (−1)^{i−j} ≥ 0 entries: the squarings
    add terms of equal sign, so every entry keeps full relative accuracy.
    """
    n, K, _ = M.shape
    norm = np.abs(M).sum(axis=1).max() if n else 0.0
    m = max(0, int(math.ceil(math.log2(max(norm, 1e-300) / 0.25))))
    A = M / 2.0 ** m
    eye = np.broadcast_to(np.eye(K), A.shape)
    E = eye.copy()
    for k in range(18, 0, -1):
        E = eye + (A @ E) / k
    for _ in range(m):
        E = E @ E
    return E[:, :, 0]


def _newton_kernels(s: np.ndarray, gammas: np.ndarray, N: np.ndarray, B: np.ndarray,
                    switch: float = 2.0, terms: int = 30) -> np.ndarray:
    """D_j(s)/s^j, D(s) = e^{−Bs} e_0 the Newton-basis OU kernels, shape (*s.shape, K), to full relative accuracy.

    For s γ_max ≤ ``switch``: the Taylor series D_j(s)/s^j = (−1)^j Σ_m (−s)^m h_m(γ_1..γ_{j+1}) / (m + j)!
    (h_m the complete homogeneous symmetric polynomials, the divided differences of γ^{m+j}); above it the
    divided-difference formula D = N e^{−γs}, whose cancellation is then mild. If N is large (clustered
    rates) the matrix exponential is used instead.
    """
    K = gammas.size
    if np.abs(N).max() > 1e6:
        M = -s[..., None, None] * np.diag(gammas) - (B - np.diag(gammas))
        return _expm_first_column(M.reshape(-1, K, K)).reshape(*s.shape, K)
    h = np.zeros((terms, K))                  # h[m, j] = h_m(γ_1..γ_{j+1})
    h[0] = 1.0
    for m in range(1, terms):
        h[m, 0] = gammas[0] ** m
        for j in range(1, K):
            h[m, j] = h[m, j - 1] + gammas[j] * h[m - 1, j]
    fact = np.array([math.factorial(m + j) for m in range(terms) for j in range(K)], dtype=np.float64)
    coef = h / fact.reshape(terms, K) * ((-1.0) ** np.arange(K))[None, :]
    out = np.empty(s.shape + (K,))
    gmax = gammas.max()
    small = s * gmax <= switch
    ss = s[small]
    acc = np.zeros(ss.shape + (K,))
    for m in range(terms - 1, -1, -1):        # Horner in (−s)
        acc = acc * (-ss)[..., None] + coef[m]
    out[small] = acc
    sl = s[~small]
    if sl.size:
        D = np.exp(-sl[..., None] * gammas) @ N.T
        out[~small] = D / sl[..., None] ** np.arange(K)
    return out


# ---------------------------------------------------------------------------------------------- the stable core
def _remainder_kernel(schedule: Schedule, gammas: np.ndarray, weights: np.ndarray, t: np.ndarray,
                      xq: np.ndarray) -> np.ndarray:
    """k_R(t, r) at r = t·xq, (n, Q): the response of R_t = X_t − g(t)ωᵀY_t to dW_r,

    k_R(t, r) = ∫_r^t e^{log c(t) − log c(s)} (μg − g′)(s) Σ_k ω_k e^{−γ_k(s−r)} ds, by a backward recursion over
    the sub-intervals [x_q, x_{q+1}] (x_{Q+1} = 1) with 8-point Gauss–Legendre each (factors e^{−γh} ≤ 1:
    no cancellation).
    """
    K, Q, n = gammas.size, xq.size, t.size
    xs, ws = np.polynomial.legendre.leggauss(8)
    edges = np.concatenate([xq, [1.0]])
    sub_len = np.diff(edges)                                            # (Q,)
    sub_nodes = edges[:-1, None] + sub_len[:, None] * (xs[None, :] + 1) / 2   # (Q, 8)
    sub_w = sub_len[:, None] * ws[None, :] / 2
    tt = torch.from_numpy(t)
    lc_t = schedule.log_c(tt).numpy()
    sn = t[:, None, None] * sub_nodes[None]                           # (n, Q, 8)
    snt = torch.from_numpy(sn)
    amp = (np.exp(lc_t[:, None, None] - schedule.log_c(snt).numpy())
           * (schedule.mu(snt) * schedule.g(snt) - schedule.dg(snt)).numpy())       # Φ(t,s) (μg − g′)(s)
    r = t[:, None] * xq[None, :]                                       # (n, Q)
    decay_in = np.exp(-gammas[None, None, None, :] * (sn - r[..., None])[..., None])  # (n, Q, 8, K)
    J = np.einsum("nqm,qm,nqmk->nqk", amp, sub_w, decay_in) * t[:, None, None]
    step = np.exp(-gammas[None, None, :] * (t[:, None] * sub_len[None, :])[..., None])  # (n, Q, K)
    integral = np.zeros((n, Q, K))
    acc = np.zeros((n, K))
    for q in range(Q - 1, -1, -1):
        acc = J[:, q] + step[:, q] * acc
        integral[:, q] = acc
    return integral @ weights                                                 # (n, Q)


def _conditionals(schedule: Schedule, gammas: np.ndarray, weights: np.ndarray, ts: np.ndarray,
                  chunk: int = 256) -> dict:
    """η̃ (Newton basis), σ̃, δ, P = S⁻¹Σ̃_YY S⁻¹ and its Cholesky factor, on the grid ``ts`` (float64).

    Kernels (responses of the state at t to dW_r, r ∈ [0, t]) on the graded rule:
      Ỹ_j : D_j(t − r) = (e^{−B(t−r)} e_0)_j, scaled by t^{−j};
      R   : k_R(t, r) (:func:`_remainder_kernel`), scaled by t^{−1}.
    A Householder QR of the weighted kernel matrix gives the Cholesky factor of the scaled covariance of
    (Ỹ, R); the regression of R on Ỹ and its residual follow by triangular solves.
    """
    K = gammas.size
    xq, wq = _graded_rule()
    N, _, B = newton_basis(gammas)
    Bn, Nn = B.numpy(), N.numpy()
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("eta_r", "sigma", "delta", "chol", "zeta", "err", "err_eta")}
    for start in range(0, ts.size, chunk):
        t = ts[start:start + chunk]                                     # (n,)
        n = t.size
        # Newton kernels: e^{M(s)} with M = −s diag(γ) − subdiag(1) is S_s⁻¹ e^{−Bs} S_s (S_s = diag s^j),
        # so its first column is D_j(s)/s^j = O(1): no tiny entries lost.
        s = t[:, None] * (1 - xq[None, :])                              # (n, Q)
        Dsc = _newton_kernels(s, gammas, Nn, Bn)
        Dcol = Dsc * (1 - xq)[None, :, None] ** np.arange(K)[None, None, :]          # D_j(s)/t^j
        kR = _remainder_kernel(schedule, gammas, weights, t, xq)
        A = np.concatenate([Dcol, (kR / t[:, None])[..., None]], axis=2) * np.sqrt(wq)[None, :, None]
        Rf = np.linalg.qr(A, mode="r")                                     # (n, K+1, K+1)
        sgn = np.sign(np.diagonal(Rf, axis1=1, axis2=2))
        sgn[sgn == 0] = 1.0
        Rf = Rf * sgn[..., None]
        Ryy, ryr, rrr = Rf[:, :K, :K], Rf[:, :K, K], Rf[:, K, K]
        bhat = np.linalg.solve(Ryy, ryr[..., None])[..., 0]                # scaled regression of R on Ỹ
        eta_r = bhat * t[:, None] ** (1.0 - np.arange(K))[None, :]
        e0 = np.zeros((n, K, 1))
        e0[:, 0, 0] = 1.0
        zeta_scaled = np.linalg.solve(Ryy, np.linalg.solve(np.swapaxes(Ryy, 1, 2), e0))[..., 0]   # P⁻¹ e_0
        out["eta_r"].append(eta_r)
        out["sigma"].append(np.abs(rrr) * t ** 1.5)
        out["delta"].append(-bhat[:, 0] * t)
        out["chol"].append(np.swapaxes(Ryy, 1, 2))
        out["zeta"].append(zeta_scaled)
        col = np.linalg.norm(A[..., K], axis=1)
        out["err"].append(_EPS * col / np.maximum(np.abs(rrr), 1e-300))
        # error of η̃_R,j ≈ ε ‖A_R‖ ‖R_YY⁻¹‖ t^{1−j}, mapped to the standard basis by |N|ᵀ
        inv_norm = np.linalg.norm(np.linalg.inv(Ryy), ord=2, axis=(1, 2))
        err_tilde = _EPS * (col * inv_norm)[:, None] * t[:, None] ** (1.0 - np.arange(K))[None, :]
        out["err_eta"].append(err_tilde @ np.abs(Nn))
    return {k: np.concatenate(v) for k, v in out.items()}


def _lyapunov_covariance(schedule: Schedule, gammas: np.ndarray, weights: np.ndarray, ts: np.ndarray,
                         rtol: float = 1e-11) -> np.ndarray:
    """Σ(t) (standard basis, (len(ts), K+1, K+1)) from Σ' = FΣ + ΣFᵀ + GGᵀ, Σ(0) = 0, solved once (DOP853)."""
    n = gammas.size + 1
    T = float(ts[-1])
    mu_max = float(schedule.mu(torch.from_numpy(ts)).abs().max())
    gamma_max = float(gammas.max()) if gammas.size else 0.0
    rate = max(gamma_max, mu_max)                                      # the stiffness of the Lyapunov ODE
    if rate * T > _MAX_RATE_HORIZON:
        raise ValueError(f"max(gamma_max, max|mu|)·T = {rate * T:g} (gamma_max = {gamma_max:g}, "
                         f"max|mu(t)| = {mu_max:g} of the schedule, horizon T = {T:g}) exceeds {_MAX_RATE_HORIZON:g}, "
                         f"beyond which the covariance (Lyapunov) solve does not finish in reasonable time; use a "
                         f"smaller gamma_max, beta_max or horizon T")
    # F and G are affine in (μ, g): F = μ F_μ + g F_g + F_0, G = g G_g + G_0, with the pieces taken once from
    # augmented_system (the right-hand side runs thousands of times, in numpy; the splitting is exact)
    pieces = [augmented_system(torch.tensor(mu, dtype=torch.float64), torch.tensor(g, dtype=torch.float64),
                               torch.from_numpy(weights), torch.from_numpy(gammas))
              for mu, g in ((0, 0), (1, 0), (0, 1))]
    (F_0, G_0), (F_1, _), (F_2, G_2) = [(F.numpy(), G.numpy()) for F, G in pieces]
    F_mu, F_g, G_g = F_1 - F_0, F_2 - F_0, G_2 - G_0

    def rhs(t, s):
        S = s.reshape(n, n)
        tt = torch.tensor(t, dtype=torch.float64)
        mu, g = float(schedule.mu(tt)), float(schedule.g(tt))
        F = mu * F_mu + g * F_g + F_0
        G = g * G_g + G_0
        FS = F @ S
        return (FS + FS.T + np.outer(G, G)).ravel()

    sol = solve_ivp(rhs, (0.0, float(ts[-1])), np.zeros(n * n), method="DOP853", t_eval=ts,
                    rtol=rtol, atol=1e-22, dense_output=False)
    if not sol.success:  # pragma: no cover - DOP853 on a linear ODE with bounded coefficients
        raise RuntimeError(f"Lyapunov ODE failed: {sol.message}")
    S = sol.y.T.reshape(-1, n, n)
    return 0.5 * (S + np.swapaxes(S, 1, 2))


def augmented_covariance(schedule: Schedule, gammas: np.ndarray, weights: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Cov(Z_t | x_0) of Z = (X, Y_1..Y_K) at the times ``ts`` (float64 numpy, (len(ts), K+1, K+1)).

    Closed form for the VE-type schedule with K ≥ 1, otherwise the Lyapunov ODE Σ' = FΣ + ΣFᵀ + GGᵀ solved
    once at tight tolerance (DOP853, rtol 1e-11). Standard basis: for K ≥ 3 near t = 0 its Schur complements
    are meaningless in float64; :class:`LinearFractionalDynamics` uses the stable parameterisation instead.
    """
    gammas = np.asarray(gammas, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    ts = np.asarray(ts, dtype=np.float64)
    if schedule.closed_form == "ve" and gammas.size:
        return _ve_covariance(cast(VESchedule, schedule), gammas, weights, ts)   # closed_form "ve": a VESchedule
    return _lyapunov_covariance(schedule, gammas, weights, ts)


def _ve_covariance(schedule: VESchedule, gammas: np.ndarray, weights: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Closed-form Σ(t) for μ = 0, g = a e^{λt}: the X kernel is a sum of exponentials in r,

    k_X(t, r) = a Σ_k ω_k [ −γ_k/(λ−γ_k) e^{(λ−γ_k)t} e^{γ_k r} + λ/(λ−γ_k) e^{λr} ],
    so every entry of Σ is a sum of ∫_0^t e^{b r} dr = t·φ(bt), φ(x) = (e^x − 1)/x.
    """
    K = gammas.size
    lam, a = schedule.rate, schedule.amplitude
    if K and np.min(np.abs(lam - gammas)) < 1e-6 * lam:
        raise ValueError("closed form needs λ ≠ γ_k")
    t = ts[:, None]

    def integral(b):                                       # ∫_0^t e^{b r} dr = t φ(bt), (len(ts), *b.shape)
        x = b[None] * ts.reshape(-1, *(1,) * b.ndim)
        return np.where(np.abs(x) < 1e-12, 1.0, np.expm1(x) / np.where(x == 0, 1.0, x)) * ts.reshape(
            -1, *(1,) * b.ndim)

    betas = np.concatenate([gammas, [lam]])                                   # exponents in r
    coef = np.concatenate([-a * weights * gammas / (lam - gammas) * np.exp((lam - gammas)[None, :] * t),
                           np.full((ts.size, 1), a * lam * np.sum(weights / (lam - gammas)))], axis=1)  # (n, K+1)
    Sxx = np.einsum("ni,nij,nj->n", coef, integral(betas[:, None] + betas[None, :]), coef)
    Sxy = np.exp(-gammas[None, :] * t) * np.einsum("ni,nik->nk", coef, integral(betas[:, None] + gammas[None, :]))
    gs = gammas[:, None] + gammas[None, :]
    Syy = -np.expm1(-gs[None] * ts[:, None, None]) / gs[None]
    S = np.zeros((ts.size, K + 1, K + 1))
    S[:, 0, 0] = Sxx
    S[:, 0, 1:] = Sxy
    S[:, 1:, 0] = Sxy
    S[:, 1:, 1:] = Syy
    return S


def naive_conditionals(cov: torch.Tensor, G_x: torch.Tensor) -> dict:
    """η, σ̃², δ, ζ by Schur complements of a standard-basis covariance, as GFDM computes them.

    Diagnostic only: for K ≥ 3 near t = 0 (and for K = 5 up to t ≈ 0.1) σ̃² comes out with the wrong
    size or sign, because Σ_YY is too ill-conditioned for float64 (see the module docstring).
    """
    cov = cov.to(torch.float64)
    syy, syx, sxx = cov[..., 1:, 1:], cov[..., 1:, 0], cov[..., 0, 0]
    eta = torch.linalg.solve(syy, syx[..., None])[..., 0]
    sigma2 = sxx - (syx * eta).sum(-1)
    ones = torch.ones_like(syx)[..., None]
    zeta = torch.linalg.solve(syy, ones)[..., 0]
    return {"eta": eta, "sigma2": sigma2, "delta": G_x - eta.sum(-1), "zeta": zeta}


# ---------------------------------------------------------------------------------------------- table builder
_TABLE_CACHE: dict[tuple, tuple] = {}
_TABLE_CACHE_SIZE = 32


def _jittered_conditionals(schedule: Schedule, gammas: np.ndarray, weights: np.ndarray, ts: np.ndarray,
                           cov: np.ndarray, jitter: float, x_offset: float, Ninv: np.ndarray) -> dict:
    """The tables of the official GFDM code's conditional: Σ_YY + jitter·diag(e^{−2γt}), Σ_XX + x_offset.

    η = (Σ_YY + J)⁻¹Σ_YX, σ̃² = Σ_XX + x_offset − Σ_XYη, ζ = (Σ_YY + J)⁻¹1 by plain Schur complements in
    float64 (the jitter bounds the conditioning that makes them fail in the exact model), and κ = δ/σ̃ with
    δ² = (σ̃²)′ − 2μσ̃², so that the reverse SDE of u has the marginals N(c x_0, σ̃²) the network is trained on.
    """
    K = gammas.size
    t = ts[:, None]
    syy = cov[:, 1:, 1:] + np.eye(K)[None] * (jitter * np.exp(-2.0 * gammas[None, :] * t))[:, :, None]
    syx, sxx = cov[:, 1:, 0], cov[:, 0, 0] + x_offset
    eta = np.linalg.solve(syy, syx[..., None])[..., 0]
    sigma2 = sxx - (syx * eta).sum(-1)
    if not (sigma2 > 0).all():
        raise ValueError(f"covariance_jitter={jitter:g}: the jittered conditional variance is not positive")
    zeta = np.linalg.solve(syy, np.ones((ts.size, K, 1)))[..., 0]
    # u = c x_0 + σ̃ ε is then a Gaussian diffusion with the schedule (c, σ̃); its reverse SDE needs
    # δ² = (σ̃²)′ − 2μσ̃² ≥ 0 (not G_x − 1ᵀη, which matches it only for the exact covariance):
    # κ√t = δ√t/σ̃ = √(d log σ̃²/d log t − 2μt)
    log_s2 = np.log(sigma2)
    log_t = np.log(ts)
    slope = CubicSpline(log_t, log_s2, bc_type="not-a-knot")(log_t, 1)
    growth = slope - 2.0 * schedule.mu(torch.from_numpy(ts)).numpy() * ts
    if not (growth >= 0).all():
        worst = int(np.argmin(growth))
        raise ValueError(f"covariance_jitter={jitter:g}: the jittered σ̃² is not a valid noise schedule "
                         f"((σ̃²)′ − 2μσ̃² < 0 at t = {ts[worst]:.3g}); use a smaller jitter")
    return {"log_sigma2": log_s2, "kappa_hat": np.sqrt(growth), "eta_newton": eta @ Ninv,
            "zeta": (zeta @ Ninv) * t ** np.arange(1, K + 1)[None, :]}


def _unresolved_message(gammas: np.ndarray, ts: np.ndarray, t_bad: float) -> str:
    return (f"the coefficient tables cannot be resolved in float64 for num_processes K = {gammas.size} with "
            f"gamma_max·T = {gammas.max() * ts[-1]:g} (the regression on the OU states loses all digits from "
            f"t = {t_bad:.3g} on). Supported, measured at H = 0.9 with the default rates: K <= 7 at "
            f"gamma_max·T = 20 (T = 1), K <= 3 at gamma_max·T <= 800, K <= 2 at gamma_max·T <= 2000; use fewer "
            f"processes (num_processes), a smaller gamma_max or a shorter horizon T")


def _build_tables(schedule: Schedule, gammas: np.ndarray, weights: np.ndarray, ts: np.ndarray,
                  jitter: float = 0.0, x_offset: float = 0.0) -> tuple[dict, dict]:
    """Values on the knots ``ts`` of every tabulated quantity, and facts about the continuation.

    Cached on (the schedule's values, γ, ω, knots, jitter, offset): building costs ~1 s for K = 5, and tests and
    sweeps rebuild the same dynamics many times.
    """
    schedule_key = schedule.cache_key()
    key = None if schedule_key is None else (schedule_key, gammas.tobytes(), weights.tobytes(), ts.tobytes(),
                                             float(jitter), float(x_offset))
    if key is not None and key in _TABLE_CACHE:
        return _TABLE_CACHE[key]
    sch = schedule
    K = gammas.size
    tt = torch.from_numpy(ts)
    info = {"continuation_time": 0.0, "eta_continuation_time": 0.0, "continuation_exponent": float(2 * K + 1)}
    cov = augmented_covariance(sch, gammas, weights, ts)
    tables = {"cov_x": cov[:, 0, :] / ts[:, None]}
    if K == 0:
        var = sch.brownian_variance(tt).numpy() if sch.has_closed_variance else cov[:, 0, 0]
        tables["log_sigma2"] = np.log(var)
    else:
        cond = _conditionals(sch, gammas, weights, ts)
        log_s2 = 2.0 * np.log(cond["sigma"])
        kappa_hat = cond["delta"] / cond["sigma"] * np.sqrt(ts)
        bad = cond["err"] > _CONTINUATION_TOL
        if bad.any():
            # Continue log σ̃² below the last unresolved knot with local slope p(t) = p∞ + (p* − p∞) t/t*:
            # p∞ = 2K + 1 is the generic small-t exponent, p* = t*(κ*² + 2μ*) the resolved slope at t*, so
            # log σ̃² and κ² = p(t)/t − 2μ (the identity (σ̃²)′ = 2μσ̃² + δ²) are continuous there.
            i0 = int(np.nonzero(bad)[0].max()) + 1
            if i0 >= ts.size - 8:
                raise ValueError(_unresolved_message(gammas, ts, float(ts[int(np.nonzero(bad)[0].min())])))
            t0 = ts[i0]
            info["continuation_time"] = float(t0)
            mu = sch.mu(tt).numpy()
            p_inf = float(2 * K + 1)
            p_star = kappa_hat[i0] ** 2 + 2 * mu[i0] * t0
            x = ts[:i0] / t0
            log_s2[:i0] = log_s2[i0] + p_inf * np.log(x) + (p_star - p_inf) * (x - 1)
            p_t = p_inf + (p_star - p_inf) * x
            kappa_hat[:i0] = np.sign(kappa_hat[i0]) * np.sqrt(np.maximum(p_t - 2 * mu[:i0] * ts[:i0], 0.0))
        N, Ninv, _ = newton_basis(gammas)
        eta_r = cond["eta_r"]
        g_t = sch.g(tt).numpy()
        eta_std = g_t[:, None] * weights[None, :] + eta_r @ N.numpy()          # η = g ω + Nᵀ η̃_R
        bad_eta = cond["err_eta"].max(axis=1) > _CONTINUATION_TOL * np.abs(eta_std).max(axis=1)
        if bad_eta.any():
            # η has a finite limit at 0 and is smooth in t: continue η̃_R linearly from the first resolved knots
            i1 = int(np.nonzero(bad_eta)[0].max()) + 1
            if i1 >= ts.size - 8:
                raise ValueError(_unresolved_message(gammas, ts, float(ts[int(np.nonzero(bad_eta)[0].min())])))
            slope = (eta_r[i1 + 1] - eta_r[i1]) / (ts[i1 + 1] - ts[i1])
            eta_r = eta_r.copy()
            eta_r[:i1] = eta_r[i1] + slope[None, :] * (ts[:i1, None] - ts[i1])
            info["eta_continuation_time"] = float(ts[i1])
        eta_newton = g_t[:, None] * (Ninv.numpy().T @ weights)[None, :] + eta_r
        tril = np.tril_indices(K)
        tables.update(log_sigma2=log_s2, kappa_hat=kappa_hat, eta_newton=eta_newton, zeta=cond["zeta"],
                      chol=cond["chol"][:, tril[0], tril[1]])
        info["relative_error"] = cond["err"]
        if jitter > 0:       # the paper-compatible conditional replaces the exact one
            tables.update(_jittered_conditionals(sch, gammas, weights, ts, cov, jitter, x_offset, Ninv.numpy()))
            info.update(continuation_time=0.0, eta_continuation_time=0.0)
        elif x_offset > 0:   # exact conditional plus a constant variance: η, ζ, δ unchanged, σ̃² + offset, κ = δ/σ̃
            log_s2_new = np.logaddexp(log_s2, math.log(x_offset))
            tables.update(log_sigma2=log_s2_new, kappa_hat=kappa_hat * np.exp(0.5 * (log_s2 - log_s2_new)))
    if key is not None:
        if len(_TABLE_CACHE) >= _TABLE_CACHE_SIZE:
            _TABLE_CACHE.pop(next(iter(_TABLE_CACHE)))
        _TABLE_CACHE[key] = (tables, info)
    return tables, info


# ---------------------------------------------------------------------------------------------- on-device splines
class _Spline(nn.Module):
    """Cubic splines in the grid variable v for several named quantities, stacked in one (n−1, 4, Q) float64
    buffer (one gather per evaluation); linear extrapolation below the first knot, so power laws in t
    continue as straight lines in log t."""

    coef: torch.Tensor

    def __init__(self, v: np.ndarray, values: dict[str, np.ndarray]):
        super().__init__()
        self.v0, self.dv, self.n = float(v[0]), float(v[1] - v[0]), v.size
        self.slices, cols, start = {}, [], 0
        for name, val in values.items():
            val = np.asarray(val, dtype=np.float64).reshape(v.size, -1)
            self.slices[name] = slice(start, start + val.shape[1])
            start += val.shape[1]
            cols.append(val)
        c = CubicSpline(v, np.concatenate(cols, axis=1), axis=0, bc_type="not-a-knot").c   # (4, n−1, Q)
        self.register_buffer("coef", torch.from_numpy(np.ascontiguousarray(np.moveaxis(c, 0, 1))))

    def forward(self, v: torch.Tensor, name: str | None = None) -> torch.Tensor:
        """Values at v, (*v.shape, Q) — or only the columns of ``name``."""
        pos = (v - self.v0) / self.dv
        idx = torch.clamp(torch.floor(pos), 0, self.n - 2).long()
        x = v - (self.v0 + idx.to(v.dtype) * self.dv)
        xc = torch.clamp(x, min=0.0, max=self.dv)[..., None]
        xl = torch.clamp(x, max=0.0)[..., None]
        c = self.coef[idx] if name is None else self.coef[idx][..., self.slices[name]]   # (*v.shape, 4, q)
        return ((c[..., 0, :] * xc + c[..., 1, :]) * xc + c[..., 2, :]) * xc + c[..., 3, :] + c[..., 2, :] * xl

    def take(self, values: torch.Tensor, name: str) -> torch.Tensor:
        return values[..., self.slices[name]]


@dataclass
class Marginal:
    """The law of Z_t given x_0 and the coefficients derived from it, for a tensor of times t.

    Shapes: scalars ``t.shape``; vectors ``(*t.shape, K)``; matrices ``(*t.shape, K, K)``.
    Attributes: ``c`` mean coefficient; ``sigma`` = σ̃, the std of u = x − ηᵀy given x_0; ``eta`` = Σ_YY⁻¹Σ_YX;
    ``cov_yy``, ``cov_xx``, ``cov_xy``; ``mu``, ``g``; ``delta`` = G_x − 1ᵀη; ``kappa`` = δ/σ̃;
    ``eta_newton`` = N⁻ᵀη and ``zeta_newton`` = (N Σ_YY Nᵀ)⁻¹ e_0 (Newton basis).
    """
    t: torch.Tensor
    c: torch.Tensor
    sigma: torch.Tensor
    eta: torch.Tensor
    cov_yy: torch.Tensor
    cov_xx: torch.Tensor
    cov_xy: torch.Tensor
    mu: torch.Tensor
    g: torch.Tensor
    delta: torch.Tensor
    kappa: torch.Tensor
    eta_newton: torch.Tensor
    zeta_newton: torch.Tensor


class LinearFractionalDynamics(nn.Module):
    """dX = μ(t) X dt + g(t) dB̂ per coordinate, B̂ a type II Markov noise with rates γ and weights ω.

    Args:
        schedule: the coefficients μ, g (a :class:`Schedule`); its ``horizon`` T is the time horizon.
        noise: the driving :class:`fracsde.MarkovNoise` (e.g. ``MarkovApproxFBM(0.9, 3, horizon=T)`` or
            ``MarkovNoise(gammas, weights)``), of kind ``"type2"`` (the OU states start at 0 with X);
            its rates must be distinct. ``None`` means B̂ = W exactly (K = 0).
        grid_size: knots of the float64 splines (uniform in v = log(t/T) + t/τ, τ = min(T/20, 1/γ_max)).
        t_min: smallest knot as a fraction of T; below it values continue as power laws.
        covariance_jitter: > 0 replaces the exact conditional law of X given Y by that of Σ_YY + jitter·diag(e^{−2γt})
            (the official GFDM code's, 1e−4 there): η, σ̃, δ, κ, ζ all come from the jittered covariance, in
            training and sampling alike, so a model reproduces the law its published numbers came from. 0: exact.
        x_variance_offset: added to Σ_XX (the official FVE's σ_min²; only for schedules with μ ≡ 0).

    All tables are buffers: ``.to(device)`` moves them, and every method evaluates on the device of ``t``.
    """

    gammas: torch.Tensor
    weights: torch.Tensor
    newton: torch.Tensor
    newton_inv: torch.Tensor
    newton_drift: torch.Tensor
    weights_newton: torch.Tensor

    def __init__(self, schedule: Schedule, noise: MarkovNoise | None = None, grid_size: int = 2048,
                 t_min: float = 1e-7, covariance_jitter: float = 0.0, x_variance_offset: float = 0.0):
        super().__init__()
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a fracsde.linear.Schedule, got {type(schedule).__name__}")
        if noise is not None and not isinstance(noise, MarkovNoise):
            raise TypeError(f"noise must be a fracsde.MarkovNoise (or None for Brownian motion); "
                            f"got {type(noise).__name__}")
        if noise is not None and get_kind(noise.kind).stationary_start:
            raise ValueError(f"LinearFractionalDynamics needs a noise of kind 'type2' (OU states start at 0 with "
                             f"the data); got kind={noise.kind!r}")
        V.check_positive_int(grid_size, "grid_size", 16)
        t_min = V.check_positive_float(t_min, "t_min")
        if t_min >= 0.01:
            raise ValueError(f"t_min must be < 0.01 (a fraction of the horizon); got {t_min}")
        self.schedule = schedule
        self.grid_size, self.t_min = grid_size, t_min
        self.covariance_jitter = V.check_positive_float(covariance_jitter, "covariance_jitter", 0.0, inclusive=True)
        self.x_variance_offset = V.check_positive_float(x_variance_offset, "x_variance_offset", 0.0, inclusive=True)
        if self.x_variance_offset and schedule.closed_form != "ve":
            raise ValueError(f"x_variance_offset needs a schedule with mu = 0 (VE type); got {schedule!r}")
        if (self.covariance_jitter or self.x_variance_offset) and noise is None:
            raise ValueError("covariance_jitter / x_variance_offset apply to fractional dynamics (a noise with K >= 1)")
        T = self.horizon = schedule.horizon
        empty = torch.zeros(0, dtype=torch.float64)
        g64 = empty if noise is None else torch.as_tensor(noise.gammas, dtype=torch.float64).detach().cpu()
        w64 = empty if noise is None else noise.weights.detach().to(torch.float64).cpu()
        K = self.num_processes = g64.numel()
        self.register_buffer("gammas", g64)
        self.register_buffer("weights", w64)
        N, Ninv, B = newton_basis(g64) if K else (torch.zeros(0, 0, dtype=torch.float64),) * 3
        self.register_buffer("newton", N)
        self.register_buffer("newton_inv", Ninv)
        self.register_buffer("newton_drift", B)
        self.register_buffer("weights_newton", Ninv.T @ w64 if K else w64)      # ω̃ = N⁻ᵀω: ωᵀY = ω̃ᵀỸ

        self.tau = min(T / 20.0, 1.0 / float(g64.max())) if K else T / 20.0
        v = np.linspace(log_linear_grid(t_min * T, T, self.tau), log_linear_grid(T, T, self.tau), grid_size)
        ts = log_linear_grid_times(v, T, self.tau)
        ts[-1] = T
        values, info = _build_tables(schedule, g64.numpy(), w64.numpy(), ts, self.covariance_jitter,
                                     self.x_variance_offset)
        #: below these times σ̃/κ (resp. η) are power-law (resp. linear) continuations, not resolved values
        self.continuation_time = info["continuation_time"]
        self.eta_continuation_time = info["eta_continuation_time"]
        self.continuation_exponent = info["continuation_exponent"]
        self.spline = _Spline(v, values)
        self._log_snr_setup(ts)

    def _apply(self, fn, recurse=True):
        """Device moves apply; dtype casts (``.half()``, ``.to(torch.float32)``) do not — the tables stay float64."""
        probe = fn(torch.zeros((), dtype=torch.float64, device=self.gammas.device))
        if probe.dtype != torch.float64:
            device = probe.device
            return super()._apply(lambda t: t.to(device), recurse)
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------ evaluation
    def _v(self, t64: torch.Tensor) -> torch.Tensor:
        return torch.log(t64 / self.horizon) + t64 / self.tau

    def check_times(self, t, name: str = "t") -> torch.Tensor:
        """Validate t ∈ (0, T] and return it as a float64 tensor on the buffers' device."""
        t = torch.as_tensor(t)
        if not t.is_floating_point():
            t = t.to(torch.float64)
        bad = ~((t > 0) & (t <= self.horizon * (1 + 1e-6)))
        if bool(bad.any()):
            raise ValueError(f"{name} must lie in (0, T] with T = {self.horizon:g}; "
                             f"got values in [{float(t.min())}, {float(t.max())}]")
        return t

    def mean_coefficient(self, t: torch.Tensor) -> torch.Tensor:
        """c(t) = exp ∫_0^t μ (exact), in t's dtype."""
        t64 = t.to(torch.float64)
        return torch.exp(self.schedule.log_c(t64)).to(t.dtype)

    def conditional_std(self, t: torch.Tensor) -> torch.Tensor:
        """σ̃(t), the std of u = x − ηᵀy given x_0, in t's dtype."""
        t64 = t.to(torch.float64)
        if self.num_processes == 0 and self.schedule.has_closed_variance:
            return torch.sqrt(self.schedule.brownian_variance(t64)).to(t.dtype)
        return torch.exp(0.5 * self.spline(self._v(t64), "log_sigma2")[..., 0]).to(t.dtype)

    # ------------------------------------------------------------------ the log-SNR view
    def _log_sigma2(self, t64: torch.Tensor) -> torch.Tensor:
        """log σ̃²(t), float64, from the stable tables (never the log of a rounded σ̃)."""
        if self.num_processes == 0 and self.schedule.has_closed_variance:
            return torch.log(self.schedule.brownian_variance(t64))
        return self.spline(self._v(t64), "log_sigma2")[..., 0]

    def _log_snr64(self, t64: torch.Tensor) -> torch.Tensor:
        return 2.0 * self.schedule.log_c(t64) - self._log_sigma2(t64)

    def _log_snr_setup(self, knots: np.ndarray) -> None:
        """λ at T and at the smallest knot, whether λ decreases, and the prior-mismatch warning (at build time)."""
        t = torch.from_numpy(np.asarray(knots, dtype=np.float64))
        lam = self._log_snr64(t)
        self.log_snr_min_time = float(t[0])
        #: (λ(T), λ(smallest tabulated t)): the log-SNR range the model covers; λ(T) < λ(t_min)
        self.log_snr_range = (float(lam[-1]), float(lam[0]))
        self.log_snr_decreasing = bool((lam[1:] < lam[:-1]).all())
        terminal = self.log_snr_range[0]
        if terminal > PRIOR_MISMATCH_LOG_SNR:
            warnings.warn(
                f"terminal log-SNR λ(T) = 2 log(c(T)/σ̃(T)) = {terminal:.2f} > {PRIOR_MISMATCH_LOG_SNR:g}: the data-"
                f"independent prior N(0, Σ_T) ignores a signal of relative size e^(λ(T)/2) = "
                f"{math.exp(terminal / 2):.3g} of the data scale, so samples start from the wrong law. Use fewer "
                f"OU processes, a larger beta_max / sigma_max, or a longer horizon.", PriorMismatchWarning,
                stacklevel=user_stacklevel())

    def log_snr(self, t, check: bool = True) -> torch.Tensor:
        """λ(t) = 2 log(c(t)/σ̃(t)), the log signal-to-noise ratio of u = c x_0 + σ̃ ε, float64.

        Computed as 2 ∫_0^t μ − log σ̃² from the stable tables, so it stays accurate where σ̃ is far below float
        resolution (λ reaches ~35 for FVP(0.9, 3) at t = 1e−3). ``t`` in (0, T] (validated unless
        ``check=False``, which hot loops use: no host sync).
        """
        t = torch.as_tensor(t)
        t = (self.check_times(t) if check else t).to(self.gammas.device)
        return self._log_snr64(t.to(torch.float64))

    def time_at_log_snr(self, lam, check: bool = True) -> torch.Tensor:
        """The inverse of :meth:`log_snr`: t with λ(t) = ``lam`` (float64, any shape), on the buffers' device.

        ``lam`` must lie in :attr:`log_snr_range` = (λ(T), λ(t_min)); solved by 64 vectorised bisection steps in
        log t (λ is strictly decreasing for every FVP/FVE; a schedule whose λ is not is refused). ``check=False``
        skips the range check (one host sync) for hot loops; values outside then map to the nearest end.
        """
        if not self.log_snr_decreasing:
            raise ValueError("time_at_log_snr needs a log-SNR that decreases in t; this schedule's does not")
        lam = torch.as_tensor(lam, dtype=torch.float64, device=self.gammas.device)
        lo_lam, hi_lam = self.log_snr_range
        bad = ~((lam >= lo_lam) & (lam <= hi_lam))           # NaN is bad too
        if check and bool(bad.any()):
            raise ValueError(f"lam must lie in the model's log-SNR range [λ(T), λ(t_min)] = [{lo_lam:.4g}, "
                             f"{hi_lam:.4g}] (t_min = {self.log_snr_min_time:.3g}); got values in "
                             f"[{float(lam.min()):.4g}, {float(lam.max()):.4g}]")
        lo = torch.full_like(lam, math.log(self.log_snr_min_time))    # λ(lo) ≥ lam
        hi = torch.full_like(lam, math.log(self.horizon))             # λ(hi) ≤ lam
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            above = self._log_snr64(torch.exp(mid)) > lam
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return torch.clamp(torch.exp(0.5 * (lo + hi)), max=self.horizon)

    def coefficients(self, t: torch.Tensor) -> dict:
        """The reverse-time coefficients at t (float64): mu, g, c, sigma, delta, kappa, eta_newton, zeta_newton."""
        t64 = t.to(torch.float64)
        K = self.num_processes
        sch = self.schedule
        out = {"mu": sch.mu(t64), "g": sch.g(t64), "c": torch.exp(sch.log_c(t64))}
        if K == 0:
            out["sigma"] = sigma = self.conditional_std(t64)
            out["delta"] = out["g"]
            out["kappa"] = out["g"] / sigma
            out["eta_newton"] = t64.new_zeros(*t64.shape, 0)
            out["zeta_newton"] = t64.new_zeros(*t64.shape, 0)
            return out
        vals = self.spline(self._v(t64))
        take = self.spline.take
        out["sigma"] = sigma = torch.exp(0.5 * take(vals, "log_sigma2")[..., 0])
        kappa = take(vals, "kappa_hat")[..., 0] / torch.sqrt(t64)
        out["kappa"] = kappa
        out["delta"] = kappa * sigma
        out["eta_newton"] = take(vals, "eta_newton")
        powers = torch.arange(1, K + 1, dtype=torch.float64, device=t64.device)
        out["zeta_newton"] = take(vals, "zeta") / t64[..., None] ** powers
        return out

    def newton_cov_factor(self, t: torch.Tensor) -> torch.Tensor:
        """(*t.shape, K, K) lower-triangular L with L Lᵀ = N Σ_YY Nᵀ (float64), accurate at all t."""
        t64 = t.to(torch.float64)
        K = self.num_processes
        if K == 0:
            return t64.new_zeros(*t64.shape, 0, 0)
        flat = self.spline(self._v(t64), "chol")
        L = t64.new_zeros(*t64.shape, K, K)
        tril = torch.tril_indices(K, K, device=t64.device)
        L[..., tril[0], tril[1]] = flat
        scale = t64[..., None] ** (torch.arange(K, dtype=torch.float64, device=t64.device) + 0.5)
        return scale[..., :, None] * L

    def cov_yy(self, t: torch.Tensor) -> torch.Tensor:
        """(*t.shape, K, K) closed form (1 − e^{−(γ_i+γ_j)t})/(γ_i+γ_j), float64."""
        t64 = t.to(torch.float64)
        s = self.gammas[:, None] + self.gammas[None, :]
        return -torch.expm1(-s * t64[..., None, None]) / s

    def marginal(self, t) -> Marginal:
        """The conditional law of Z_t given x_0 (see :class:`Marginal`), in t's dtype (float32 for integer t)."""
        t = self.check_times(t)
        dtype = t.dtype
        t = t.to(self.gammas.device)
        t64 = t.to(torch.float64)
        coef = self.coefficients(t64)
        K = self.num_processes
        cov_x = self.spline(self._v(t64), "cov_x") * t64[..., None]
        eta = coef["eta_newton"] @ self.newton if K else coef["eta_newton"]          # η = Nᵀη̃
        cast = lambda x: x.to(dtype)  # noqa: E731
        return Marginal(t=t, c=cast(coef["c"]), sigma=cast(coef["sigma"]), eta=cast(eta), cov_yy=cast(self.cov_yy(t64)),
                        cov_xx=cast(cov_x[..., 0]), cov_xy=cast(cov_x[..., 1:]), mu=cast(coef["mu"]), g=cast(coef["g"]),
                        delta=cast(coef["delta"]), kappa=cast(coef["kappa"]), eta_newton=cast(coef["eta_newton"]),
                        zeta_newton=cast(coef["zeta_newton"]))

    def drift_matrix(self, t) -> torch.Tensor:
        """F(t), (*t.shape, K+1, K+1), float64 (see :func:`fracsde.numerics.augmented_system`)."""
        t64 = torch.as_tensor(t, dtype=torch.float64, device=self.gammas.device)
        return augmented_system(self.schedule.mu(t64), self.schedule.g(t64), self.weights, self.gammas)[0]

    def diffusion_vector(self, t) -> torch.Tensor:
        """G(t) = (g Σω, 1, …, 1), (*t.shape, K+1), float64 (Σω := 1 when K = 0)."""
        t64 = torch.as_tensor(t, dtype=torch.float64, device=self.gammas.device)
        return augmented_system(self.schedule.mu(t64), self.schedule.g(t64), self.weights, self.gammas)[1]

    # ------------------------------------------------------------------ basis changes and sampling
    def to_newton(self, y: torch.Tensor) -> torch.Tensor:
        """ỹ = N y on the last axis."""
        return y @ self.newton.to(y.dtype).T

    def from_newton(self, y_newton: torch.Tensor) -> torch.Tensor:
        """y = N⁻¹ ỹ on the last axis."""
        return y_newton @ self.newton_inv.to(y_newton.dtype).T

    def sample_marginal(self, x0: torch.Tensor, t, generator: torch.Generator | None = None,
                        return_newton: bool = False):
        """An exact draw of Z_t given x_0: returns (x_t, y_t) with y_t of shape (*x0.shape, K).

        ``t`` is a scalar or a (batch,) tensor (one time per sample). Drawn as y ~ N(0, Σ_YY) through the
        Newton-basis Cholesky factor and u = c x_0 + σ̃ ε, x = u + ηᵀy (u is independent of y).
        """
        tb = self._batch_times(t, x0)
        K = self.num_processes
        coef = self.coefficients(tb)
        bshape = (-1,) + (1,) * (x0.dim() - 1)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        u = coef["c"].to(x0.dtype).view(bshape) * x0 + coef["sigma"].to(x0.dtype).view(bshape) * eps
        xi = torch.randn(*x0.shape, K, generator=generator, dtype=x0.dtype, device=x0.device)
        L = self.newton_cov_factor(tb).to(x0.dtype).view(tb.shape[0], *(1,) * (x0.dim() - 1), K, K)
        y_newton = (L @ xi[..., None])[..., 0]
        x = u + (y_newton * coef["eta_newton"].to(x0.dtype).view(tb.shape[0], *(1,) * (x0.dim() - 1), K)).sum(-1)
        return (x, y_newton) if return_newton else (x, self.from_newton(y_newton))

    def _batch_times(self, t, x0):
        t = torch.as_tensor(t, device=x0.device)
        if not t.is_floating_point():
            t = t.to(torch.float64)
        if t.dim() == 0:
            t = t.expand(x0.shape[0])
        if t.shape != (x0.shape[0],):
            raise ValueError(f"t must be a scalar or have shape (batch,) = ({x0.shape[0]},); got {tuple(t.shape)}")
        return self.check_times(t).to(torch.float64)

    def prior_sample(self, shape, generator: torch.Generator | None = None, device=None,
                     dtype: torch.dtype = torch.float32, return_newton: bool = False):
        """A draw of the data-independent terminal law N(0, Σ_T): (x, y) with x: ``shape``, y: (*shape, K).

        As in VP/VE, c(T) x_0 is neglected; for K ≥ 1 σ̃(T) can be much smaller than √Σ_XX(T), so check
        ``c(T)·(data scale) / σ̃(T)`` (see docs/gfdm.md) before trusting this prior.
        """
        shape = check_shape(shape)
        device = torch.device(device) if device is not None else self.gammas.device
        K = self.num_processes
        T = torch.tensor(self.horizon, dtype=torch.float64, device=self.gammas.device)
        coef = self.coefficients(T)
        u = torch.randn(shape, generator=generator, dtype=dtype, device=device) * coef["sigma"].to(device, dtype)
        xi = torch.randn(*shape, K, generator=generator, dtype=dtype, device=device)
        y_newton = xi @ self.newton_cov_factor(T).to(device, dtype).T
        x = u + (y_newton * coef["eta_newton"].to(device, dtype)).sum(-1)
        return (x, y_newton) if return_newton else (x, self.from_newton(y_newton))

    def extra_repr(self) -> str:
        return f"schedule={self.schedule!r}, num_processes={self.num_processes}, horizon={self.horizon:g}"
