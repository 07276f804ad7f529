"""Rough Heston by Fourier: the fractional Riccati equation (fractional Adams scheme) and Lewis' formula.

Convention (../shared/REFERENCE.md §7): V_t = V₀ + ∫₀ᵗ K(t−s)(θ − λV_s) ds + ∫₀ᵗ K(t−s) ν √V_s dW_s,
K(t) = t^{α−1}/Γ(α), α = H + ½, dS = S √V dB, d⟨W, B⟩ = ρ dt, S₀ = 1. El Euch & Rosenbaum (2019):

    E e^{iu log S_T} = exp(θ ∫₀ᵀ h(u, s) ds + V₀ ∫₀ᵀ F(u, h(u, s)) ds),   h = I^α F(u, h),
    F(u, h) = −(u² + iu)/2 + (iρνu − λ) h + ν² h²/2,

with I^α the Riemann–Liouville fractional integral. ``riccati`` solves h by the fractional Adams
predictor–corrector of Diethelm, Ford & Freed (product trapezoidal rule, error O(Δ^{1+α}) in general and O(Δ²)
at α = 1), optionally Richardson-extrapolated from grids n and 2n. Everything is torch complex128 and
differentiable in every parameter, H included.
"""
from __future__ import annotations

import math

import torch

__all__ = ["riccati", "log_char_function", "lifted_log_char_function", "lewis_call_prices", "truncation",
           "stable_steps"]


def _F(u, h, rho, lam, nu):
    return -0.5 * (u * u + 1j * u) + (1j * rho * nu * u - lam) * h + 0.5 * nu * nu * h * h


def riccati(u: torch.Tensor, maturity: float, alpha, rho, lam, nu, steps: int):
    """Solve h = I^α F(u, h) on the uniform grid t_j = jT/n by the fractional Adams predictor–corrector.

    Args:
        u: (U,) complex128 arguments of the characteristic function.
        maturity: T > 0 (years).
        alpha: H + ½ in (½, 1] (float or 0-d tensor; differentiable).
        rho, lam, nu: the model's correlation, mean reversion λ and vol-of-vol ν (floats or 0-d tensors).
        steps: n ≥ 1, the number of grid intervals.

    Returns:
        (h, f): (U, n + 1) complex128 values of h(u, t_j) and F(u, h(u, t_j)).
    """
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    n = int(steps)
    dt = maturity / n
    j = torch.arange(n + 2, dtype=torch.float64)
    pa = j ** alpha                                  # j^α
    pa1 = j ** (alpha + 1)                           # j^{α+1}
    c_pred = dt ** alpha / torch.exp(torch.lgamma(alpha + 1))
    c_corr = dt ** alpha / torch.exp(torch.lgamma(alpha + 2))
    # predictor weights b_{j,k+1} = (k+1−j)^α − (k−j)^α depend on m = k − j only: b[m] = (m+1)^α − m^α
    b = pa[1:] - pa[:-1]                                               # (n + 1,)
    # corrector weights for 1 ≤ j ≤ k: a[m] = (m+2)^{α+1} + m^{α+1} − 2(m+1)^{α+1}, m = k − j
    a = pa1[2:] + pa1[:-2] - 2 * pa1[1:-1]                             # (n,)
    U = u.shape[0]
    bc, ac = b.to(torch.complex128), a.to(torch.complex128)
    a0 = torch.arange(n, dtype=torch.float64) ** (alpha + 1) \
        - (torch.arange(n, dtype=torch.float64) - alpha) * torch.arange(1, n + 1, dtype=torch.float64) ** alpha
    tracked = torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad
                                              for x in (alpha, rho, lam, nu, u))
    # with autograd: a list of columns (no in-place writes into a tensor autograd still needs); without: a buffer
    h0 = torch.zeros(U, dtype=torch.complex128)
    f0 = _F(u, h0, rho, lam, nu)
    if tracked:
        hs, fs = [h0], [f0]
    else:
        hbuf = torch.zeros(U, n + 1, dtype=torch.complex128)
        fbuf = torch.zeros(U, n + 1, dtype=torch.complex128)
        fbuf[:, 0] = f0
    for k in range(n):
        hist = torch.stack(fs, dim=1) if tracked else fbuf[:, :k + 1]  # (U, k + 1): f_j, j = 0..k
        pred = c_pred * (hist @ bc[:k + 1].flip(0))                    # Σ_j b[k − j] f_j
        s = a0[k] * hist[:, 0]                                         # a_{0,k+1} f_0
        if k > 0:
            s = s + hist[:, 1:] @ ac[:k].flip(0)                        # Σ_{j=1}^k a[k − j] f_j
        hk = c_corr * (s + _F(u, pred, rho, lam, nu))
        fk = _F(u, hk, rho, lam, nu)
        if tracked:
            hs.append(hk)
            fs.append(fk)
        else:
            hbuf[:, k + 1] = hk
            fbuf[:, k + 1] = fk
    if tracked:
        return torch.stack(hs, dim=1), torch.stack(fs, dim=1)
    return hbuf, fbuf


def lifted_log_char_function(u: torch.Tensor, maturity: float, rates, weights, v0, theta, lam, nu, rho,
                             steps: int = 2048) -> torch.Tensor:
    """log E e^{iu log S_T} of the *lifted* rough Heston model, whose kernel is K̂(t) = Σ_k ω_k e^{−γ_k t}.

    The model that ``method="markov"`` simulates: its Riccati equation h = K̂ * F(u, h) lifts to
    ψ_k' = −γ_k ψ_k + F(u, h), h = Σ_k ω_k ψ_k, ψ_k(0) = 0, solved by the exponential trapezoidal
    predictor–corrector (exact decay, stable at any rate) on ``steps`` equal steps; log φ = θ ∫h + V₀ ∫F(h).
    Comparing it with :func:`log_char_function` measures the kernel approximation alone; comparing the Markov
    Monte Carlo with it measures the time-stepping scheme alone.

    Args:
        u: (U,) complex arguments.
        maturity: T > 0.
        rates, weights: (K,) γ_k > 0 and ω_k.
        v0, theta, lam, nu, rho: the model's parameters (see :class:`models.roughvol.RoughHeston`).
        steps: time steps (second order in the step).
    """
    g = torch.as_tensor(rates, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64).to(torch.complex128)
    u = u.reshape(-1)
    dt = maturity / steps
    decay = torch.exp(-g * dt).to(torch.complex128)
    gain = (-torch.expm1(-g * dt) / g).to(torch.complex128)
    psi = torch.zeros(u.numel(), g.numel(), dtype=torch.complex128)
    h = psi @ w
    f = _F(u, h, rho, lam, nu)
    int_h = torch.zeros_like(h)
    int_f = torch.zeros_like(h)
    for _ in range(steps):
        h_pred = (decay * psi + gain * f[:, None]) @ w
        f_pred = _F(u, h_pred, rho, lam, nu)
        psi = decay * psi + gain * (0.5 * (f + f_pred))[:, None]
        h_new = psi @ w
        f_new = _F(u, h_new, rho, lam, nu)
        int_h = int_h + 0.5 * dt * (h + h_new)
        int_f = int_f + 0.5 * dt * (f + f_new)
        h, f = h_new, f_new
    return theta * int_h + v0 * int_f


STABILITY = 1.0      # the explicit predictor is stable while ν |u| Δ^α ≲ 1.5 (measured); we keep ν |u| Δ^α ≤ 1
MAX_STEPS = 1 << 13


def stable_steps(u_abs: float, maturity: float, alpha: float, nu: float, steps: int) -> int:
    """The smallest power-of-two multiple of ``steps`` with ν |u| Δ^α ≤ :data:`STABILITY` (Δ = T/n).

    Raises:
        ValueError: when that exceeds :data:`MAX_STEPS` (lower ``u_max``).
    """
    n = int(steps)
    while nu * u_abs * (maturity / n) ** alpha > STABILITY:
        n *= 2
        if n > MAX_STEPS:
            raise ValueError(f"the fractional Riccati scheme needs more than {MAX_STEPS} steps to stay stable at "
                             f"|u| = {u_abs:g} (nu={nu:g}, H={alpha - 0.5:g}, T={maturity:g}); lower u_max")
    return n


def log_char_function(u: torch.Tensor, maturity: float, hurst, v0, theta, lam, nu, rho, steps: int = 256,
                      richardson: bool = True) -> torch.Tensor:
    """log E e^{iu log S_T} of the rough Heston model at complex ``u`` (1-D).

    Each u is solved on a grid of at least ``steps`` intervals, refined (doubling) where ν|u|Δ^α would make the
    explicit predictor unstable (see :func:`stable_steps`); u's sharing a grid are solved together. The time
    integrals ∫₀ᵀ h ds and ∫₀ᵀ F ds use the trapezoidal rule on that grid. With ``richardson`` the results on grids
    n and 2n are extrapolated as (2^p L_{2n} − L_n)/(2^p − 1), p = min(2, 1 + α), the scheme's order.
    """
    alpha = hurst + 0.5
    a, nu_f = (float(x.detach()) if isinstance(x, torch.Tensor) else float(x) for x in (alpha, nu))
    needed = torch.tensor([stable_steps(float(x), maturity, a, nu_f, steps) for x in u.abs().tolist()])
    pieces = []
    for n in torch.unique(needed).tolist():
        idx = (needed == n).nonzero().flatten()
        uu = u[idx]

        def once(m, uu=uu):
            h, f = riccati(uu, maturity, alpha, rho, lam, nu, m)
            dt = maturity / m
            trap = lambda x: dt * (x[:, 1:-1].sum(dim=1) + 0.5 * (x[:, 0] + x[:, -1]))   # noqa: E731
            return theta * trap(h) + v0 * trap(f)

        if richardson:
            p = min(2.0, 1.0 + a)
            val = (2 ** p * once(2 * n) - once(n)) / (2 ** p - 1)
        else:
            val = once(n)
        pieces.append((idx, val))
    # assemble without in-place writes into a tensor that autograd needs
    order = torch.cat([i for i, _ in pieces])
    vals = torch.cat([v for _, v in pieces])
    return vals[torch.argsort(order)]


def gauss_legendre(u_max: float, width: float, nodes: int = 16):
    """Nodes and weights of composite Gauss–Legendre on [0, u_max]: panels doubling from 1/8 up to ``width``
    (the Lewis weight 1/(u² + ¼) has poles at ±i/2, so the panels near 0 must be short), then of ``width``."""
    import numpy as np

    x, w = np.polynomial.legendre.leggauss(nodes)
    grading = [0.0] + [0.125 * 2.0 ** m for m in range(20) if 0.125 * 2.0 ** m < min(width, u_max)]
    start = grading[-1]
    uniform = np.linspace(start, u_max, max(1, math.ceil((u_max - start) / width)) + 1)
    edges = np.concatenate([np.array(grading[:-1]), uniform])
    half = 0.5 * np.diff(edges)
    mid = 0.5 * (edges[1:] + edges[:-1])
    pts = (mid[:, None] + half[:, None] * x[None, :]).ravel()
    wts = (half[:, None] * w[None, :]).ravel()
    return torch.from_numpy(pts), torch.from_numpy(wts)


def lewis_call_prices(log_strikes: torch.Tensor, log_phi, u_max: float, width: float) -> torch.Tensor:
    """Call prices by Lewis' formula C(k) = 1 − (e^{k/2}/π) ∫₀^∞ Re[e^{−iuk} φ(u − i/2)] / (u² + ¼) du.

    Args:
        log_strikes: (S,) log-strikes k.
        log_phi: callable mapping complex u (N,) to log φ(u) (N,), φ the characteristic function of log S_T.
        u_max, width: truncation of the integral and the widest panel of its composite Gauss–Legendre rule
            (16 nodes per panel; see :func:`gauss_legendre`).
    """
    u, w = gauss_legendre(u_max, width)
    lp = log_phi(u.to(torch.complex128) - 0.5j)                         # (N,)
    k = log_strikes.to(torch.float64)
    integrand = torch.exp(lp[None, :] - 1j * u[None, :] * k[:, None]).real / (u * u + 0.25)[None, :]
    return 1.0 - torch.exp(0.5 * k) / math.pi * (integrand @ w)


def truncation(log_phi, max_abs_log_strike: float, tol: float = 1e-11, start: float = 25.0, limit: float = 800.0):
    """The Lewis integral's truncation point: the first u = start·1.25^m with e^{|k|/2} |φ(u − i/2)| / (π u) < ``tol``.

    |φ(u − i/2)| = |E √S_T e^{iu log S_T}| decays in u, so the neglected tail ∫_u^∞ |φ|/(v² + ¼) dv is below
    |φ(u − i/2)|/u. Returns ``limit`` if not reached (the caller's integral is then accurate to about the bound).
    """
    u = start
    while u < limit:
        mag = float(torch.exp(log_phi(torch.tensor([u - 0.5j], dtype=torch.complex128)).real.detach()[0]))
        if math.exp(0.5 * max_abs_log_strike) * mag / (math.pi * u) < tol:
            return u
        u *= 1.25          # fine steps: the cost of the integral grows steeply with u_max
    return limit
