"""fracsde.linear: linear fractional dynamics, their conditional laws and the stable parameterisation."""
import math

import mpmath as mp
import numpy as np
import pytest
import torch

from fracsde.linear import (
    LinearFractionalDynamics,
    VESchedule,
    VPSchedule,
    augmented_covariance,
    naive_conditionals,
    newton_basis,
)
from fracsde.markov import MarkovApproxFBM
from fracsde.noise import MarkovNoise
from stats_helpers import assert_covariance_matches, bonferroni_z

# these tests check the numerics of dynamics that include deliberately high terminal log-SNRs
pytestmark = pytest.mark.filterwarnings("ignore::fracsde.PriorMismatchWarning")




class _WithoutClosedForm(VESchedule):
    """The same VE coefficients, with the closed-form marker removed (forces the Lyapunov ODE)."""

    closed_form = None

    def __init__(self, base):
        super().__init__(base.sigma_min, base.sigma_max, base.horizon)


def _ma(hurst, K):
    noise = MarkovApproxFBM(hurst, K)
    return noise.gammas, noise.weights


def _ve_reference(gammas, weights, t, sigma_min=0.01, sigma_max=50.0, dps=60):
    """σ̃, κ, η, ζ for μ = 0, g = a e^{λt} from the exponential-sum closed form in 60-digit arithmetic."""
    with mp.workdps(dps):
        g = [mp.mpf(float(x)) for x in gammas]
        w = [mp.mpf(float(x)) for x in weights]
        K, t = len(g), mp.mpf(t)
        lam = mp.log(mp.mpf(sigma_max) / sigma_min)
        a = mp.mpf(sigma_min) * mp.sqrt(2 * lam)
        betas = g + [lam]
        coef = [-a * w[k] * g[k] / (lam - g[k]) * mp.exp((lam - g[k]) * t) for k in range(K)]
        coef.append(a * lam * sum(w[k] / (lam - g[k]) for k in range(K)))

        def integral(b):
            return (mp.exp(b * t) - 1) / b

        sxx = sum(coef[i] * coef[j] * integral(betas[i] + betas[j]) for i in range(K + 1) for j in range(K + 1))
        sxy = [mp.exp(-g[k] * t) * sum(coef[i] * integral(betas[i] + g[k]) for i in range(K + 1)) for k in range(K)]
        syy = mp.matrix(K, K)
        for i in range(K):
            for j in range(K):
                syy[i, j] = (1 - mp.exp(-(g[i] + g[j]) * t)) / (g[i] + g[j])
        eta = mp.lu_solve(syy, mp.matrix(sxy))
        s2 = sxx - sum(sxy[k] * eta[k] for k in range(K))
        zeta = mp.lu_solve(syy, mp.matrix([1] * K))
        delta = a * mp.exp(lam * t) * sum(w) - sum(eta)
        return {"sigma": float(mp.sqrt(s2)), "kappa": float(delta / mp.sqrt(s2)), "sxx": float(sxx),
                "eta": np.array([float(e) for e in eta]), "zeta": np.array([float(z) for z in zeta])}


# ------------------------------------------------------------------------------------------------- Newton basis
@pytest.mark.parametrize("K", [1, 2, 3, 5])
def test_newton_basis_identities(K):
    g, _ = _ma(0.7, K)
    N, Ninv, B = newton_basis(g)
    eye = torch.eye(K, dtype=torch.float64)
    torch.testing.assert_close(N @ Ninv, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(N @ torch.ones(K, dtype=torch.float64), eye[0], atol=1e-12, rtol=0)   # N 1 = e_0
    torch.testing.assert_close(N @ torch.diag(g) @ Ninv, B, atol=1e-10, rtol=0)
    assert torch.equal(B, torch.diag(g) + torch.diag(torch.ones(K - 1, dtype=torch.float64), -1))


def test_newton_basis_rejects_repeated_rates():
    with pytest.raises(ValueError, match="distinct"):
        newton_basis([1.0, 2.0, 1.0])


# ------------------------------------------------------------------------------------------------- covariance
@pytest.mark.parametrize("K", [1, 3, 5])
def test_ve_closed_form_matches_lyapunov_ode(K):
    g, w = _ma(0.8, K)
    ts = np.array([1e-4, 1e-2, 0.2, 0.6, 1.0])
    closed = augmented_covariance(VESchedule(), g.numpy(), w.numpy(), ts)   # closed form (VE, K >= 1)
    ode = augmented_covariance(_WithoutClosedForm(VESchedule()), g.numpy(), w.numpy(), ts)   # Lyapunov ODE
    scale = np.sqrt(np.einsum("nii->ni", closed))
    np.testing.assert_allclose(closed / scale[:, :, None] / scale[:, None, :],
                               ode / scale[:, :, None] / scale[:, None, :], atol=1e-9, rtol=0)


@pytest.mark.parametrize("schedule, formula", [
    (VPSchedule(0.1, 20.0), lambda t: (math.exp(-0.5 * (0.1 * t + 9.95 * t * t)),
                                       -math.expm1(-(0.1 * t + 9.95 * t * t)))),
    (VESchedule(0.01, 50.0), lambda t: (1.0, 1e-4 * math.expm1(2 * math.log(5000.0) * t))),
])
def test_no_fractional_processes_is_exactly_brownian(schedule, formula):
    dyn = LinearFractionalDynamics(schedule)
    ts = [1e-5, 1e-3, 0.1, 0.5, 1.0]
    m = dyn.marginal(torch.tensor(ts, dtype=torch.float64))
    c = torch.tensor([formula(t)[0] for t in ts], dtype=torch.float64)
    var = torch.tensor([formula(t)[1] for t in ts], dtype=torch.float64)
    torch.testing.assert_close(m.c, c, rtol=1e-14, atol=0)
    torch.testing.assert_close(m.sigma ** 2, var, rtol=1e-13, atol=0)
    torch.testing.assert_close(m.cov_xx, var, rtol=1e-9, atol=0)     # the Lyapunov ODE agrees
    assert m.eta.shape == (5, 0) and m.cov_yy.shape == (5, 0, 0)
    torch.testing.assert_close(m.kappa * m.sigma, m.g, rtol=1e-13, atol=0)   # δ = G_x when K = 0


# ------------------------------------------------------------------------------------------------- stable core
@pytest.mark.parametrize("K, tol", [(3, 1e-7), (5, 1e-4)])
def test_conditionals_match_high_precision_reference(K, tol):
    """σ̃, κ, η, ζ against 60-digit arithmetic. For K = 5 the values below 0.012 are the power-law
    continuation (σ̃ ~ 1e-14 … 1e-20 there), hence the looser tolerance."""
    g, w = _ma(0.9, K)
    dyn = LinearFractionalDynamics(VESchedule(), MarkovNoise(g, w))
    for t in [1e-3, 1e-2, 0.1, 1.0]:
        ref = _ve_reference(g, w, t)
        m = dyn.marginal(torch.tensor(t, dtype=torch.float64))
        assert abs(float(m.sigma) / ref["sigma"] - 1) < tol, (t, float(m.sigma), ref["sigma"])
        assert abs(float(m.kappa) / ref["kappa"] - 1) < tol, (t, float(m.kappa), ref["kappa"])
        assert np.abs(m.eta.numpy() - ref["eta"]).max() < tol * np.abs(ref["eta"]).max()
        zeta = (m.zeta_newton @ dyn.newton).numpy()                 # ζ = Nᵀ ζ̃
        assert np.abs(zeta - ref["zeta"]).max() < 1e-9 * np.abs(ref["zeta"]).max()


def test_naive_schur_complement_fails_where_stable_one_does_not():
    """The failure without the treatment: Schur complements of the float64 covariance give σ̃² of the
    wrong size or sign for K = 5 up to t ≈ 0.01 (and for K = 3 below t ≈ 1e-3); both agree at t = 1."""
    g, w = _ma(0.9, 5)
    dyn = LinearFractionalDynamics(VESchedule(), MarkovNoise(g, w))
    ts = [1e-3, 1e-2, 1.0]
    m = dyn.marginal(torch.tensor(ts, dtype=torch.float64))
    cov = torch.zeros(3, 6, 6, dtype=torch.float64)
    cov[:, 0, 0], cov[:, 0, 1:], cov[:, 1:, 0], cov[:, 1:, 1:] = m.cov_xx, m.cov_xy, m.cov_xy, m.cov_yy
    naive = naive_conditionals(cov, m.g * dyn.weights.sum())
    refs = [_ve_reference(g, w, t) for t in ts]
    ratio = naive["sigma2"] / torch.tensor([r["sigma"] ** 2 for r in refs], dtype=torch.float64)
    assert not (0.5 < float(ratio[0]) < 2) and not (0.5 < float(ratio[1]) < 2), ratio
    assert abs(float(ratio[2]) - 1) < 1e-6
    stable = (m.sigma ** 2) / torch.tensor([r["sigma"] ** 2 for r in refs], dtype=torch.float64)
    torch.testing.assert_close(stable, torch.ones(3, dtype=torch.float64), rtol=1e-3, atol=0)


@pytest.mark.parametrize("schedule", [VPSchedule(), VESchedule()])
@pytest.mark.parametrize("hurst, K", [(0.7, 2), (0.9, 3), (0.3, 5)])
def test_conditional_variance_identity(schedule, hurst, K):
    """(σ̃²)′ = 2μσ̃² + δ² (derived in docs/gfdm.md) between spline values at neighbouring times, across
    the resolved range and the power-law continuation."""
    g, w = _ma(hurst, K)
    dyn = LinearFractionalDynamics(schedule, MarkovNoise(g, w))
    t = torch.logspace(-4, 0, 17, dtype=torch.float64)
    t = t[t < 1 - 1e-3]
    h = 1e-4 * t
    lo, hi = dyn.coefficients(t - h), dyn.coefficients(t + h)
    mid = dyn.coefficients(t)
    lhs = (torch.log(hi["sigma"] ** 2) - torch.log(lo["sigma"] ** 2)) / (2 * h)      # (log σ̃²)′
    rhs = 2 * mid["mu"] + mid["kappa"] ** 2                                          # 2μ + δ²/σ̃²
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=0)


@pytest.mark.parametrize("schedule", [VPSchedule(), VESchedule()])
def test_stable_quantities_reproduce_the_lyapunov_covariance(schedule):
    """Σ_XX = σ̃² + η̃ᵀ Σ̃_YY η̃ and Σ_ỸX = Σ̃_YY η̃ (Newton basis) from the QR route equal the ODE's Σ."""
    g, w = _ma(0.7, 3)
    dyn = LinearFractionalDynamics(schedule, MarkovNoise(g, w))
    t = torch.tensor([1e-4, 1e-2, 0.3, 1.0], dtype=torch.float64)
    m = dyn.marginal(t)
    L = dyn.newton_cov_factor(t)
    Lt_eta = (L.transpose(-1, -2) @ m.eta_newton[..., None])[..., 0]
    torch.testing.assert_close(m.sigma ** 2 + (Lt_eta ** 2).sum(-1), m.cov_xx, rtol=1e-9, atol=0)
    sxy_newton = (L @ Lt_eta[..., None])[..., 0]
    torch.testing.assert_close(sxy_newton, m.cov_xy @ dyn.newton.T, rtol=1e-8, atol=1e-14)
    torch.testing.assert_close(L @ L.transpose(-1, -2), dyn.newton @ m.cov_yy @ dyn.newton.T, rtol=1e-9,
                               atol=1e-16)


def test_marginal_shapes_dtypes_devices_and_validation():
    g, w = _ma(0.7, 2)
    dyn = LinearFractionalDynamics(VPSchedule(), MarkovNoise(g, w))
    t = torch.rand(4, 3) * 0.9 + 0.05
    m = dyn.marginal(t)
    assert m.c.shape == m.sigma.shape == (4, 3) and m.eta.shape == (4, 3, 2) and m.cov_yy.shape == (4, 3, 2, 2)
    assert m.c.dtype == torch.float32 and m.eta.dtype == torch.float32
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"t must lie in \(0, T\]"):
            dyn.marginal(torch.tensor([0.5, bad]))
    with pytest.raises(ValueError, match="weights must have the shape of gammas"):
        LinearFractionalDynamics(VPSchedule(), MarkovNoise(g, w[:1]))
    with pytest.raises(TypeError, match="MarkovNoise"):
        LinearFractionalDynamics(VPSchedule(), g)
    with pytest.raises(ValueError, match="type2"):
        LinearFractionalDynamics(VPSchedule(), MarkovNoise(g, w, kind="type1"))
    with pytest.raises(TypeError, match="Schedule"):
        LinearFractionalDynamics("vp", MarkovNoise(g, w))
    names = {n for n, _ in dyn.named_buffers()}
    assert {"gammas", "weights", "newton", "spline.coef"} <= names       # moved by .to(device)
    before = dyn.marginal(torch.tensor([0.3], dtype=torch.float64)).sigma
    dyn.to(torch.float32).half()    # dtype casts are ignored: the tables must stay float64
    assert dyn.spline.coef.dtype == torch.float64 and dyn.gammas.dtype == torch.float64
    assert torch.equal(dyn.marginal(torch.tensor([0.3], dtype=torch.float64)).sigma, before)


def test_horizon_is_a_parameter():
    """Nothing assumes T = 1: β(t) = β_min + (β_max − β_min) t/T on [0, 2], the OU rates stay absolute."""
    T = 2.0
    dyn0 = LinearFractionalDynamics(VPSchedule(horizon=T))
    t = torch.tensor([0.1, 1.0, 2.0], dtype=torch.float64)
    log_c = -0.5 * (0.1 * t + 19.9 * t * t / (2 * T))
    torch.testing.assert_close(dyn0.conditional_std(t) ** 2, -torch.expm1(2 * log_c), rtol=1e-13, atol=0)
    noise = MarkovApproxFBM(0.7, 2, horizon=T)
    dyn = LinearFractionalDynamics(VPSchedule(horizon=T), noise)
    m = dyn.marginal(t)
    L = dyn.newton_cov_factor(t)
    Lt_eta = (L.transpose(-1, -2) @ m.eta_newton[..., None])[..., 0]
    torch.testing.assert_close(m.sigma ** 2 + (Lt_eta ** 2).sum(-1), m.cov_xx, rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="T = 2"):
        dyn.marginal(torch.tensor(2.1))


def test_exact_marginal_draw_has_the_tabulated_covariance():
    """(x_t − c x_0, y_t) from sample_marginal against Σ(t) (Lyapunov ODE): every entry within Bonferroni-
    corrected standard errors (stats_helpers)."""
    g, w = _ma(0.7, 2)
    dyn = LinearFractionalDynamics(VPSchedule(), MarkovNoise(g, w))
    gen = torch.Generator().manual_seed(3)
    n = 20000
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    for t in (0.05, 0.6):
        x, y = dyn.sample_marginal(x0, t, generator=gen)
        m = dyn.marginal(torch.tensor(t, dtype=torch.float64))
        z = torch.cat([x - m.c * 0.7, y[:, 0]], dim=1)
        cov = torch.zeros(3, 3, dtype=torch.float64)
        cov[0, 0], cov[0, 1:], cov[1:, 0], cov[1:, 1:] = m.cov_xx, m.cov_xy, m.cov_xy, m.cov_yy
        assert_covariance_matches(z, cov)


def test_forward_marginals_match_monte_carlo_with_fracsde_sdeint():
    """Simulate dX = μX dt + g dB̂ with fracsde.sdeint (SRK, additive noise) and recover the OU states Y_k
    from auxiliary one-process solves on the SAME Brownian motion (B̂' = ω'_k Y_k). Then at t = 0.1, 0.5, 1:
    E X_t = c x_0; Cov(X_t − c x_0, Y_t) = Σ(t); u = X_t − c x_0 − ηᵀY_t has variance σ̃² and is uncorrelated
    with Y_t. Tolerances: z standard errors (z Bonferroni over the scalar checks; covariance entries via
    stats_helpers)."""
    import torchsde

    from fracsde.sde import FractionalSDE, sdeint

    hurst, K, n, x0, dt = 0.7, 2, 8000, 0.8, 2e-3
    noise = MarkovApproxFBM(hurst, K)
    sch = VPSchedule()
    dyn = LinearFractionalDynamics(sch, noise)

    def coef(fn, t, like):
        return fn(torch.as_tensor(t, dtype=torch.float64)).to(like.dtype)

    class Forward(FractionalSDE):
        noise_type, sde_type = "additive", "ito"

        def f(self, t, x):
            return coef(sch.mu, t, x) * x

        def g(self, t, x):
            return (coef(sch.g, t, x) * torch.ones_like(x))[..., None]

    class Silent(FractionalSDE):
        noise_type, sde_type = "additive", "ito"

        def f(self, t, x):
            return torch.zeros_like(x)

        def g(self, t, x):
            return torch.zeros_like(x)[..., None]

    ts = torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=torch.float64)
    torch.manual_seed(11)
    bm = torchsde.BrownianInterval(t0=0.0, t1=1.0, size=(n, 1), dtype=torch.float64, dt=dt,
                                   levy_area_approximation="space-time")
    xs = sdeint(Forward(noise), torch.full((n, 1), x0, dtype=torch.float64), ts, method="srk", dt=dt, bm=bm)[..., 0]
    ys = []
    for k in range(K):
        aux = MarkovNoise(noise.gammas[k:k + 1], [1.0])                      # B̂' = Y_k exactly
        _, bhat = sdeint(Silent(aux), torch.zeros(n, 1, dtype=torch.float64), ts, method="srk", dt=dt, bm=bm,
                         return_noise=True)
        ys.append(bhat[..., 0])
    ys = torch.stack(ys, -1)                                                   # (len(ts), n, K)
    z = bonferroni_z(3 * (2 + K))
    for i in range(1, ts.numel()):
        m = dyn.marginal(ts[i])
        x, y = xs[i], ys[i]
        assert abs(float(x.mean() - m.c * x0)) <= z * float(torch.sqrt(m.cov_xx / n))
        cov = torch.zeros(K + 1, K + 1, dtype=torch.float64)
        cov[0, 0], cov[0, 1:], cov[1:, 0], cov[1:, 1:] = m.cov_xx, m.cov_xy, m.cov_xy, m.cov_yy
        assert_covariance_matches(torch.cat([(x - m.c * x0)[:, None], y], 1), cov)
        u = x - m.c * x0 - (y * m.eta).sum(-1)
        assert abs(float(u.var() / m.sigma ** 2) - 1) <= z * math.sqrt(2 / n)
        corr = torch.corrcoef(torch.cat([u[None], y.T]))[0, 1:]
        assert float(corr.abs().max()) <= z / math.sqrt(n)
