"""Reverse-time dynamics of a linear fractional diffusion (:class:`~fracsde.linear.LinearFractionalDynamics`).

For the augmented state Z = (X, Y) of dZ = F Z dt + G dW (one scalar W per coordinate), the reverse-time SDE
and the probability-flow ODE are (Anderson 1982; Song et al. 2021)

    dZ = [F Z − G Gᵀ ∇_z log p_t(Z)] dt + G dW̄,        dZ = [F Z − ½ G Gᵀ ∇_z log p_t(Z)] dt,

with the SAME scalar noise for all K + 1 components of a coordinate (independent noise per component is a
different process, and diverges). Whatever the data, p_t(x, y) = N(y; 0, Σ_YY) q_t(x − ηᵀy): Y does not see
x_0, and u = x − ηᵀy is independent of y. Only q_t, the law of u = c x_0 + σ̃ ε, is unknown; an ε-model of u
gives ∇_x log p = −ε/σ̃ and ∇_y log p = −η ∇_x log p − Σ_YY⁻¹ y, hence Gᵀ∇ log p = −κ ε − ζᵀy with
κ = δ/σ̃, δ = G_x − 1ᵀη, ζ = Σ_YY⁻¹ 1.

Two ways to integrate them are provided:

* :class:`ReverseTimeSDE` — the reverse SDE/ODE on the flattened augmented state (x, y), in the torchsde
  calling convention (time s = T − t increasing), solvable by ``torchsde.sdeint`` and by the streaming
  :func:`euler_maruyama`. Fine for K ≤ 2; for K ≥ 3 the standard-basis y cannot carry the information
  Σ_YY⁻¹ y needs near t = 0 (its eigenvalues span t … t^{2K−1}), see docs/gfdm.md.
* :func:`sample_innovation` — the same dynamics in the coordinates (u, ỹ), ỹ = N y the Newton basis, where
  every quantity is well scaled: du = [μu + δκε] dt + δ dW̄ (SDE) and dỹ = [−Bỹ + e_0(κε + ζ̃ᵀỹ)] dt + e_0 dW̄.
  The linear part of the ỹ-equation is stiff near t = 0 (rates up to ~K²/t) and is taken implicitly
  (backward Euler, unconditionally stable because the reverse-time generator is dissipative in the Σ_YY
  norm), u and the ε-terms explicitly. Streaming: O(1) memory in the number of steps, noise drawn per step
  on the device.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from . import _validation as V
from .linear import LinearFractionalDynamics

__all__ = ["ReverseTimeSDE", "euler_maruyama", "sample_innovation", "eps_to_score", "reverse_sde_step",
           "probability_flow_step", "INNOVATION_STEPS", "implicit_y_update"]


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, leave=False)


def _bview(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a (batch,) or 0-d tensor to broadcast against (batch, *shape)."""
    return v.reshape(v.shape + (1,) * (ndim - v.dim())) if v.dim() else v


def eps_to_score(dynamics: LinearFractionalDynamics, eps_model: Callable, model_kwargs: dict | None = None):
    """The factorised score (∇_x, ∇_y) log p_t of the augmented state from an ε-model of u = x − ηᵀy.

    Returns ``score(t, x, y)`` with t a 0-d or (batch,) tensor, x (batch, *shape), y (batch, *shape, K).
    ∇_y log p = −η ∇_x log p − Σ_YY⁻¹ y (Σ_YY⁻¹ y through the Newton basis). Meant for small problems and
    tests; samplers use the better conditioned product Gᵀ∇ log p = −κε − ζᵀy directly.
    """
    kw = model_kwargs or {}

    def score(t, x, y):
        tb = torch.as_tensor(t, device=x.device).to(x.dtype).expand(x.shape[0])
        coef = dynamics.coefficients(tb)
        y_newton = dynamics.to_newton(y)
        eta_newton = coef["eta_newton"].to(x.dtype).reshape(-1, *(1,) * (x.dim() - 1), y_newton.shape[-1])
        u = x - (y_newton * eta_newton).sum(-1)
        eps = eps_model(u, tb, **kw)
        sx = -eps / _bview(coef["sigma"].to(x.dtype), x.dim())
        eta = (coef["eta_newton"] @ dynamics.newton).to(x.dtype)                     # Nᵀ η̃
        L = dynamics.newton_cov_factor(tb).to(x.dtype)                             # N Σ_YY Nᵀ = L Lᵀ
        view = (-1,) + (1,) * (x.dim() - 1)
        w = torch.linalg.solve_triangular(L.reshape(*view, *L.shape[-2:]), y_newton[..., None], upper=False)
        w = torch.linalg.solve_triangular(L.transpose(-1, -2).reshape(*view, *L.shape[-2:]), w, upper=True)
        sy = -(eta.reshape(*view, eta.shape[-1]) * sx[..., None]) - (w[..., 0] @ dynamics.newton.to(x.dtype))
        return sx, sy

    return score


class ReverseTimeSDE(nn.Module):
    """The reverse-time SDE (or probability-flow ODE) on the flattened augmented state, torchsde-style.

    State ``z`` of shape ``(batch, (K+1)·d)``: ``[x.flatten(1), y.flatten(1)]`` with y of shape
    ``(batch, *data_shape, K)``. Time is s = T − t, so torchsde's increasing ``ts`` run from t = T down.
    The noise is ``(batch, d)``: one scalar Brownian motion per coordinate, shared by its K + 1 components
    (``noise_type = "general"``; only ``f_and_g_prod``/``g_prod`` are defined, so pass ``bm``, e.g. from
    :meth:`brownian_motion`, to ``torchsde.sdeint``).

    Args:
        dynamics: the forward linear fractional dynamics.
        data_shape: the shape of one sample x (without batch).
        eps_model: ``eps_model(u, t, **model_kwargs)`` predicting ε from u = x − ηᵀy (preferred: the drift is
            assembled from κ = δ/σ̃ and ζ̃ without forming σ̃⁻¹ or Σ_YY⁻¹), or
        score: ``score(t, x, y) -> (score_x, score_y)``, any score of the augmented state.
        probability_flow: integrate the probability-flow ODE (zero diffusion) instead of the SDE.
    """

    noise_type = "general"
    sde_type = "ito"

    def __init__(self, dynamics: LinearFractionalDynamics, data_shape, eps_model: Callable | None = None,
                 score: Callable | None = None, probability_flow: bool = False,
                 model_kwargs: dict | None = None):
        super().__init__()
        if (eps_model is None) == (score is None):
            raise ValueError("pass exactly one of eps_model and score")
        self.dynamics = dynamics
        self.data_shape = tuple(int(s) for s in data_shape)
        self.d = int(math.prod(self.data_shape))
        self.K = dynamics.num_processes
        self.eps_model, self.score = eps_model, score
        self.probability_flow = bool(probability_flow)
        self.model_kwargs = model_kwargs or {}
        self.score_factor = 0.5 if self.probability_flow else 1.0
        self.brownian_size = self.d

    # ------------------------------------------------------------------ layout
    def pack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)], dim=1)

    def unpack(self, z: torch.Tensor):
        b = z.shape[0]
        x = z[:, :self.d].reshape(b, *self.data_shape)
        y = z[:, self.d:].reshape(b, *self.data_shape, self.K)
        return x, y

    def brownian_motion(self, batch_size: int, t_end: float, dt: float, dtype=torch.float32, device=None):
        """A torchsde BrownianInterval on s ∈ [0, T − t_end] of size (batch, d) with a step hint ``dt``."""
        import torchsde
        return torchsde.BrownianInterval(t0=0.0, t1=self.dynamics.horizon - t_end, size=(batch_size, self.d),
                                         dtype=dtype, device=device, dt=dt)

    # ------------------------------------------------------------------ drift and diffusion
    def _reverse_drift(self, t: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
        """b(t, z) = F z − c G Gᵀ∇ log p (c = 1 SDE, ½ ODE); returns (b_x, b_y)."""
        dyn = self.dynamics
        dtype = x.dtype
        tb = t.to(dtype).expand(x.shape[0])
        coef = dyn.coefficients(t.to(torch.float64))
        mu, g = coef["mu"].to(dtype), coef["g"].to(dtype)
        gx = g * dyn.weights.sum().to(dtype) if self.K else g
        if self.eps_model is not None:
            y_newton = dyn.to_newton(y)
            u = x - (y_newton * coef["eta_newton"].to(dtype)).sum(-1) if self.K else x
            eps = self.eps_model(u, tb, **self.model_kwargs)
            gt_score = -coef["kappa"].to(dtype) * eps
            if self.K:
                gt_score = gt_score - (y_newton * coef["zeta_newton"].to(dtype)).sum(-1)
        else:
            assert self.score is not None        # __init__ takes exactly one of eps_model and score
            sx, sy = self.score(t, x, y)
            gt_score = gx * sx + (sy.sum(-1) if self.K else 0.0)
        bx = mu * x - self.score_factor * gx * gt_score
        if self.K:
            nu = (dyn.weights * dyn.gammas).to(dtype)
            bx = bx - g * (y * nu).sum(-1)
            by = -dyn.gammas.to(dtype) * y - self.score_factor * gt_score[..., None]
        else:
            by = y
        return bx, by

    def f(self, s, z):
        t = self.dynamics.horizon - torch.as_tensor(s, dtype=torch.float64, device=z.device)
        x, y = self.unpack(z)
        bx, by = self._reverse_drift(t, x, y)
        return -self.pack(bx, by)                                  # ds = −dt

    def g_prod(self, s, z, v):
        if self.probability_flow:
            return torch.zeros_like(z)
        t = self.dynamics.horizon - torch.as_tensor(s, dtype=torch.float64, device=z.device)
        G = self.dynamics.diffusion_vector(t).to(z.dtype)              # (K+1,)
        return (v[:, None, :] * G[:, None]).reshape(z.shape[0], -1)   # [G_x v, v, …, v]

    def f_and_g_prod(self, s, z, v):
        return self.f(s, z), self.g_prod(s, z, v)


def euler_maruyama(sde, z0: torch.Tensor, ts: torch.Tensor, generator: torch.Generator | None = None,
                   progress: bool = False) -> torch.Tensor:
    """Streaming Euler–Maruyama for any SDE with ``f_and_g_prod(t, z, v)`` and ``brownian_size``.

    Memory is O(1) in the number of steps: one standard normal of shape (batch, brownian_size) is drawn per
    step, on the device of ``z0``. Objects with ``probability_flow = True`` are integrated without noise
    (explicit Euler).

    Args:
        sde: e.g. a :class:`ReverseTimeSDE`; ``f(t, z)``, ``f_and_g_prod(t, z, v)`` and ``brownian_size``.
        z0: (batch, state_size) initial state at ``ts[0]``.
        ts: 1-D increasing times in the SDE's own time (at least 2); one step per interval.
        generator: the ``torch.Generator`` of the Brownian increments (on the device of ``z0``).
        progress: show a per-step progress bar.

    Returns:
        The state at ``ts[-1]``, shaped like ``z0``.

    Raises:
        ValueError: ``ts`` not 1-D with at least 2 times.
    """
    ts = torch.as_tensor(ts, device=z0.device)
    if ts.dim() != 1 or ts.numel() < 2:
        raise ValueError(f"ts must be 1-D with at least 2 times; got shape {tuple(ts.shape)}")
    noise = not getattr(sde, "probability_flow", False)
    m = sde.brownian_size
    z = z0
    for n in _progress(range(ts.numel() - 1), progress, "euler-maruyama"):
        t0, t1 = ts[n], ts[n + 1]
        h = (t1 - t0).to(z.dtype)
        if noise:
            dw = torch.randn(z.shape[0], m, generator=generator, dtype=z.dtype, device=z.device) * torch.sqrt(h)
            f, gdw = sde.f_and_g_prod(t0, z, dw)
            z = z + f * h + gdw
        else:
            z = z + sde.f(t0, z) * h
    return z


def _implicit_y_step(B: torch.Tensor, zeta: torch.Tensor, t: torch.Tensor, h: torch.Tensor, score_factor: float):
    """(I − hB + c h e_0 ζ̃(t)ᵀ)⁻¹, the backward-Euler step of the linear ỹ-dynamics at the new time t
    (c = ``score_factor``: 1 for the SDE, ½ for the ODE).

    Formed as S M̂⁻¹ S⁻¹ with S = diag(t^{j+½}): M̂ = S⁻¹ M S has O(1) entries (ζ̃_j ~ t^{−j−1}), so the
    K×K inverse is computed without loss; float64, on the device.
    """
    K = B.shape[0]
    s = t ** (torch.arange(K, dtype=torch.float64, device=B.device) + 0.5)
    Bhat = B * s[None, :] / s[:, None]
    M = torch.eye(K, dtype=torch.float64, device=B.device) - h * Bhat
    M[0] = M[0] + score_factor * h * zeta * s / s[0]
    return s[:, None] * torch.linalg.inv_ex(M).inverse / s[None, :]     # inv_ex: no error check, no host sync


def implicit_y_update(dynamics: LinearFractionalDynamics, y_newton: torch.Tensor, y0_increment: torch.Tensor,
                       zeta_next: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor, score_factor: float):
    """ỹ at t1: the explicit increment of its first (Brownian-driven) component, then the implicit linear step
    (backward Euler for −Bỹ + c e_0 ζ̃(t1)ᵀỹ, unconditionally stable; c = ``score_factor``)."""
    rhs = torch.cat([y_newton[..., :1] + y0_increment[..., None], y_newton[..., 1:]], dim=-1)
    step = _implicit_y_step(dynamics.newton_drift, zeta_next, t1, t0 - t1, score_factor)
    return rhs @ step.to(y_newton.dtype).T


def reverse_sde_step(dynamics, eps, u, y_newton, coef, coef_next, t0, t1, generator=None):
    """One Euler–Maruyama step of the reverse SDE in (u, ỹ) from t0 down to t1 (ε = ε_θ(u, t0) given).

    du = −[μu + δκε] dh + δ dW̄,  dỹ_0 = −κε dh + dW̄ (one shared normal), then ỹ implicitly (module docstring).
    """
    dtype = u.dtype
    h = (t0 - t1).to(dtype)
    mu, delta, kappa = coef["mu"].to(dtype), coef["delta"].to(dtype), coef["kappa"].to(dtype)
    xi = torch.randn(u.shape, generator=generator, dtype=dtype, device=u.device)
    u_new = u - h * (mu * u + delta * kappa * eps) + delta * torch.sqrt(h) * xi
    if dynamics.num_processes:
        y0_increment = -1.0 * h * kappa * eps + torch.sqrt(h) * xi
        y_newton = implicit_y_update(dynamics, y_newton, y0_increment, coef_next["zeta_newton"], t0, t1, 1.0)
    return u_new, y_newton


def probability_flow_step(dynamics, eps, u, y_newton, coef, coef_next, t0, t1, generator=None):
    """One Euler step of the probability-flow ODE in (u, ỹ) from t0 down to t1 (the score enters with ½)."""
    dtype = u.dtype
    h = (t0 - t1).to(dtype)
    mu, delta, kappa = coef["mu"].to(dtype), coef["delta"].to(dtype), coef["kappa"].to(dtype)
    drift = mu * u + 0.5 * delta * kappa * eps
    if dynamics.num_processes:
        drift = drift - 0.5 * delta * (y_newton * coef["zeta_newton"].to(dtype)).sum(-1)
    u_new = u - h * drift
    if dynamics.num_processes:
        y0_increment = -0.5 * h * kappa * eps
        y_newton = implicit_y_update(dynamics, y_newton, y0_increment, coef_next["zeta_newton"], t0, t1, 0.5)
    return u_new, y_newton


#: One step of each first-order scheme in innovation coordinates, by name.
INNOVATION_STEPS = {"sde": reverse_sde_step, "ode": probability_flow_step}


def sample_innovation(dynamics: LinearFractionalDynamics, eps_model: Callable, u: torch.Tensor,
                      y_newton: torch.Tensor, ts: torch.Tensor, method: str = "sde",
                      generator: torch.Generator | None = None, model_kwargs: dict | None = None,
                      progress: bool = False):
    """Integrate the reverse SDE (``"sde"``) or probability-flow ODE (``"ode"``) in coordinates (u, ỹ).

    Args:
        u: (batch, *shape) innovation u = x − ηᵀy at ``ts[0]``; y_newton: (batch, *shape, K) ỹ = N y.
        ts: decreasing times in (0, T], ts[0] the start (usually T), ts[-1] the end.
    Returns (u, ỹ) at ``ts[-1]``; x = u + η̃ᵀỹ. See the module docstring for the scheme (one step:
    :func:`reverse_sde_step`, :func:`probability_flow_step`). Everything stays on the device of ``u``; the
    only per-step host work is the Python loop itself.
    """
    V.check_choice(method, "method", tuple(INNOVATION_STEPS))
    step = INNOVATION_STEPS[method]
    kw = model_kwargs or {}
    batch = u.shape[0]
    coef = dynamics.coefficients(ts[0])
    for n in _progress(range(ts.numel() - 1), progress, f"gfdm {method}"):
        t0, t1 = ts[n], ts[n + 1]
        coef_next = dynamics.coefficients(t1)
        eps = eps_model(u, t0.to(u.dtype).expand(batch), **kw)
        u, y_newton = step(dynamics, eps, u, y_newton, coef, coef_next, t0, t1, generator)
        coef = coef_next
    return u, y_newton
