"""Latent fractional SDEs fitted by variational inference (Daems et al., ICLR 2024).

Prior:      dX = f_θ(t, X) dt + σ dB̂,   B̂ = MA-fBM (K OU processes, one W), H learnable.
Posterior:  the same SDE with the driving W shifted by a control u_φ(t, x, y):
            dy_k = (−γ_k y_k + u) dt + dW,   dX = [f − σ Σω_kγ_k y_k + σ(Σω)u] dt + σ(Σω) dW.
By Girsanov, KL(posterior ‖ prior) over paths = E ½∫|u|² dt, so with observations y_obs at some
times, ELBO = E_q[log p(y_obs | X)] − E_q[½∫|u|² dt] ≤ log p(y_obs).

The solve is :func:`fracsde.sde.sdeint` with ``return_kl=True`` (the KL is an extra state channel).
For a linear prior with Gaussian observations the optimal control is affine in the augmented state
(x, y_1..y_K) with time-dependent coefficients; :class:`AffineControl` holds exactly that family, so
on the fractional bridge the learned posterior can match the exact Gaussian bridge
(:func:`exact_bridge`, from the closed-form covariances in :mod:`fracsde.distributions`).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from . import _validation as V
from .distributions import FractionalOU, x_covariance
from .markov import MarkovApproxFBM
from .noise import MarkovNoise
from .numerics import discretize_linear_sde
from .sde import FractionalSDE, sdeint

__all__ = ["LatentFractionalSDE", "ELBO", "AffineControl", "MLPControl", "LinearDrift", "fit", "exact_bridge",
           "OptimalBridgeControl", "BridgeProblem"]


# ---------------------------------------------------------------------------------------- controls
class _TimeFeatures(nn.Module):
    """t ↦ [t/T, sin(πkt/T), cos(πkt/T) (k = 1..3), e^{−λ(T−t)/T} (λ = 4, 16, 64)] on [0, T].

    The Fourier part is smooth on [0, T]; the decaying exponentials resolve what happens just
    before T, where a control that conditions on an observation at T varies on short scales
    (its gain grows like 1/Var(y | state) as t → T).
    """

    freqs: torch.Tensor
    rates: torch.Tensor

    def __init__(self, horizon: float, num_frequencies: int = 3, rates=(4.0, 16.0, 64.0)):
        super().__init__()
        self.register_buffer("freqs", math.pi / horizon * torch.arange(1, num_frequencies + 1, dtype=torch.float64))
        self.register_buffer("rates", torch.tensor(rates, dtype=torch.float64) / horizon)
        self.horizon = horizon
        self.size = 1 + 2 * num_frequencies + len(rates)

    def forward(self, t: torch.Tensor, dtype) -> torch.Tensor:
        t = torch.as_tensor(t).to(dtype).reshape(1)
        arg = t * self.freqs.to(dtype)
        decay = torch.exp(-self.rates.to(dtype) * (self.horizon - t))
        return torch.cat([t / self.horizon, torch.sin(arg), torch.cos(arg), decay])


class AffineControl(nn.Module):
    """u(t, x, y) = a(t) + B(t) [x; vec y], with a(t), B(t) produced by a small MLP of t.

    For a linear prior observed with Gaussian noise the optimal control (Doob's h-transform) is
    of this form, so this family contains the exact posterior; for nonlinear priors it is a
    state-affine approximation at each time.

    Args:
        state_dim: d (x is flattened to d numbers). noise_dim: m. num_processes: K.
        horizon: the time span the features are scaled to. hidden: MLP width.
    """

    def __init__(self, state_dim: int, noise_dim: int, num_processes: int, horizon: float = 1.0, hidden: int = 32):
        super().__init__()
        self.d, self.m, self.K = state_dim, noise_dim, num_processes
        self.features = _TimeFeatures(horizon)
        n_in = state_dim + noise_dim * num_processes
        last = nn.Linear(hidden, noise_dim * (1 + n_in))
        self.net = nn.Sequential(nn.Linear(self.features.size, hidden), nn.Tanh(), last)
        nn.init.zeros_(last.weight)   # start at u = 0: the posterior starts at the prior
        nn.init.zeros_(last.bias)

    def forward(self, t, x, y):
        b = x.shape[0]
        z = torch.cat([x.reshape(b, -1), y.reshape(b, -1)], 1)            # (b, d + mK)
        coef = self.net(self.features(t, x.dtype)).reshape(self.m, 1 + z.shape[1])
        return coef[:, 0] + z @ coef[:, 1:].T


class MLPControl(nn.Module):
    """u(t, x, y) = MLP([features(t), x, vec y]): a general nonlinear control (last layer starts at 0)."""

    def __init__(self, state_dim: int, noise_dim: int, num_processes: int, horizon: float = 1.0, hidden: int = 64):
        super().__init__()
        self.features = _TimeFeatures(horizon)
        n_in = self.features.size + state_dim + noise_dim * num_processes
        last = nn.Linear(hidden, noise_dim)
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), last)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, t, x, y):
        b = x.shape[0]
        feats = self.features(t, x.dtype).expand(b, -1)
        return self.net(torch.cat([feats, x.reshape(b, -1), y.reshape(b, -1)], 1))


class LinearDrift(nn.Module):
    """f(t, x) = −θ (x − μ), with θ ≥ 0 and μ optionally learnable (θ stored as its log)."""

    log_theta: torch.Tensor
    loc: torch.Tensor

    def __init__(self, theta: float = 1.0, loc: float = 0.0, learnable: bool = False):
        super().__init__()
        log_theta = torch.tensor(math.log(V.check_positive_float(theta, "theta")), dtype=torch.float64)
        loc_t = torch.tensor(float(loc), dtype=torch.float64)
        if learnable:
            self.log_theta, self.loc = nn.Parameter(log_theta), nn.Parameter(loc_t)
        else:
            self.register_buffer("log_theta", log_theta)
            self.register_buffer("loc", loc_t)

    @property
    def theta(self) -> torch.Tensor:
        return self.log_theta.exp()

    def forward(self, t, x):
        return -self.theta.to(x.dtype) * (x - self.loc.to(x.dtype))


# ---------------------------------------------------------------------------------------- the model
class _PriorView(FractionalSDE):
    """The uncontrolled prior of a LatentFractionalSDE (shares its modules)."""

    def __init__(self, latent: LatentFractionalSDE):
        super().__init__(latent.noise, noise_type="additive", sde_type="ito")
        object.__setattr__(self, "_latent", latent)   # not a submodule: no double registration

    def f(self, t, x):
        return self._latent.f(t, x)

    def g(self, t, x):
        return self._latent.g(t, x)


class LatentFractionalSDE(FractionalSDE):
    """A latent SDE whose prior is fractional and whose posterior is a controlled MA-fBM SDE.

    Args:
        drift: ``f(t, x) -> (batch, d)`` for ``x`` of shape ``(batch, d)`` (an ``nn.Module``, e.g. a
            neural network or :class:`LinearDrift`).
        control: ``u(t, x, y) -> (batch, d)`` with ``y`` the OU states ``(batch, d, K)``
            (e.g. :class:`AffineControl` or :class:`MLPControl`).
        noise: any :class:`fracsde.MarkovNoise`, e.g. a :class:`MarkovApproxFBM` (``learnable_hurst=True`` to
            learn H) or user-given rates and weights.
        state_dim: d; each coordinate is driven by its own copy of B̂ (additive noise, m = d).
        sigma: initial diffusion scale (> 0); ``learn_sigma`` makes it a parameter.
        obs_noise: std of the Gaussian observation noise; ``learn_obs_noise`` makes it a parameter.

    Every tensor is float64 (``.to(torch.float32)`` works if you need float32).

    Example:
        >>> noise = MarkovApproxFBM(0.7, num_processes=3, learnable_hurst=True)
        >>> model = LatentFractionalSDE(LinearDrift(1.0), AffineControl(1, 1, 3), noise)
        >>> ts = torch.linspace(0, 1, 51, dtype=torch.float64)
        >>> out = model.elbo(ts, obs_index=torch.tensor([50]), obs=torch.tensor([[0.8]], dtype=torch.float64),
        ...                  num_samples=64, dt=0.02)
        >>> (-out.elbo).backward()
    """

    noise_type = "additive"
    sde_type = "ito"
    log_sigma: torch.Tensor
    log_obs_noise: torch.Tensor
    x0: torch.Tensor
    _prior: FractionalSDE

    def __init__(self, drift: nn.Module, control: nn.Module, noise: MarkovNoise, state_dim: int = 1,
                 sigma: float = 1.0, obs_noise: float = 0.1, learn_sigma: bool = False,
                 learn_obs_noise: bool = False, x0: torch.Tensor | None = None):
        super().__init__(noise)
        self.drift = drift
        self.controller = control
        self.state_dim = V.check_positive_int(state_dim, "state_dim")
        log_sigma = torch.full((state_dim,), math.log(V.check_positive_float(sigma, "sigma")), dtype=torch.float64)
        log_obs = torch.tensor(math.log(V.check_positive_float(obs_noise, "obs_noise")), dtype=torch.float64)
        if learn_sigma:
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)
        if learn_obs_noise:
            self.log_obs_noise = nn.Parameter(log_obs)
        else:
            self.register_buffer("log_obs_noise", log_obs)
        x0 = torch.zeros(state_dim, dtype=torch.float64) if x0 is None else torch.as_tensor(x0, dtype=torch.float64)
        if x0.shape != (state_dim,):
            raise ValueError(f"x0 must have shape (state_dim,) = ({state_dim},); got {tuple(x0.shape)}")
        self.register_buffer("x0", x0)
        self.double()
        object.__setattr__(self, "_prior", _PriorView(self))   # a view, not a submodule

    @property
    def prior(self) -> FractionalSDE:
        """The uncontrolled prior SDE (same drift, diffusion and noise; no control)."""
        return self._prior

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.exp()

    @property
    def obs_noise(self) -> torch.Tensor:
        return self.log_obs_noise.exp()

    # -- the SDE (torch shapes: x (batch, d)) -----------------------------------------------
    def f(self, t, x):
        return self.drift(t, x)

    def g(self, t, x):
        return torch.diag_embed(self.sigma.to(x.dtype).expand(x.shape[0], -1))

    def control(self, t, x, y):
        return self.controller(t, x, y)

    # -- sampling and the ELBO --------------------------------------------------------------
    def _x0(self, num_samples: int, dtype) -> torch.Tensor:
        V.check_positive_int(num_samples, "num_samples")
        return self.x0.to(dtype).expand(num_samples, -1).clone()

    def sample_posterior(self, ts, num_samples: int, dt: float = 0.01, method: str = "midpoint",
                         return_kl: bool = False, **kwargs):
        """Paths ``(len(ts), num_samples, d)`` of the controlled SDE (and the running KL if asked), detached
        (for samples that carry gradients, e.g. an ELBO, use :meth:`elbo` or ``sdeint`` with ``return_kl``)."""
        with torch.no_grad():
            return self._posterior(ts, num_samples, dt, method, return_kl, **kwargs)

    def _posterior(self, ts, num_samples, dt, method, return_kl, **kwargs):
        return sdeint(self, self._x0(num_samples, self.log_sigma.dtype), ts, method=method, dt=dt,
                      return_kl=return_kl, **kwargs)

    def sample_prior(self, ts, num_samples: int, dt: float = 0.01, method: str = "midpoint", **kwargs):
        """Paths ``(len(ts), num_samples, d)`` of the uncontrolled prior."""
        return sdeint(self.prior, self._x0(num_samples, self.log_sigma.dtype), ts, method=method, dt=dt, **kwargs)

    def elbo(self, ts, obs_index, obs, num_samples: int = 64, dt: float = 0.01, method: str = "midpoint",
             **kwargs) -> ELBO:
        """Monte-Carlo ELBO of observations ``obs`` (n_obs, d) taken at ``ts[obs_index]``.

        Returns an :class:`ELBO` with the mean ELBO (differentiable), the mean log-likelihood and
        KL, and the per-sample ELBO terms (for a standard error).
        """
        obs_index = torch.as_tensor(obs_index, dtype=torch.long)
        obs = torch.as_tensor(obs, dtype=self.log_sigma.dtype)
        if obs.shape != (obs_index.numel(), self.state_dim):
            expected = (obs_index.numel(), self.state_dim)
            raise ValueError(f"obs must have shape (len(obs_index), state_dim) = {expected}; "
                             f"got {tuple(obs.shape)}")
        xs, kl = self._posterior(ts, num_samples, dt, method, True, **kwargs)
        r = self.obs_noise.to(xs.dtype)
        resid = (xs[obs_index] - obs[:, None, :]) / r                       # (n_obs, batch, d)
        loglik = (-0.5 * resid ** 2 - torch.log(r) - 0.5 * math.log(2 * math.pi)).sum((0, 2))
        per_sample = loglik - kl[-1]
        return ELBO(per_sample.mean(), loglik.mean(), kl[-1].mean(), per_sample.detach(), xs)


class ELBO(NamedTuple):
    elbo: torch.Tensor            # 0-d, the Monte-Carlo ELBO (differentiable)
    log_likelihood: torch.Tensor  # 0-d, E_q log p(obs | X)
    kl: torch.Tensor              # 0-d, E_q ½∫|u|² dt
    per_sample: torch.Tensor      # (num_samples,), detached per-path ELBO terms
    paths: torch.Tensor           # (len(ts), num_samples, d) posterior paths


# ---------------------------------------------------------------------------------------- the bridge
class BridgeProblem:
    """Prior dX = −θX dt + σ dB̂ (MA-fBM, X_0 = 0), one observation y = X_T + N(0, r²).

    Holds the linear-Gaussian model and gives the exact posterior (mean, std over a grid),
    the exact log evidence log p(y), and the exact optimal control. The noise is the MA-fBM of
    (hurst, num_processes, gamma_max, kind, horizon), or any :class:`fracsde.MarkovNoise` passed as
    ``driving_noise`` (then ``hurst`` may be None).
    """

    def __init__(self, hurst: float | None, theta: float = 1.0, sigma: float = 1.0, obs_time: float = 1.0,
                 obs_value: float = 1.0, obs_noise: float = 0.1, num_processes: int = 3, gamma_max: float = 20.0,
                 kind: str = "type2", horizon: float = 1.0, driving_noise: MarkovNoise | None = None):
        if driving_noise is None:
            V.check_hurst(hurst)
        elif not isinstance(driving_noise, MarkovNoise):
            raise TypeError(f"driving_noise must be a fracsde.MarkovNoise; got {type(driving_noise).__name__}")
        self.hurst = None if hurst is None else float(hurst)
        self.theta, self.sigma = float(theta), float(sigma)
        self.obs_time = V.check_positive_float(obs_time, "obs_time")
        self.obs_value, self.obs_noise = float(obs_value), V.check_positive_float(obs_noise, "obs_noise")
        self.num_processes, self.gamma_max, self.kind, self.horizon = num_processes, gamma_max, kind, horizon
        self.driving_noise = driving_noise

    def noise(self, learnable_hurst: bool = False) -> MarkovNoise:
        """The driving noise: ``driving_noise`` if given, else a fresh MA-fBM (learnable H on request)."""
        if self.driving_noise is not None:
            if learnable_hurst:
                raise ValueError("learnable_hurst needs the MA-fBM of hurst/num_processes; a driving_noise was given")
            return self.driving_noise
        assert self.hurst is not None            # checked in __init__ when there is no driving_noise
        return MarkovApproxFBM(self.hurst, self.num_processes, self.gamma_max, kind=self.kind, horizon=self.horizon,
                               learnable_hurst=learnable_hurst)

    def _dist(self, ts) -> FractionalOU:
        if self.driving_noise is not None:
            return FractionalOU(None, self.theta, self.sigma, ts, self.obs_noise, noise=self.driving_noise)
        return FractionalOU(torch.tensor(self.hurst, dtype=torch.float64), self.theta, self.sigma, ts,
                            self.obs_noise, num_processes=self.num_processes, gamma_max=self.gamma_max,
                            kind=self.kind, horizon=self.horizon)

    def exact_posterior(self, ts):
        """Exact mean and std of X_t given y at each t in ``ts`` (float64, from closed-form covariances)."""
        ts = V.as_times(ts, dtype=torch.float64)
        grid, inverse = torch.unique(torch.cat([ts, ts.new_tensor([self.obs_time])]), sorted=True, return_inverse=True)
        C = x_covariance(self._dist(grid))
        i_obs = inverse[-1]
        c_tT = C[inverse[:-1], i_obs]
        s = C[i_obs, i_obs] + self.obs_noise ** 2
        mean = c_tT * self.obs_value / s
        var = C[inverse[:-1], inverse[:-1]] - c_tT ** 2 / s
        return mean, var.clamp(min=0).sqrt()

    def prior_std(self, ts) -> torch.Tensor:
        """Prior std of X_t over ``ts`` (closed form)."""
        ts = V.as_times(ts, dtype=torch.float64)
        return x_covariance(self._dist(ts)).diagonal().clamp(min=0).sqrt()

    def log_evidence(self) -> float:
        """log p(y) = log N(y; 0, Var X_T + r²)."""
        var = float(x_covariance(self._dist(torch.tensor([self.obs_time], dtype=torch.float64)))[0, 0])
        s = var + self.obs_noise ** 2
        return -0.5 * (math.log(2 * math.pi * s) + self.obs_value ** 2 / s)

    def model(self, control: nn.Module, learnable_hurst: bool = False) -> LatentFractionalSDE:
        return LatentFractionalSDE(LinearDrift(self.theta), control, self.noise(learnable_hurst), state_dim=1,
                                   sigma=self.sigma, obs_noise=self.obs_noise)

    def optimal_control(self) -> OptimalBridgeControl:
        return OptimalBridgeControl(self)


class OptimalBridgeControl(nn.Module):
    """The exact optimal control of the bridge: u*(t, z) = Gᵀ ∇_z log p(y | z_t = z) (Doob h-transform).

    With z = (x, y_1..y_K), F, G the augmented drift matrix and noise vector, Φ = e^{F(T−t)},
    Q = Cov of z_T given z_t:   u* = (e₀ᵀΦG) (y − e₀ᵀΦz) / (e₀ᵀQe₀ + r²).
    A reference for tests (it evaluates a matrix exponential per call).
    """

    F: torch.Tensor
    G: torch.Tensor

    def __init__(self, problem: BridgeProblem):
        super().__init__()
        self.problem = problem
        d = problem._dist(torch.tensor([problem.obs_time], dtype=torch.float64))
        F, G = d.augmented_system
        self.register_buffer("F", F.detach())
        self.register_buffer("G", G.detach())

    def forward(self, t, x, y):
        p = self.problem
        tau = (p.obs_time - torch.as_tensor(t, dtype=torch.float64)).clamp(min=0).reshape(1)
        A, Q = discretize_linear_sde(self.F, self.G, tau)
        row = A[0, 0]                                                  # e₀ᵀΦ, (D,)
        s = Q[0, 0, 0] + p.obs_noise ** 2
        z = torch.cat([x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)], 1).to(torch.float64)
        u = (row @ self.G) * (p.obs_value - z @ row) / s
        return u.to(x.dtype)[:, None]


def exact_bridge(hurst: float, ts, theta: float = 1.0, obs_time: float = 1.0, obs_value: float = 1.0,
                 obs_noise: float = 0.1, **kwargs):
    """Exact posterior mean and std over ``ts`` of the fractional bridge (see :class:`BridgeProblem`)."""
    return BridgeProblem(hurst, theta=theta, obs_time=obs_time, obs_value=obs_value, obs_noise=obs_noise,
                         **kwargs).exact_posterior(ts)


def fit(model: LatentFractionalSDE, ts, obs_index, obs, steps: int = 300, lr: float = 0.02,
        lr_final: float | None = None, num_samples: int = 64, dt: float = 0.02, method: str = "midpoint",
        generator: torch.Generator | None = None, callback: Callable[[int, ELBO], None] | None = None):
    """A plain ELBO loop with Adam (learning rate decaying geometrically from ``lr`` to ``lr_final``).

    Returns the list of ELBO values (floats: one host sync per step, for the history).
    """
    V.check_positive_int(steps, "steps")
    lr = V.check_positive_float(lr, "lr")
    lr_final = lr if lr_final is None else V.check_positive_float(lr_final, "lr_final")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=(lr_final / lr) ** (1.0 / max(1, steps - 1)))
    history = []
    for step in range(steps):
        opt.zero_grad()
        out = model.elbo(ts, obs_index, obs, num_samples=num_samples, dt=dt, method=method, generator=generator)
        (-out.elbo).backward()
        opt.step()
        sched.step()
        history.append(float(out.elbo.detach()))
        if callback is not None:
            callback(step, out)
    return history
