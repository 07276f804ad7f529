"""FVP and FVE: the fractional variance-preserving / variance-exploding dynamics of GFDM (Nobis et al. 2024).

dX = μ(t) X dt + g(t) dB̂ per coordinate, B̂ the type II Markov approximation of fBM with K processes
(γ geometric up to γ_max, ω L2-optimal for the Hurst index H, solved in float64). ``num_processes=0`` is
B̂ = W, exactly VP / VE of Song et al. (2021). With ``normalize_weights`` (GFDM's default) ω is rescaled so
that Var(X_T | x_0) equals that of the Brownian model (1 − c(T)² for FVP, σ_min²((σ_max/σ_min)² − 1) for FVE).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fracsde import _validation as V
from fracsde.linear import LinearFractionalDynamics, Schedule, VESchedule, VPSchedule, augmented_covariance
from fracsde.markov import MarkovApproxFBM
from fracsde.noise import MarkovNoise

__all__ = ["FVP", "FVE"]


class _Fractional(LinearFractionalDynamics):
    family = ""

    def __init__(self, schedule: Schedule, hurst: float, num_processes: int, gamma_max: float,
                 normalize_weights: bool, grid_size: int, covariance_jitter: float = 0.0,
                 x_variance_offset: float = 0.0, rates: str = "geometric", max_rate: float | None = None):
        V.check_positive_int(num_processes, "num_processes", 0)
        V.check_hurst(hurst)
        self.rates, self.max_rate = rates, max_rate
        if num_processes > 0:
            fitted = MarkovApproxFBM(hurst=float(hurst), num_processes=num_processes, gamma_max=gamma_max,
                                     kind="type2", horizon=schedule.horizon, rates=rates, max_rate=max_rate)
            gammas, weights = fitted.gammas.clone(), fitted.weights.detach().clone()
            approx_error = float(fitted.approximation_error)
        else:
            gammas = weights = torch.zeros(0, dtype=torch.float64)
            approx_error = 0.0
        scale = 1.0
        if normalize_weights and num_processes > 0:
            scale = _terminal_scale(schedule, gammas.numpy(), weights.numpy())
        noise = MarkovNoise(gammas, weights * scale, kind="type2", horizon=schedule.horizon) if num_processes else None
        super().__init__(schedule, noise, grid_size=grid_size, covariance_jitter=covariance_jitter,
                         x_variance_offset=x_variance_offset)
        self.hurst = float(hurst)
        self.gamma_max = float(gamma_max)
        self.normalize_weights = bool(normalize_weights)
        #: the factor applied to the L2-optimal weights (1 when not normalised)
        self.weight_scale = scale
        #: relative L2 error of the MA-fBM approximation (before normalisation)
        self.approximation_error = approx_error
        self.T = schedule.horizon

    @property
    def name(self) -> str:
        """"VP"/"VE" for K = 0, else e.g. "FVP(H=0.9,K=3)"."""
        if self.num_processes == 0:
            return self.family[1:]
        rule = "" if self.rates == "geometric" else f",rates={self.rates}" + (
            "" if self.max_rate is None else f",max_rate={self.max_rate:g}")
        return f"{self.family}(H={self.hurst:g},K={self.num_processes}{rule})"

    def extra_repr(self) -> str:
        return (f"hurst={self.hurst:g}, num_processes={self.num_processes}, gamma_max={self.gamma_max:g}, "
                f"normalize_weights={self.normalize_weights}, schedule={self.schedule!r}")


def _terminal_scale(schedule: Schedule, gammas: np.ndarray, weights: np.ndarray) -> float:
    """√(Var_Brownian(T) / Var_fractional(T)): X is linear in ω, so Var X_T scales with the square."""
    var = augmented_covariance(schedule, gammas, weights, np.array([schedule.horizon]))[0, 0, 0]
    target = float(schedule.brownian_variance(torch.tensor(schedule.horizon, dtype=torch.float64)))
    if not var > 0:
        raise ValueError("cannot normalise the weights: Var(X_T | x_0) is not positive")
    return math.sqrt(target / var)


class FVP(_Fractional):
    """Fractional variance preserving: β(t) = β_min + (β_max − β_min) t/T, μ = −β/2, g = √β.

    Args:
        hurst: H ∈ (0, 1).
        num_processes: K ≥ 0 (0 = VP).
        gamma_max: largest OU rate of the geometric grid.
        normalize_weights: rescale ω so that Var(X_T | x_0) = 1 − c(T)² as for VP.
        beta_min: β(0) of the schedule.
        beta_max: β(T) of the schedule.
        T: the horizon.
        grid_size: knots of the coefficient tables.
        covariance_jitter: 0 (exact, default) or the official code's 1e−4: its conditional law of X given Y,
            from Σ_YY + jitter·diag(e^{−2γt}), in training and sampling (see docs/gfdm.md, "paper-compatible mode").
        rates: the rate rule of :class:`fracsde.MarkovApproxFBM` (``"geometric"``, ``"optimal"``, ``"quadrature"``);
            the coefficient tables refuse rates they cannot resolve in float64, naming the limit (e.g. K = 8 needs
            max_rate ≤ 20 at H = 0.2).
        max_rate: cap on the rule's largest rate (1/time).
    """

    family = "FVP"

    def __init__(self, hurst: float = 0.9, num_processes: int = 3, gamma_max: float = 20.0,
                 normalize_weights: bool = True, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0,
                 grid_size: int = 2048, covariance_jitter: float = 0.0, rates: str = "geometric",
                 max_rate: float | None = None):
        super().__init__(VPSchedule(beta_min, beta_max, T), hurst, num_processes, gamma_max, normalize_weights,
                         grid_size, covariance_jitter, rates=rates, max_rate=max_rate)


class FVE(_Fractional):
    """Fractional variance exploding: μ = 0, g = σ_min √(2 ln r / T) r^{t/T}, r = σ_max/σ_min.

    Args:
        hurst: H ∈ (0, 1).
        num_processes: K ≥ 0 (0 = VE).
        gamma_max: largest OU rate of the geometric grid.
        normalize_weights: rescale ω so that Var(X_T | x_0) = σ_min²((σ_max/σ_min)² − 1) as for VE.
        sigma_min: σ(0) > 0.
        sigma_max: σ(T) > sigma_min.
        T: the horizon.
        grid_size: knots of the coefficient tables.
        covariance_jitter: as in :class:`FVP`.
        sigma_min_offset: add σ_min² to Σ_XX as the official code does (Song et al.'s VE convention).
        rates: the rate rule, as in :class:`FVP`.
        max_rate: cap on the rule's largest rate (1/time).
    """

    family = "FVE"

    def __init__(self, hurst: float = 0.9, num_processes: int = 3, gamma_max: float = 20.0,
                 normalize_weights: bool = True, sigma_min: float = 0.01, sigma_max: float = 50.0, T: float = 1.0,
                 grid_size: int = 2048, covariance_jitter: float = 0.0, sigma_min_offset: bool = False,
                 rates: str = "geometric", max_rate: float | None = None):
        super().__init__(VESchedule(sigma_min, sigma_max, T), hurst, num_processes, gamma_max, normalize_weights,
                         grid_size, covariance_jitter, sigma_min ** 2 if sigma_min_offset else 0.0, rates=rates,
                         max_rate=max_rate)
        self.sigma_min_offset = bool(sigma_min_offset)
