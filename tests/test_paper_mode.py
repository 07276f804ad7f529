"""The paper-compatible mode: the official GFDM code's jittered conditional law, used consistently."""
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from fracsde import PriorMismatchWarning
from models.gfdm import FVE, FVP, DynamicsSpec

F64 = torch.float64


def _reference_sigma(dyn, t, jitter, x_offset=0.0):
    """Independent: Σ(t) from the Lyapunov ODE at rtol 1e-12 (own right-hand side), + jitter·diag(e^{−2γt}),
    + offset on Σ_XX, then the Schur complement."""
    g, w = dyn.gammas.numpy(), dyn.weights.numpy()
    K = g.size
    n = K + 1

    def rhs(s, flat):
        S = flat.reshape(n, n)
        st = torch.tensor(s, dtype=F64)
        mu, gg = float(dyn.schedule.mu(st)), float(dyn.schedule.g(st))
        F = np.zeros((n, n))
        F[0, 0] = mu
        F[0, 1:] = -gg * w * g
        F[1:, 1:] = -np.diag(g)
        G = np.concatenate([[gg * w.sum()], np.ones(K)])
        return (F @ S + S @ F.T + np.outer(G, G)).ravel()

    sol = solve_ivp(rhs, (0.0, t), np.zeros(n * n), method="DOP853", rtol=1e-12, atol=1e-24)
    S = sol.y[:, -1].reshape(n, n)
    syy = S[1:, 1:] + np.diag(jitter * np.exp(-2 * g * t))
    return math.sqrt(S[0, 0] + x_offset - S[0, 1:] @ np.linalg.solve(syy, S[1:, 0]))


@pytest.mark.parametrize("t", [0.01, 0.1, 0.5, 1.0])
def test_jittered_sigma_matches_an_independent_schur_complement(t):
    dyn = FVP(0.9, 3, covariance_jitter=1e-4)
    got = float(dyn.conditional_std(torch.tensor(t, dtype=F64)))
    assert got == pytest.approx(_reference_sigma(dyn, t, 1e-4), rel=1e-6)


def test_official_fve_with_jitter_and_sigma_min_offset():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PriorMismatchWarning)      # FVE(0.9, 3): λ(T) = −3.8
        dyn = FVE(0.9, 3, covariance_jitter=1e-4, sigma_min_offset=True)
        exact = FVE(0.9, 3)
    for t in (0.05, 0.3):
        got = float(dyn.conditional_std(torch.tensor(t, dtype=F64)))
        assert got == pytest.approx(_reference_sigma(dyn, t, 1e-4, 0.01 ** 2), rel=1e-6)
    t = torch.tensor(0.1, dtype=F64)
    ratio = float(dyn.conditional_std(t) / exact.conditional_std(t))
    assert ratio == pytest.approx(316, rel=0.01)                  # ../shared/REFERENCE.md §6


def test_sigma_min_offset_alone_adds_a_constant_variance():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PriorMismatchWarning)
        a, b = FVE(0.9, 2), FVE(0.9, 2, sigma_min_offset=True)
    t = torch.tensor([1e-3, 0.2, 1.0], dtype=F64)
    torch.testing.assert_close(b.conditional_std(t) ** 2 - a.conditional_std(t) ** 2, torch.full_like(t, 1e-4),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("hurst,K", [(0.9, 2), (0.9, 3), (0.7, 3)])
def test_jittered_u_diffusion_is_consistent(hurst, K):
    """κ²σ̃² = (σ̃²)′ − 2μσ̃² ≥ 0: the reverse SDE of u keeps the marginals N(c x_0, σ̃²) the network is trained on
    (checked against central differences of σ̃², an independent path from the spline derivative used inside)."""
    dyn = FVP(hurst, K, covariance_jitter=1e-4)
    t = torch.tensor([0.02, 0.1, 0.3, 0.6, 0.9], dtype=F64)
    h = 1e-5 * t
    s2 = lambda x: dyn.conditional_std(x) ** 2                     # noqa: E731
    growth = (s2(t + h) - s2(t - h)) / (2 * h) - 2 * dyn.schedule.mu(t) * s2(t)
    coef = dyn.coefficients(t)
    assert bool((growth > 0).all())
    torch.testing.assert_close(coef["kappa"] ** 2 * coef["sigma"] ** 2, growth, rtol=1e-4, atol=0)


def test_default_is_exact_and_the_spec_round_trips_the_mode():
    assert FVP(0.9, 3).covariance_jitter == 0.0
    spec = DynamicsSpec.parse("fvp:H=0.9,K=3,covariance_jitter=1e-4")
    dyn = spec.build()
    assert dyn.covariance_jitter == 1e-4 and DynamicsSpec.from_dynamics(dyn) == spec


def test_bad_jitter_is_refused():
    with pytest.raises(ValueError, match="covariance_jitter must be finite and >= 0"):
        FVP(0.9, 3, covariance_jitter=-1e-4)
    with pytest.raises(ValueError, match="apply to fractional dynamics"):
        FVP(0.9, 0, covariance_jitter=1e-4)
