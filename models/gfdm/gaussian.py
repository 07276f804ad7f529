"""Exact ε-models for Gaussian and Gaussian-mixture data (test oracles and baselines).

For data x_0 ~ N(m, s²) (independent coordinates) u = c x_0 + σ̃ ε ~ N(c m, c² s² + σ̃²), so

    E[ε | u] = −σ̃ ∇_u log q_t(u) = σ̃ (u − c m) / (c² s² + σ̃²),

and with it the reverse-time dynamics of any linear fractional model transport the terminal law exactly
to the data law. For a mixture Σ_k π_k N(m_k, s_k² I) the same holds with the posterior responsibilities.
"""
from __future__ import annotations

import math

import torch

from fracsde.linear import LinearFractionalDynamics

__all__ = ["GaussianEpsModel", "GaussianMixtureEpsModel", "gaussian_loss_minimum"]


def _coefficients(dynamics, t, like):
    t64 = t.to(torch.float64)
    c = dynamics.mean_coefficient(t64)
    s = dynamics.conditional_std(t64)
    view = (-1,) + (1,) * (like.dim() - 1) if t.dim() else ()
    return c.reshape(view) if view else c, s.reshape(view) if view else s


class GaussianEpsModel:
    """The exact ε-model ε*(u, t) = E[ε | u_t = u] for data x_0 ~ N(mean, std²) per coordinate: an oracle for
    testing samplers and losses without training.

    Args:
        dynamics: the forward dynamics (e.g. ``FVP(0.9, 3)``).
        mean: the data mean, a float or a tensor broadcastable to the data.
        std: the data standard deviation (> 0, finite), a float or a tensor broadcastable to the data.

    Calling it with ``(u, t)`` (u of shape (batch, *shape), t a scalar or (batch,)) returns ε* shaped like u.

    Raises:
        ValueError: a std entry that is not > 0 and finite.
    """

    def __init__(self, dynamics: LinearFractionalDynamics, mean=0.0, std=1.0):
        sd = torch.as_tensor(std, dtype=torch.float64)
        if not bool((sd > 0).all()) or not bool(torch.isfinite(sd).all()):
            raise ValueError(f"std must be > 0 and finite (every entry); got {std!r}")
        self.dynamics, self.mean, self.std = dynamics, mean, std

    def __call__(self, u: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
        c, s = _coefficients(self.dynamics, t, u)
        u64 = u.to(torch.float64)
        m = torch.as_tensor(self.mean, dtype=torch.float64, device=u.device)
        sd = torch.as_tensor(self.std, dtype=torch.float64, device=u.device)
        return (s * (u64 - c * m) / (c * c * sd * sd + s * s)).to(u.dtype)

    def marginal(self, t: float):
        """(mean, std) of x_t = u + ηᵀy under the forward process started from the data law."""
        m = self.dynamics.marginal(torch.tensor(t, dtype=torch.float64))
        mean = m.c * torch.as_tensor(self.mean, dtype=torch.float64)
        std = torch.sqrt(m.c ** 2 * torch.as_tensor(self.std, dtype=torch.float64) ** 2 + m.cov_xx)
        return mean, std


class GaussianMixtureEpsModel:
    """The exact ε-model ε*(u, t) for data Σ_k π_k N(means_k, stds_k² I) in R^d; u of shape (batch, d).

    Args:
        dynamics: the forward dynamics.
        means: (M, d) component means.
        stds: (M,) component standard deviations (> 0, finite).
        weights: (M,) mixture weights π (>= 0, finite, not all 0; normalised here).

    Raises:
        ValueError: invalid weights or stds, naming them.
    """

    def __init__(self, dynamics: LinearFractionalDynamics, means, stds, weights):
        self.dynamics = dynamics
        self.means = torch.as_tensor(means, dtype=torch.float64)          # (M, d)
        self.stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1)  # (M,)
        w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if not bool((w >= 0).all()) or not bool(torch.isfinite(w).all()) or not float(w.sum()) > 0:
            raise ValueError(f"weights must be >= 0, finite and not all 0; got {w.tolist()}")
        if not bool((self.stds > 0).all()) or not bool(torch.isfinite(self.stds).all()):
            raise ValueError(f"stds must be > 0 and finite; got {self.stds.tolist()}")
        self.log_weights = torch.log(w / w.sum())

    def __call__(self, u: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
        c, s = _coefficients(self.dynamics, t, u)                          # (batch, 1)
        u64 = u.to(torch.float64)
        means, stds, logw = (a.to(u.device) for a in (self.means, self.stds, self.log_weights))
        var = (c * c) * stds[None, :] ** 2 + s * s                         # (batch, M)
        diff = u64[:, None, :] - c[..., None] * means[None]                # (batch, M, d)
        d = u.shape[1]
        logp = logw - 0.5 * (diff ** 2).sum(-1) / var - 0.5 * d * torch.log(2 * math.pi * var)
        resp = torch.softmax(logp, dim=1)                                  # (batch, M)
        score = -(resp[..., None] * diff / var[..., None]).sum(1)          # ∇_u log q_t
        return (-s * score).to(u.dtype)


def gaussian_loss_minimum(dynamics: LinearFractionalDynamics, std: float, t_eps: float = 1e-5,
                          nodes: int = 4001) -> float:
    """The minimum of :func:`~models.gfdm.loss.score_matching_loss` for N(m, std²) data:
    (T − t_eps)⁻¹ ∫ c² s² / (c² s² + σ̃²) dt (the residual variance Var(ε | u)), by Simpson's rule in log t.

    Args:
        dynamics: the forward dynamics (horizon T).
        std: the data standard deviation s > 0 (the mean does not matter).
        t_eps: the smallest training time, 0 < t_eps < T.
        nodes: Simpson nodes in log t (odd).

    Returns:
        The minimal loss, a float in [0, 1].
    """
    T = dynamics.horizon
    v = torch.linspace(math.log(t_eps), math.log(T), nodes, dtype=torch.float64)
    t = torch.exp(v)
    c = dynamics.mean_coefficient(t)
    s = dynamics.conditional_std(t)
    f = c * c * std * std / (c * c * std * std + s * s) * t                # dt = t dv
    h = float(v[1] - v[0])
    w = torch.ones(nodes, dtype=torch.float64)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return float((f * w).sum() * h / 3.0) / (T - t_eps)
