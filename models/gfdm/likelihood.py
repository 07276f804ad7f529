"""Negative log-likelihood (bits/dim) of data under a GFDM ε-model, by the probability-flow ODE.

The augmented density factorises, p_t(x, y) = N(y; 0, Σ_YY(t)) q_t(u), u = x − ηᵀy, and the Gaussian factor
is data-independent; so the model density of x_0 is the density at t → 0 of q_t, whose probability-flow ODE
is one-dimensional per coordinate (the u-part of the augmented ODE with y integrated out):

    du/dt = μ u + ½ δ κ ε_θ(u, t),     d log q_t(u_t)/dt = −div_u(…) = −(d μ + ½ δ κ div_u ε_θ).

We integrate u from c(t_eps) x_0 at t_eps to T with Heun's method on a grid uniform in log t near 0 and in
t near T, estimate div ε_θ with Hutchinson's estimator (Rademacher probes, fixed along the path), and use the
terminal law N(0, σ̃(T)²) as the prior, as the sampler does.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from fracsde.linear import LinearFractionalDynamics
from fracsde.numerics import log_linear_grid, log_linear_grid_times

from .loss import check_data, check_t_eps

__all__ = ["nll_bits_per_dim", "likelihood_grid", "divergence"]


def likelihood_grid(dynamics: LinearFractionalDynamics, steps: int, t_eps: float, device=None) -> torch.Tensor:
    """steps + 1 increasing times from t_eps to T, uniform in v = log(t/T) + t/τ (the coefficient-table variable)."""
    T, tau = dynamics.horizon, dynamics.tau
    v = np.linspace(log_linear_grid(t_eps, T, tau), log_linear_grid(T, T, tau), steps + 1)
    ts = log_linear_grid_times(v, T, tau)
    ts[0], ts[-1] = t_eps, T
    return torch.from_numpy(ts).to(device)


def nll_bits_per_dim(eps_model: Callable, dyn: LinearFractionalDynamics, x0: torch.Tensor, steps: int = 100,
                     hutchinson_samples: int = 1, generator: torch.Generator | None = None,
                     model_kwargs: dict | None = None, t_eps: float = 1e-5, bits_offset: float = 0.0,
                     exact_trace: bool = False) -> torch.Tensor:
    """−log₂ p(x_0) / d + ``bits_offset`` for each sample, shape (batch,).

    Args:
        steps: Heun steps (2 network evaluations and vector–Jacobian products each).
        hutchinson_samples: Rademacher probes per evaluation (ignored with ``exact_trace``).
        exact_trace: compute div ε exactly with d vector–Jacobian products (small d only; for tests).
        bits_offset: added to the result, e.g. 7 for 8-bit images scaled to [−1, 1] (the log-Jacobian of
            the scaling, log₂(256/2)) — dequantisation noise is the caller's business.
    """
    check_data(x0)
    t_eps = check_t_eps(t_eps, dyn.horizon)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
    if isinstance(hutchinson_samples, bool) or not isinstance(hutchinson_samples, int) or hutchinson_samples < 1:
        raise ValueError(f"hutchinson_samples must be an integer >= 1; got {hutchinson_samples!r}")
    batch = x0.shape[0]
    d = x0[0].numel()
    dtype = x0.dtype
    ts = likelihood_grid(dyn, steps, t_eps, device=x0.device)
    probes = None if exact_trace else [
        torch.randint(0, 2, x0.shape, generator=generator, device=x0.device).to(dtype) * 2 - 1
        for _ in range(hutchinson_samples)]
    field = _ProbabilityFlow(eps_model, dyn, model_kwargs or {}, probes)

    c_eps = dyn.mean_coefficient(ts[0]).to(dtype)
    u = c_eps * x0
    delta_logp = torch.zeros(batch, dtype=dtype, device=x0.device)
    f0, g0 = field(u, ts[0])
    for n in range(steps):     # Heun
        h = (ts[n + 1] - ts[n]).to(dtype)
        u_pred = u + h * f0
        f1, g1 = field(u_pred, ts[n + 1])
        u = u + 0.5 * h * (f0 + f1)
        delta_logp = delta_logp + 0.5 * h * (g0 + g1)
        f0, g0 = field(u, ts[n + 1]) if n + 1 < steps else (f1, g1)
    sigma_T = dyn.conditional_std(ts[-1]).to(dtype)
    prior = -0.5 * (u.reshape(batch, -1) ** 2).sum(1) / sigma_T ** 2 - 0.5 * d * torch.log(2 * math.pi * sigma_T ** 2)
    logp = prior + delta_logp + d * torch.log(c_eps)
    return -logp / (d * math.log(2.0)) + bits_offset


def divergence(eps: torch.Tensor, u: torch.Tensor, probes: list | None) -> torch.Tensor:
    """div_u ε per sample, (batch,): exact with d vector–Jacobian products (``probes=None``), else the
    Hutchinson estimate averaged over the given Rademacher probes. ``eps`` must carry a graph to ``u``."""
    batch = u.shape[0]
    if probes is None:
        div = torch.zeros(batch, dtype=u.dtype, device=u.device)
        flat = eps.reshape(batch, -1)
        d = flat.shape[1]
        for i in range(d):
            gi = torch.autograd.grad(flat[:, i].sum(), u, retain_graph=i < d - 1)[0]
            div = div + gi.reshape(batch, -1)[:, i]
        return div
    div = torch.zeros(batch, dtype=u.dtype, device=u.device)
    for j, z in enumerate(probes):
        gz = torch.autograd.grad((eps * z).sum(), u, retain_graph=j < len(probes) - 1)[0]
        div = div + (gz * z).reshape(batch, -1).sum(1)
    return div / len(probes)


class _ProbabilityFlow:
    """(du/dt, d(log-density change)/dt) of the u-space probability-flow ODE at a time t (0-d float64)."""

    def __init__(self, eps_model, dynamics, model_kwargs, probes):
        self.eps_model, self.dynamics, self.model_kwargs, self.probes = eps_model, dynamics, model_kwargs, probes

    def __call__(self, u, t):
        coef = self.dynamics.coefficients(t)
        dtype, batch, d = u.dtype, u.shape[0], u[0].numel()
        mu = coef["mu"].to(dtype)
        a = (0.5 * coef["delta"] * coef["kappa"]).to(dtype)
        with torch.enable_grad():
            u = u.detach().requires_grad_(True)
            eps = self.eps_model(u, t.to(dtype).expand(batch), **self.model_kwargs)
            if eps.shape != u.shape:
                raise ValueError(f"eps_model must return the input's shape {tuple(u.shape)}; got {tuple(eps.shape)}")
            if not eps.requires_grad:
                raise ValueError("eps_model's output carries no autograd graph to its input u (it ignores u, or "
                                 "runs under torch.no_grad / detaches); the likelihood needs div_u eps, so the "
                                 "eps-model must be differentiable in u")
            div = divergence(eps, u, self.probes)
        drift = mu * u.detach() + a * eps.detach()
        return drift, d * mu + a * div.detach()
