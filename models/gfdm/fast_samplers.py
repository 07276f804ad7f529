"""Fast samplers for GFDM: exponential integrators in u-space, and Heun for the augmented probability flow.

**Why u-space suffices.** Given x₀, u = x − ηᵀy has the law c x₀ + σ̃ ε, independent of y, and the u-part of the
reverse SDE does not involve y. So for SDE-type sampling GFDM(H, K) is a Gaussian diffusion in u with
α_t = c(t), σ_t = σ̃(t) — and at the end x = u + ηᵀy, where ηᵀy is independent Gaussian noise of variance
Σ_XX − σ̃² that the final *denoising* step removes with everything else: the samplers below return the data
prediction x̂₀ = (u − σ̃ ε̂)/c at their last grid time and never need y. In the x-scale v = u/c = x₀ + s ε with the
noise level s = σ̃/c = e^{−λ/2} (λ the log-SNR of `LinearFractionalDynamics.log_snr`), one step from s_t to
s_u < s_t, with h = log(s_t/s_u) = (λ_u − λ_t)/2 and D = x̂₀(u_t, t), is (Lu et al. 2022, DPM-Solver++):

* ``"ddim"`` — v_u = (s_u/s_t) v_t + (1 − s_u/s_t) D (first order, deterministic; the probability-flow ODE of the
  u-diffusion integrated with D frozen over the step);
* ``"dpm++2m"`` — the same with D → (1 + 1/(2r)) D_i − 1/(2r) D_{i−1}, r = h_{i−1}/h_i (second-order multistep;
  the first step is ddim);
* ``"sde-dpm++2m"`` — v_u = (s_u/s_t) e^{−h} v_t + (1 − e^{−2h}) D + ½(1 − e^{−2h})(D_i − D_{i−1})/r
  + s_u √(1 − e^{−2h}) z (the reverse SDE, second order in the drift);
* ``"ancestral"`` — v_u ~ N((s_u/s_t)² v_t + (1 − (s_u/s_t)²) D, s_u²(1 − (s_u/s_t)²)): the exact Gaussian posterior
  q(v_u | v_t, x₀ = D) of the Markov u-diffusion (VE in v: v_t = v_u + √(s_t² − s_u²) n).

Each is exact for the linear part: the factor s_u/s_t (and e^{−h}) is the exact solution of the linear ODE
dv = (v − D) d log s, and the ε-network enters only through D; with a D that does not depend on v (a point-mass data
law) every scheme is exact at any step size. u = c v.

**Augmented probability flow.** ``"ode-heun"`` integrates the probability-flow ODE of (u, ỹ) (where y matters: the
u-drift there has the term −½δζ̃ᵀỹ) by Heun's predictor–corrector: the predictor is the Euler step of
:func:`fracsde.reverse.probability_flow_step`, the corrector averages the explicit drifts of both ends; the stiff
linear ỹ-part stays implicit (backward Euler) in both stages, as in the first-order scheme.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from fracsde.linear import LinearFractionalDynamics
from fracsde.reverse import implicit_y_update, probability_flow_step

__all__ = ["ddim", "dpmpp_2m", "sde_dpmpp_2m", "ancestral", "ode_heun", "noise_levels"]


def noise_levels(dynamics: LinearFractionalDynamics, ts: torch.Tensor):
    """(c, s = σ̃/c) at the grid times, float64 on the grid's device (computed once per sampling call)."""
    t64 = ts.to(torch.float64)
    c = dynamics.mean_coefficient(t64)
    return c, dynamics.conditional_std(t64) / c


def _denoised(eps_model, u, t, c, s, batch, kw):
    """x̂₀ = u/c − s ε̂ (data prediction) and ε̂ at time t."""
    eps = eps_model(u, t.to(u.dtype).expand(batch), **kw)
    return u / c.to(u.dtype) - s.to(u.dtype) * eps


def _u_space(step_fn):
    """Wrap a v-space step rule into a sampler with the shared signature; returns (x̂₀ at ts[-1], None)."""
    def sampler(eps_model: Callable, dynamics, u, y_newton, ts, *, generator=None, model_kwargs=None, progress=False):
        kw = model_kwargs or {}
        batch = u.shape[0]
        c, s = noise_levels(dynamics, ts)
        v = u / c[0].to(u.dtype)
        previous = None                                  # (D_{i−1}, h_{i−1}) for the multistep schemes
        D = None
        for i in range(ts.numel()):
            D = _denoised(eps_model, c[i].to(u.dtype) * v, ts[i], c[i], s[i], batch, kw)
            if i == ts.numel() - 1:
                break                                    # the last evaluation denoises
            h = torch.log(s[i] / s[i + 1])               # float64, 0-d, > 0
            v, previous = step_fn(v, D, s[i], s[i + 1], h, previous, generator)
        return D, None
    sampler.__doc__ = step_fn.__doc__
    return sampler


def _ddim_step(v, D, s_t, s_u, h, previous, generator):
    """DDIM / DPM-Solver++(1): first order, deterministic."""
    ratio = (s_u / s_t).to(v.dtype)
    return ratio * v + (1 - ratio) * D, (D, h)


def _dpmpp_2m_step(v, D, s_t, s_u, h, previous, generator):
    """DPM-Solver++(2M): second-order multistep in λ with data prediction."""
    ratio = (s_u / s_t).to(v.dtype)
    if previous is not None:
        D_prev, h_prev = previous
        r = (h_prev / h).to(v.dtype)
        D_used = (1 + 0.5 / r) * D - (0.5 / r) * D_prev
    else:
        D_used = D
    return ratio * v + (1 - ratio) * D_used, (D, h)


def _sde_dpmpp_2m_step(v, D, s_t, s_u, h, previous, generator):
    """SDE-DPM-Solver++(2M): the reverse SDE, second order in its drift."""
    decay = torch.exp(-h)
    a = (s_u / s_t * decay).to(v.dtype)                 # (s_u/s_t) e^{−h}
    b = (-torch.expm1(-2 * h)).to(v.dtype)              # 1 − e^{−2h}
    v_new = a * v + b * D
    if previous is not None:
        D_prev, h_prev = previous
        r = (h_prev / h).to(v.dtype)
        v_new = v_new + 0.5 * b / r * (D - D_prev)
    z = torch.randn(v.shape, generator=generator, dtype=v.dtype, device=v.device)
    return v_new + (s_u * torch.sqrt(-torch.expm1(-2 * h))).to(v.dtype) * z, (D, h)


def _ancestral_step(v, D, s_t, s_u, h, previous, generator):
    """Ancestral: the exact Gaussian posterior step of the u-diffusion with x₀ replaced by D."""
    q = (s_u / s_t) ** 2
    z = torch.randn(v.shape, generator=generator, dtype=v.dtype, device=v.device)
    return q.to(v.dtype) * v + (1 - q).to(v.dtype) * D + (s_u * torch.sqrt(1 - q)).to(v.dtype) * z, (D, h)


ddim = _u_space(_ddim_step)
dpmpp_2m = _u_space(_dpmpp_2m_step)
sde_dpmpp_2m = _u_space(_sde_dpmpp_2m_step)
ancestral = _u_space(_ancestral_step)


def ode_heun(eps_model: Callable, dynamics, u, y_newton, ts, *, generator=None, model_kwargs=None, progress=False):
    """Heun on the augmented probability-flow ODE in (u, ỹ) over the grid ``ts`` (len(ts) − 1 intervals, 2 network
    evaluations each except the last, which is Euler as in EDM's sampler); returns (u, ỹ) at ``ts[-1]``.

    Predictor: the Euler step (stiff linear ỹ-part implicit). Corrector: the trapezoid average of the explicit
    drifts of u and of the forcing of ỹ_0, with the linear ỹ-part again implicit at the new time.
    """
    kw = model_kwargs or {}
    batch, dtype, K = u.shape[0], u.dtype, dynamics.num_processes
    n = ts.numel() - 1
    coef = dynamics.coefficients(ts[0])
    eps = eps_model(u, ts[0].to(dtype).expand(batch), **kw)
    for i in range(n):
        t0, t1 = ts[i], ts[i + 1]
        coef_next = dynamics.coefficients(t1)
        u_pred, y_pred = probability_flow_step(dynamics, eps, u, y_newton, coef, coef_next, t0, t1)
        if i == n - 1:
            return u_pred, y_pred
        eps_pred = eps_model(u_pred, t1.to(dtype).expand(batch), **kw)
        h = (t0 - t1).to(dtype)
        u_new = u - 0.5 * h * (_pf_u_drift(coef, u, y_newton, eps, K, dtype)
                               + _pf_u_drift(coef_next, u_pred, y_pred, eps_pred, K, dtype))
        if K:
            forcing = -0.25 * h * (coef["kappa"].to(dtype) * eps + coef_next["kappa"].to(dtype) * eps_pred)
            y_newton = implicit_y_update(dynamics, y_newton, forcing, coef_next["zeta_newton"], t0, t1, 0.5)
        u, coef = u_new, coef_next
        eps = eps_model(u, t1.to(dtype).expand(batch), **kw)
    return u, y_newton


def _pf_u_drift(coef, u, y_newton, eps, K, dtype):
    """dt-drift of u in the probability-flow ODE (forward time): μu + ½δκε − ½δ ζ̃ᵀỹ."""
    mu, delta, kappa = coef["mu"].to(dtype), coef["delta"].to(dtype), coef["kappa"].to(dtype)
    drift = mu * u + 0.5 * delta * kappa * eps
    if K:
        drift = drift - 0.5 * delta * (y_newton * coef["zeta_newton"].to(dtype)).sum(-1)
    return drift
