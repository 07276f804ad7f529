"""Numerical building blocks shared across fracsde: factorisations, grids, linear SDEs.

Each computation exists once, here, and is public because several modules need it:

* :func:`psd_factor` — a factor of a (nearly singular) PSD matrix for *sampling*; :func:`jittered_cholesky` —
  a differentiable Cholesky factor for *likelihoods*. They differ on purpose and are named for what they do.
* :func:`is_uniform_grid` — one rule, from the grid's own floating-point precision, for "these steps are equal".
* :func:`augmented_system` — the drift matrix F and diffusion vector G of z = (X, Y_1..Y_K) for
  dX = μX dt + g dB̂, B̂ = ωᵀY (REFERENCE §3-4); :func:`discretize_linear_sde` — its exact transition.
* :func:`check_shape`, :func:`log_linear_grid` / :func:`log_linear_grid_times` — small helpers used by the
  diffusion code and its likelihood.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["psd_factor", "graded_psd_factor", "step_key", "jittered_cholesky", "is_uniform_grid", "UNIFORM_GRID_ULPS",
           "augmented_system",
           "discretize_linear_sde", "check_shape", "log_linear_grid", "log_linear_grid_times"]

#: Steps count as equal when they differ by at most this many ulps of the grid's largest time: the rounding
#: of each time is ½ ulp, so the steps of an exactly uniform grid stored in floating point differ by ≤ 1 ulp;
#: the margin covers grids built by cumulative sums or unit conversions.
UNIFORM_GRID_ULPS = 16.0


def psd_factor(cov: torch.Tensor) -> torch.Tensor:
    """A factor L with L Lᵀ = cov for (batched) PSD matrices that may be numerically singular (float64).

    Cholesky (lower triangular, so mixing normals costs K(K+1)/2 multiply-adds) where it succeeds for
    every matrix of the batch; otherwise a symmetric eigen-factor with clamped eigenvalues (e.g. the OU
    innovation covariance over a very short step is ≈ h·11ᵀ, rank one). For sampling; not meant for gradients.
    """
    cov = cov.to(torch.float64)
    L, info = torch.linalg.cholesky_ex(cov)
    if not bool((info != 0).any()):
        return L
    evals, evecs = torch.linalg.eigh(cov)
    return evecs * torch.sqrt(torch.clamp(evals, min=0.0))[..., None, :]


def step_key(h: float) -> float:
    """A step size rounded to 12 significant digits: the cache key under which equal steps computed by different
    divisions (Δt/n of several intervals, equal up to the last bits) share their step operators."""
    return float(f"{h:.12g}")


def graded_psd_factor(cov: torch.Tensor) -> torch.Tensor:
    """:func:`psd_factor` of D^{−½} cov D^{−½} (D = diag(cov)), scaled back: accurate entry by entry for graded
    matrices whose variances span many orders (OU innovations with rates 1e−1..1e27 have variances h..1e−27,
    where an unscaled factor is accurate only relative to the largest). Zero variances stay zero. float64.
    """
    cov = cov.to(torch.float64)
    d = torch.sqrt(torch.diagonal(cov, dim1=-2, dim2=-1).clamp(min=0.0))
    inv = torch.where(d > 0, 1.0 / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(d))
    scaled = cov * inv[..., :, None] * inv[..., None, :]
    return d[..., :, None] * psd_factor(scaled)


def jittered_cholesky(cov: torch.Tensor, relative_jitter: float = 1e-13) -> torch.Tensor:
    """Differentiable Cholesky factor of cov + ε I, ε = ``relative_jitter`` · trace(cov) (+1e−300).

    For nearly singular PSD step covariances inside a likelihood or ``rsample``: the MA-fBM step covariance
    is nearly rank one (cond up to 1e18), and this jitter perturbs the law by a relative 1e−13 — far below
    anything a sample can resolve — while keeping Cholesky and its backward pass well defined.
    """
    D = cov.shape[-1]
    tr = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
    eps = (relative_jitter * tr + 1e-300)[..., None, None]
    return torch.linalg.cholesky(cov + eps * torch.eye(D, dtype=cov.dtype, device=cov.device))


def is_uniform_grid(ts: torch.Tensor) -> bool:
    """Whether the 1-D grid ``ts`` has equal steps up to its own rounding (see :data:`UNIFORM_GRID_ULPS`).

    Grids with fewer than two steps count as uniform. One host sync.
    """
    if ts.numel() < 3:
        return True
    d = torch.diff(ts)
    tol = UNIFORM_GRID_ULPS * torch.finfo(ts.dtype).eps * float(ts.detach().abs().max())
    return bool(((d - d[:1]).abs() <= tol).all())


def augmented_system(mu: torch.Tensor, g: torch.Tensor, weights: torch.Tensor, gammas: torch.Tensor):
    """Drift matrix F (*B, K+1, K+1) and diffusion vector G (*B, K+1) of z = (X, Y_1..Y_K):

        dX = [μX − g Σ_k ω_k γ_k Y_k] dt + g (Σ_k ω_k) dW,   dY_k = −γ_k Y_k dt + dW,

    F = [[μ, −gω_1γ_1, …, −gω_Kγ_K], [0, −diag(γ)]], G = (gΣω, 1, …, 1). ``mu`` and ``g`` have the batch
    shape *B (or are 0-d), ``weights`` (*B, K) or (K,), ``gammas`` (K,). K = 0 is B̂ = W (Σω := 1).
    """
    K = gammas.numel()
    batch = torch.broadcast_shapes(mu.shape, g.shape, weights.shape[:-1])
    dtype = torch.promote_types(torch.promote_types(mu.dtype, g.dtype), weights.dtype)
    F = torch.zeros(batch + (K + 1, K + 1), dtype=dtype, device=gammas.device)
    F[..., 0, 0] = mu
    wsum = weights.sum(-1) if K else torch.ones((), dtype=dtype, device=gammas.device)
    if K:
        F[..., 0, 1:] = -g[..., None] * weights * gammas
        F[..., 1:, 1:] = torch.diag(-gammas)
    G = torch.cat([(g * wsum).expand(batch)[..., None], torch.ones(batch + (K,), dtype=dtype, device=gammas.device)],
                  -1)
    return F, G


def discretize_linear_sde(F: torch.Tensor, G: torch.Tensor, steps: torch.Tensor):
    """Exact transition of dz = Fz dt + G dW over each step h: A = e^{Fh}, Q = ∫_0^h e^{Fs} G Gᵀ e^{Fᵀs} ds.

    F (*B, D, D), G (*B, D), steps (S,) ≥ 0  →  A, Q of shape (*B, S, D, D), float64.
    Van Loan: expm([[−F, GGᵀ], [0, Fᵀ]] h) = [[·, M12], [0, M22]], A = M22ᵀ, Q = A M12. The
    block e^{−Fh} grows like e^{‖F‖h} and would swamp Q in round-off, so the exponential is
    taken over h / 2^m with ‖F‖ h / 2^m ≤ 1 and the step is doubled m times,
    Q(2h) = Q(h) + A(h) Q(h) A(h)ᵀ, A(2h) = A(h)² — every term positive semi-definite.
    """
    D = F.shape[-1]
    norm = float(F.detach().abs().sum(-1).amax()) if F.numel() else 0.0
    h_max = float(steps.detach().max()) if steps.numel() else 0.0
    m = math.ceil(math.log2(norm * h_max)) if norm * h_max > 1 else 0
    h = (steps / 2 ** m)[:, None, None]
    F_ = F.unsqueeze(-3)
    GG = (G[..., :, None] * G[..., None, :]).unsqueeze(-3)
    top = torch.cat([-F_ * h, GG * h], -1)
    bottom = torch.cat([torch.zeros_like(top[..., :D]).expand(top.shape[:-1] + (D,)), F_.transpose(-1, -2) * h], -1)
    E = torch.linalg.matrix_exp(torch.cat([top, bottom], -2))
    A = E[..., D:, D:].transpose(-1, -2)
    Q = A @ E[..., :D, D:]
    Q = 0.5 * (Q + Q.transpose(-1, -2))
    for _ in range(m):
        Q = Q + A @ Q @ A.transpose(-1, -2)
        A = A @ A
    return A, Q


def check_shape(shape, name: str = "shape") -> tuple:
    """A sample shape ``(batch, *data_shape)`` of positive ints, as a tuple (an int means ``(int,)``)."""
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if isinstance(shape, int):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)) or len(shape) == 0 or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ValueError(f"{name} must be a non-empty tuple of positive ints (batch, *data_shape); got {shape!r}")
    return tuple(shape)


def log_linear_grid(t, horizon: float, tau: float):
    """v(t) = log(t/T) + t/τ: logarithmic near 0 (resolves power laws), uniform near T (resolves e^{−t/τ})."""
    return np.log(t / horizon) + t / tau


def log_linear_grid_times(v, horizon: float, tau: float):
    """The inverse of :func:`log_linear_grid`: t with log(t/T) + t/τ = v (Newton on log t; numpy in and out)."""
    s = np.minimum(v + math.log(horizon), np.log(tau * np.maximum(v, 1e-300)))   # below the root
    for _ in range(100):   # Newton on s = log t for log t − log T + e^s/τ = v (monotone, converges fast)
        e = np.exp(s)
        f = s - math.log(horizon) + e / tau - v
        s = s - f / (1.0 + e / tau)
    return np.exp(s)
