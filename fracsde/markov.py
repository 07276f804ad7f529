"""The Markov approximation of fractional Brownian motion (MA-fBM).

fBM is not Markov, but its kernel is a superposition of exponentials, so a weighted sum of
K Ornstein–Uhlenbeck processes driven by ONE Brownian motion W approximates it:

    dY_k = −γ_k Y_k dt + dW_t,     B̂_t = Σ_k ω_k Y_k(t)              (type II, Y(0) = 0)
                                   B̂_t = Σ_k ω_k (Y_k(t) − Y_k(0))  (type I, Y(0) stationary)

(Harms & Stefanovits 2019; Daems et al. 2024; Nobis et al. 2024). The weights ω minimise
∫_0^T E[(B_t − B̂_t)²] dt, a quadratic ωᵀAω − 2bᵀω + c with closed-form A, b, c, solved in
float64. Everything here is a torch op, so ω is differentiable in the Hurst index.
"""
from __future__ import annotations

import math
import warnings
from functools import lru_cache
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import nn

from . import _validation as V
from ._warnings import IllConditionedWarning
from .special import gammainc

__all__ = ["MarkovApproxFBM", "geometric_gammas", "optimal_weights", "WeightSolution"]

#: Above this condition number of A the weight solve loses > 10 of float64's 16 digits.
ILL_CONDITIONED = 1e10


def geometric_gammas(num_processes: int, gamma_max: float = 20.0, dtype=torch.float64, device=None) -> torch.Tensor:
    """Geometric rate grid centred at 1: γ_k = γ_max^{(2k − K − 1)/(K − 1)}, k = 1..K (K = 1 gives [1])."""
    V.check_positive_int(num_processes, "num_processes", 1)
    gamma_max = V.check_positive_float(gamma_max, "gamma_max", 1.0)
    if num_processes == 1:
        return torch.ones(1, dtype=dtype, device=device)
    k = torch.arange(1, num_processes + 1, dtype=torch.float64)
    exponents = (2 * k - num_processes - 1) / (num_processes - 1)
    return (gamma_max ** exponents).to(dtype=dtype, device=device)


class WeightSolution(NamedTuple):
    weights: torch.Tensor          # (K,) float64
    relative_error: torch.Tensor   # 0-d: relative L2 error 1 − bᵀω / c
    condition_number: float        # cond(A), 2-norm


@lru_cache(maxsize=4)
def _laguerre(n: int):
    x, w = np.polynomial.laguerre.laggauss(n)
    return torch.from_numpy(x), torch.from_numpy(w)


def _scaled_upper_gamma(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """e^x Q(a, x) = (1/Γ(a)) ∫_0^∞ (x + v)^{a−1} e^{−v} dv, differentiable in a.

    e^x(1 − P) cancels catastrophically once P ≈ 1, so for x > 4 the Laguerre integral
    (smooth integrand there) is used instead. Both branches agree to ~1e−13 (tested).
    """
    direct = torch.exp(x) * (1 - gammainc(a, torch.clamp(x, max=4.0)))
    nodes, wts = _laguerre(96)
    nodes, wts = nodes.to(x), wts.to(x)
    xq = torch.clamp(x, min=4.0).unsqueeze(-1)
    quad = (wts * (xq + nodes) ** (a.unsqueeze(-1) - 1)).sum(-1) / torch.exp(torch.lgamma(a))
    return torch.where(x <= 4.0, direct, quad)


def _gram_type2(g: torch.Tensor, T: float) -> torch.Tensor:
    s = g[:, None] + g[None, :]
    return (T + torch.expm1(-s * T) / s) / s


def _gram_type1(g: torch.Tensor, T: float) -> torch.Tensor:
    s = g[:, None] + g[None, :]
    m = -torch.expm1(-g * T) / g          # (1 − e^{−γT})/γ
    return (2 * T - m[:, None] - m[None, :]) / s


def _moments_type2(h: torch.Tensor, g: torch.Tensor, T: float):
    """b_k = ∫_0^T E[B_t Y_k(t)] dt and c = ∫_0^T E[B_t²] dt for Riemann–Liouville fBM."""
    a = h + 0.5
    x = g * T
    b = g ** (-a) * (T * gammainc(a, x) - a / g * gammainc(a + 1, x))
    c = T ** (2 * h + 1) / (2 * h * (2 * h + 1) * torch.exp(2 * torch.lgamma(a)))
    return b, c


def _moments_type1(h: torch.Tensor, g: torch.Tensor, T: float):
    """Same for standard (Mandelbrot–van Ness, Var B_1 = 1) fBM against Y_k(t) − Y_k(0).

    With the unnormalised MvN kernel (1/Γ(H+½))[(t−s)_+^{H−½} − (−s)_+^{H−½}]:
      E[B_t Y_k(t)] = γ^{−a}(1 − e^{−γt}),   E[B_t Y_k(0)] = γ^{−a}(e^{γt} Q(a, γt) − 1),  a = H + ½,
    and ∫_0^X e^x Q(a, x) dx = e^X Q(a, X) − 1 + X^a / Γ(a + 1). The unnormalised process has
    Var B_1 = 1 / (Γ(2H + 1) sin πH); b is rescaled to the standard one.
    """
    a = h + 0.5
    x = g * T
    m = -torch.expm1(-x) / g
    integral_q = (_scaled_upper_gamma(a, x) - 1 + torch.exp(a * torch.log(x) - torch.lgamma(a + 1))) / g
    b_mvn = g ** (-a) * (2 * T - m - integral_q)
    norm = torch.sqrt(torch.exp(torch.lgamma(2 * h + 1)) * torch.sin(math.pi * h))
    c = T ** (2 * h + 1) / (2 * h + 1)
    return b_mvn * norm, c


def _solve_weights(h: torch.Tensor, g: torch.Tensor, kind: str, horizon: float):
    """Unchecked float64 solve (no host syncs): returns (ω, relative error, A)."""
    if kind == "type2":
        A = _gram_type2(g, horizon)
        b, c = _moments_type2(h, g, horizon)
    else:
        A = _gram_type1(g, horizon)
        b, c = _moments_type1(h, g, horizon)
    w = torch.linalg.solve(A, b)
    return w, 1 - (b @ w) / c, A


def optimal_weights(hurst, gammas, kind: str = "type2", horizon: float = 1.0) -> WeightSolution:
    """L2-optimal MA-fBM weights on [0, horizon], solved in float64 (differentiable in ``hurst``)."""
    V.check_kind(kind)
    horizon = V.check_positive_float(horizon, "horizon")
    V.check_hurst(hurst)
    g = torch.as_tensor(gammas).to(torch.float64)
    if g.dim() != 1 or g.numel() < 1:
        raise ValueError(f"gammas must be a non-empty 1-D sequence; got shape {tuple(g.shape)}")
    if not bool((g > 0).all()) or not bool(torch.isfinite(g).all()):
        raise ValueError(f"gammas must be finite and > 0; got {g.tolist()}")
    h = torch.as_tensor(hurst, dtype=torch.float64, device=g.device)
    w, rel, A = _solve_weights(h, g, kind, horizon)
    return WeightSolution(w, rel, float(torch.linalg.cond(A.detach())))


def _pair_sums(g: torch.Tensor) -> torch.Tensor:
    return g[:, None] + g[None, :]


class MarkovApproxFBM(nn.Module):
    """Markov approximation of fBM: K Ornstein–Uhlenbeck processes driven by one Brownian motion.

    Args:
        hurst: Hurst index H in (0, 1).
        num_processes: K ≥ 1, number of OU processes (ignored when ``gammas`` is given).
        gamma_max: > 1, the largest rate of the geometric grid (GFDM uses 20).
        gammas: explicit positive rates; overrides the geometric grid.
        kind: ``"type2"`` (Riemann–Liouville, Y(0) = 0) or ``"type1"`` (Mandelbrot–van Ness,
            stationary OU start, B̂_t = Σω(Y(t) − Y(0))).
        horizon: T > 0, the interval [0, T] on which ω is L2-optimal.
        learnable_hurst: make H an ``nn.Parameter`` (stored as logit(H), so it stays in (0, 1));
            ω is then recomputed, differentiably, on every access of :attr:`weights`.

    Example:
        >>> noise = MarkovApproxFBM(hurst=0.7, num_processes=3)
        >>> paths = noise.sample(torch.linspace(0, 1, 101), batch_size=8)   # (8, 101)
    """

    def __init__(self, hurst: float, num_processes: int = 3, gamma_max: float = 20.0,
                 gammas=None, kind: str = "type2", horizon: float = 1.0, learnable_hurst: bool = False):
        super().__init__()
        V.check_hurst(hurst)
        self.kind = V.check_kind(kind)
        self.horizon = V.check_positive_float(horizon, "horizon")
        if gammas is None:
            V.check_positive_int(num_processes, "num_processes", 1)
            self.gamma_max = V.check_positive_float(gamma_max, "gamma_max", 1.0)
            g = geometric_gammas(num_processes, self.gamma_max)
        else:
            g = torch.as_tensor(gammas, dtype=torch.float64).detach().clone().cpu()
            if g.dim() != 1 or g.numel() < 1:
                raise ValueError(f"gammas must be a non-empty 1-D sequence; got shape {tuple(g.shape)}")
            if not bool((g > 0).all()) or not bool(torch.isfinite(g).all()):
                raise ValueError(f"gammas must be finite and > 0; got {g.tolist()}")
            self.gamma_max = float(g.max())
        self.register_buffer("gammas", g)
        self.learnable_hurst = bool(learnable_hurst)
        h0 = torch.as_tensor(float(hurst), dtype=torch.float64)
        if self.learnable_hurst:
            self.hurst_logit = nn.Parameter(torch.logit(h0))
        else:
            self.register_buffer("_hurst", h0)
        sol = optimal_weights(h0, g, self.kind, self.horizon)
        if sol.condition_number > ILL_CONDITIONED:
            warnings.warn(
                f"MA-fBM weight system is ill-conditioned (cond(A) = {sol.condition_number:.2e} for K = {g.numel()}, "
                f"gamma_max = {self.gamma_max:g}); solved in float64 the achieved relative L2 error is "
                f"{float(sol.relative_error):.3e}. More processes barely help at fixed gamma_max.",
                IllConditionedWarning, stacklevel=2)
        self.condition_number = sol.condition_number
        if not self.learnable_hurst:
            self.register_buffer("_weights", sol.weights.detach())
            self.register_buffer("_relative_error", sol.relative_error.detach())

    # ------------------------------------------------------------------ parameters
    @property
    def num_processes(self) -> int:
        return self.gammas.numel()

    @property
    def hurst(self) -> torch.Tensor:
        if self.learnable_hurst:
            return torch.sigmoid(self.hurst_logit)
        return self._hurst

    def _solve(self):
        w, rel, _ = _solve_weights(self.hurst, self.gammas.to(torch.float64), self.kind, self.horizon)
        return w, rel

    @property
    def weights(self) -> torch.Tensor:
        """(K,) L2-optimal weights ω (float64; differentiable in H when it is learnable)."""
        if self.learnable_hurst:
            return self._solve()[0]
        return self._weights

    @property
    def approximation_error(self) -> torch.Tensor:
        """Relative L2 error ∫E[(B − B̂)²] / ∫E[B²] over [0, horizon] at the optimal weights."""
        if self.learnable_hurst:
            return self._solve()[1]
        return self._relative_error

    def extra_repr(self) -> str:
        return (f"hurst={float(self.hurst.detach()):.4g}, num_processes={self.num_processes}, kind={self.kind!r}, "
                f"gamma_max={self.gamma_max:g}, horizon={self.horizon:g}, learnable_hurst={self.learnable_hurst}")

    # ------------------------------------------------------------------ second moments
    def stationary_covariance(self) -> torch.Tensor:
        """(K, K) stationary covariance of the OU states: 1/(γ_i + γ_j)."""
        g = self.gammas.to(torch.float64)
        return 1.0 / _pair_sums(g)

    def ou_covariance(self, h) -> torch.Tensor:
        """(*h.shape, K, K) covariance of the OU innovation over a step h: (1 − e^{−(γ_i+γ_j)h})/(γ_i+γ_j)."""
        g = self.gammas.to(torch.float64)
        h = torch.as_tensor(h, dtype=torch.float64, device=g.device)
        s = _pair_sums(g)
        return -torch.expm1(-s * h[..., None, None]) / s

    def covariance(self, s, t) -> torch.Tensor:
        """Closed-form Cov(B̂_s, B̂_t) of the approximation (not of fBM); broadcasts s and t; float64."""
        g = self.gammas.to(torch.float64)
        s = torch.as_tensor(s, dtype=torch.float64, device=g.device)
        t = torch.as_tensor(t, dtype=torch.float64, device=g.device)
        if bool((s < 0).any()) or bool((t < 0).any()):
            raise ValueError("covariance: times must be non-negative")
        s, t = torch.broadcast_tensors(s, t)
        w = self.weights.to(torch.float64)
        gi, gj = g[:, None], g[None, :]
        sums = gi + gj

        def k(a, b):  # E[Y_i(a) Y_j(b)] for stationary OU, shape (..., K, K)
            a, b = a[..., None, None], b[..., None, None]
            return torch.exp(-gj * torch.clamp(b - a, min=0) - gi * torch.clamp(a - b, min=0)) / sums

        if self.kind == "type2":
            m = torch.minimum(s, t)[..., None, None]
            cross = k(s, t) * (-torch.expm1(-sums * m))
        else:
            z = torch.zeros_like(s)
            cross = k(s, t) - k(s, z) - k(z, t) + k(z, z)
        return torch.einsum("i,...ij,j->...", w, cross, w)

    # ------------------------------------------------------------------ sampling
    def initial_state(self, batch_size: int, generator: Optional[torch.Generator] = None,
                      dtype: Optional[torch.dtype] = None, device=None) -> torch.Tensor:
        """(batch, K) OU states at t = 0: zeros (type II) or a draw from the stationary law (type I)."""
        V.check_batch_size(batch_size)
        dtype = dtype or torch.get_default_dtype()
        device = torch.device(device) if device is not None else self.gammas.device
        K = self.num_processes
        if self.kind == "type2":
            return torch.zeros(batch_size, K, dtype=dtype, device=device)
        L = _psd_factor(self.stationary_covariance().to(device))
        z = torch.randn(batch_size, K, generator=generator, dtype=dtype, device=device)
        return z @ L.to(dtype).T

    def sample(self, ts, batch_size: int, generator: Optional[torch.Generator] = None,
               dtype: Optional[torch.dtype] = None, device=None, return_state: bool = False):
        """Sample B̂ on a strictly increasing grid by the exact Gaussian OU transition.

        Returns ``(batch_size, len(ts))`` paths, and with ``return_state=True`` also the OU states
        ``(batch_size, len(ts), K)``. Innovations over a step h are drawn jointly with covariance
        (1 − e^{−(γ_i+γ_j)h})/(γ_i+γ_j) (one shared Brownian motion). The linear recursion
        Y_n = e^{−γh_n} Y_{n−1} + ξ_n costs one fused kernel per step on a (K, batch) slab.
        """
        V.check_batch_size(batch_size)
        dtype = dtype or torch.get_default_dtype()
        device = torch.device(device) if device is not None else self.gammas.device
        ts64 = V.as_times(ts, dtype=torch.float64).to(device)
        prepend = bool(ts64[0] > 0)
        grid = torch.cat([ts64.new_zeros(1), ts64]) if prepend else ts64
        g = self.gammas.to(device=device, dtype=torch.float64)
        K = g.numel()

        y0 = self.initial_state(batch_size, generator, dtype, device)
        n_steps = grid.numel() - 1
        # Layout (time, K, batch): each step of the recursion is one fused kernel on a contiguous
        # (K, batch) slab (a Python loop launches one op per step and never syncs with the host).
        # Normals are drawn block by block into one reused, cache-sized buffer and mixed into
        # correlated innovations directly inside the state buffer: no full-size temporaries, whose
        # page faults (measured here) cost more than the arithmetic.
        states = torch.empty(grid.numel(), K, batch_size, dtype=dtype, device=device)
        states[0] = y0.T
        if n_steps > 0:
            h = torch.diff(grid)
            h_mean = h.mean()
            uniform = bool(torch.allclose(h, h_mean.expand_as(h), rtol=1e-6, atol=0))   # float32 grids too
            if uniform:
                L_host = _psd_factor(self.ou_covariance(h_mean)).tolist()          # one factor, all steps
                decay = torch.exp(-h_mean * g).to(dtype)[None, :, None].expand(n_steps, K, 1)
            else:
                L = _psd_factor(self.ou_covariance(h)).to(dtype)                  # (n, K, K)
                decay = torch.exp(-h[:, None, None] * g[:, None]).to(dtype)      # (n, K, 1)
            # blocks of <= 2^15 elements per op: below ATen's parallel grain, so these small ops never wait on
            # an OpenMP team (on a busy host that wait dominated: 0.6 s instead of 0.04 s per call)
            block = max(1, min(n_steps, (1 << 15) // batch_size))
            noise = torch.empty(block, K, batch_size, dtype=dtype, device=device)
            for start in range(1, n_steps + 1, block):
                stop = min(start + block, n_steps + 1)
                z = torch.randn(noise.shape, generator=generator, dtype=dtype, device=device, out=noise)
                z = z[:stop - start]
                out = states[start:stop]
                if uniform:   # K^2 scalar multiply-adds on cache-resident slabs
                    for i in range(K):
                        torch.mul(z[:, 0], L_host[i][0], out=out[:, i])
                        for j in range(1, K):
                            if L_host[i][j] != 0.0:        # Cholesky factors are lower triangular
                                out[:, i].add_(z[:, j], alpha=L_host[i][j])
                else:
                    torch.matmul(L[start - 1:stop - 1], z, out=out)
                for n in range(start, stop):
                    torch.addcmul(states[n], states[n - 1], decay[n - 1], out=states[n])

        y = states[1:] if prepend else states                                     # (N, K, batch)
        if self.kind == "type1":
            y = y - y0.T
        w = self.weights.detach().to(dtype)
        paths = torch.mul(y[:, 0].T, w[0])
        for k in range(1, K):
            paths.add_(y[:, k].T, alpha=float(w[k]))
        if not return_state:
            return paths
        y = states[1:] if prepend else states
        return paths, y.permute(2, 0, 1).contiguous()


def _psd_factor(cov: torch.Tensor) -> torch.Tensor:
    """A factor L with L Lᵀ = cov for (batched) PSD matrices that may be numerically singular.

    Cholesky (lower triangular, so mixing normals costs K(K+1)/2 multiply-adds) where it succeeds in
    float64; the innovation covariance over a very short step is ≈ h·11ᵀ (rank one) and Cholesky
    fails there, so a symmetric eigen-factor with clamped eigenvalues is the fallback.
    """
    cov = cov.to(torch.float64)
    L, info = torch.linalg.cholesky_ex(cov)
    if not bool((info != 0).any()):
        return L
    evals, evecs = torch.linalg.eigh(cov)
    return evecs * torch.sqrt(torch.clamp(evals, min=0.0))[..., None, :]
