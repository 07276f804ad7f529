"""Markov (OU-mixture) noise: the one interface every fractional model in fracsde is driven by.

A Markov noise is K Ornstein–Uhlenbeck processes driven by ONE Brownian motion W,

    dY_k = −γ_k Y_k dt + dW_t,     B̂_t = Σ_k ω_k Ŷ_k(t),   Ŷ = Y (type II) or Y − Y(0) (type I),

given by its rates γ, weights ω, kind (the law of Y(0): zero or stationary, see :mod:`fracsde.kinds`) and
the horizon T it was built for. :class:`MarkovNoise` holds a user-given (γ, ω); :class:`fracsde.MarkovApproxFBM`
is the one whose ω is L2-optimal for fBM of Hurst index H. :class:`fracsde.FractionalSDE`,
:class:`fracsde.LinearFractionalDynamics`, :class:`fracsde.distributions.FractionalOU` and the latent models
accept any of them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import _validation as V
from .kinds import get_kind
from .numerics import is_uniform_grid, psd_factor

__all__ = ["MarkovNoise", "check_rates"]


def check_rates(gammas, name: str = "gammas") -> torch.Tensor:
    """Rates as a detached float64 CPU tensor: non-empty, 1-D, finite and > 0 (else a ValueError naming them)."""
    g = torch.as_tensor(gammas, dtype=torch.float64).detach().clone().cpu()
    if g.dim() != 1 or g.numel() < 1:
        raise ValueError(f"{name} must be a non-empty 1-D sequence; got shape {tuple(g.shape)}")
    if not bool((g > 0).all()) or not bool(torch.isfinite(g).all()):
        raise ValueError(f"{name} must be finite and > 0; got {g.tolist()}")
    return g


class MarkovNoise(nn.Module):
    """A Markov noise B̂ = Σ_k ω_k Ŷ_k with given rates and weights (see the module docstring).

    Args:
        gammas: (K,) OU rates, finite and > 0.
        weights: (K,) weights ω (finite).
        kind: ``"type2"`` (Y(0) = 0, B̂ = ωᵀY) or ``"type1"`` (Y(0) stationary, B̂ = ωᵀ(Y − Y(0))).
        horizon: T > 0, the interval [0, T] the noise is meant for.

    Rates and weights are float64 buffers (they move with ``.to(device)``); :attr:`gamma_max`, the largest
    rate, is derived from the rates (it sets the stiffness of any solver).

    Example:
        >>> noise = MarkovNoise([0.5, 4.0], [1.0, -0.3])
        >>> paths = noise.sample(torch.linspace(0, 1, 101), batch_size=8)   # (8, 101)
    """

    def __init__(self, gammas, weights, kind: str = "type2", horizon: float = 1.0):
        super().__init__()
        self.kind = V.check_kind(kind)
        self.horizon = V.check_positive_float(horizon, "horizon")
        g = check_rates(gammas)
        self.register_buffer("gammas", g)
        self._gamma_max = float(g.max())
        if weights is None:
            if type(self).weights is MarkovNoise.weights:
                raise TypeError("weights must be given (only subclasses that compute them may pass None)")
            return
        w = torch.as_tensor(weights, dtype=torch.float64).detach().clone().cpu()
        if w.shape != g.shape:
            raise ValueError(f"weights must have the shape of gammas, {tuple(g.shape)}; got {tuple(w.shape)}")
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"weights must be finite; got {w.tolist()}")
        self.register_buffer("_weights", w)

    # ------------------------------------------------------------------ parameters
    @property
    def num_processes(self) -> int:
        return self.gammas.numel()

    @property
    def gamma_max(self) -> float:
        """The largest rate max_k γ_k."""
        return self._gamma_max

    @property
    def weights(self) -> torch.Tensor:
        """(K,) weights ω (float64)."""
        return self._weights

    def extra_repr(self) -> str:
        return f"num_processes={self.num_processes}, kind={self.kind!r}, gamma_max={self.gamma_max:g}, " \
               f"horizon={self.horizon:g}"

    # ------------------------------------------------------------------ second moments
    def stationary_covariance(self) -> torch.Tensor:
        """(K, K) stationary covariance of the OU states: 1/(γ_i + γ_j)."""
        g = self.gammas.to(torch.float64)
        return 1.0 / (g[:, None] + g[None, :])

    def initial_covariance(self) -> torch.Tensor:
        """(K, K) covariance of the OU states at t = 0: zero (type II) or stationary (type I)."""
        return get_kind(self.kind).initial_covariance(self.gammas.to(torch.float64))

    def ou_covariance(self, h) -> torch.Tensor:
        """(*h.shape, K, K) covariance of the OU innovation over a step h: (1 − e^{−(γ_i+γ_j)h})/(γ_i+γ_j)."""
        g = self.gammas.to(torch.float64)
        h = torch.as_tensor(h, dtype=torch.float64, device=g.device)
        s = g[:, None] + g[None, :]
        return -torch.expm1(-s * h[..., None, None]) / s

    def covariance(self, s, t) -> torch.Tensor:
        """Closed-form Cov(B̂_s, B̂_t) of this noise; broadcasts s and t; float64."""
        g = self.gammas.to(torch.float64)
        s = torch.as_tensor(s, dtype=torch.float64, device=g.device)
        t = torch.as_tensor(t, dtype=torch.float64, device=g.device)
        if bool((s < 0).any()) or bool((t < 0).any()):
            raise ValueError("covariance: times must be non-negative")
        s, t = torch.broadcast_tensors(s, t)
        w = self.weights.to(torch.float64)
        cross = get_kind(self.kind).state_cross_covariance(g, s, t)
        return torch.einsum("i,...ij,j->...", w, cross, w)

    # ------------------------------------------------------------------ sampling
    def initial_state(self, batch_size: int, generator: Optional[torch.Generator] = None,
                      dtype: Optional[torch.dtype] = None, device=None) -> torch.Tensor:
        """(batch, K) OU states at t = 0, drawn from :meth:`initial_covariance` (zeros for type II)."""
        V.check_batch_size(batch_size)
        dtype = dtype or torch.get_default_dtype()
        device = torch.device(device) if device is not None else self.gammas.device
        K = self.num_processes
        if not get_kind(self.kind).stationary_start:
            return torch.zeros(batch_size, K, dtype=dtype, device=device)
        L = psd_factor(self.initial_covariance().to(device))
        z = torch.randn(batch_size, K, generator=generator, dtype=dtype, device=device)
        return z @ L.to(dtype).T

    def read_out(self, states: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
        """B̂ from OU states ``(..., K)`` and the initial states ``(..., K)``: Σ_k ω_k Ŷ_k (last axis summed)."""
        y = get_kind(self.kind).read_out(states, initial)
        return y @ self.weights.to(y.dtype)

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
            uniform = is_uniform_grid(grid)
            if uniform:
                L_host = psd_factor(self.ou_covariance(h_mean)).tolist()          # one factor, all steps
                decay = torch.exp(-h_mean * g).to(dtype)[None, :, None].expand(n_steps, K, 1)
            else:
                L = psd_factor(self.ou_covariance(h)).to(dtype)                  # (n, K, K)
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
        y = get_kind(self.kind).read_out(y, y0.T)
        w = self.weights.detach().to(dtype)
        paths = torch.mul(y[:, 0].T, w[0])
        for k in range(1, K):
            paths.add_(y[:, k].T, alpha=float(w[k]))
        if not return_state:
            return paths
        y = states[1:] if prepend else states
        return paths, y.permute(2, 0, 1).contiguous()
