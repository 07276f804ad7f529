"""FractionalBrownianPath and FractionalOU: exactness, gradients, Pyro conventions, errors."""
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.integrate
import torch
from pyro import poutine
from torch.testing import assert_close

from fracsde.distributions import (
    FractionalBrownianPath,
    FractionalOU,
    _affine_combine,
    _associative_scan,
    _GaussianLogDensity,
    x_covariance,
)
from fracsde.fbm import FractionalBrownianMotion
from fracsde.kinds import rl_covariance
from fracsde.markov import MarkovApproxFBM, optimal_weights

F64 = torch.float64


def t64(x):
    return torch.as_tensor(x, dtype=F64)


def _irregular_grid(n, seed=0, start=0.0, stop=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.sort(start + (stop - start) * torch.rand(n, generator=g, dtype=F64))[0]


# =========================================================================== FractionalBrownianPath
@pytest.mark.parametrize("kind", ["type1", "type2"])
@pytest.mark.parametrize("uniform", [True, False])
def test_path_covariance_matches_foundation(kind, uniform):
    ts = torch.arange(1, 41, dtype=F64) / 40 if uniform else _irregular_grid(40, 1, 0.01, 3.0)
    for hurst in (0.05, 0.3, 0.5, 0.85):
        d = FractionalBrownianPath(t64(hurst), ts, kind=kind, scale=1.5)
        ref = FractionalBrownianMotion(hurst, kind).covariance(ts[:, None], ts[None, :])
        # type II: quadrature vs scipy's 2F1, both ~1e-14 relative (see rl_covariance)
        assert_close(d.covariance_matrix, 2.25 * ref, rtol=1e-11, atol=0)


def test_rl_covariance_matches_high_precision_quadrature():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 30
    for hurst, lo, hi in [(0.02, 0.5, 0.51), (0.1, 0.999, 1.0), (0.3, 0.001, 100.0), (0.9, 0.3, 3.0)]:
        a = hurst - 0.5
        nodes = [0, lo - (hi - lo), lo] if hi - lo < lo else [0, lo]     # split near the kink
        exact = mpmath.quad(lambda u, a=a, lo=lo, hi=hi: (hi - u) ** a * (lo - u) ** a, nodes)
        exact = float(exact / mpmath.gamma(hurst + 0.5) ** 2)
        got = float(rl_covariance(t64(hurst), t64(lo), t64(hi)))
        assert abs(got / exact - 1) < 1e-12, (hurst, lo, hi, got, exact)


@pytest.mark.parametrize("kind", ["type1", "type2"])
def test_path_log_prob_matches_mvn_and_gradcheck(kind):
    ts = _irregular_grid(12, 2, 0.05, 2.0)
    hurst = t64(0.35).requires_grad_()
    scale = t64(0.8).requires_grad_()
    x = FractionalBrownianPath(t64(0.35), ts, kind=kind, scale=0.8).sample((3,))
    d = FractionalBrownianPath(hurst, ts, kind=kind, scale=scale)
    ref = torch.distributions.MultivariateNormal(torch.zeros(12, dtype=F64), d.covariance_matrix.detach())
    assert_close(d.log_prob(x), ref.log_prob(x), rtol=1e-12, atol=1e-10)
    # differentiable in hurst and scale, both kinds (type II through the quadrature)
    assert torch.autograd.gradcheck(
        lambda h, s: FractionalBrownianPath(h, ts, kind=kind, scale=s).log_prob(x), (hurst, scale))


def test_gaussian_log_density_backward_matches_autograd():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(2, 7, 7, generator=g, dtype=F64)
    C = (A @ A.mT + torch.eye(7, dtype=F64)).requires_grad_()
    x = torch.randn(4, 2, 7, generator=g, dtype=F64, requires_grad=True)
    # the hand-written backward is the symmetric gradient: check it on symmetric perturbations
    assert torch.autograd.gradcheck(lambda C, x: _GaussianLogDensity.apply(0.5 * (C + C.mT), x), (C, x))
    singular = torch.ones(3, 3, dtype=F64, requires_grad=True)
    lp = _GaussianLogDensity.apply(singular, torch.ones(3, dtype=F64))
    assert lp.item() == -math.inf
    lp.backward()
    assert bool((singular.grad == 0).all())


def test_path_batching_expand_and_shapes():
    ts = torch.arange(1, 9, dtype=F64)
    d = FractionalBrownianPath(t64([[0.3], [0.6], [0.8]]), ts, scale=t64([1.0, 2.0]))
    assert d.batch_shape == (3, 2) and d.event_shape == (8,)
    x = d.sample((5,))
    assert x.shape == (5, 3, 2, 8)
    assert d.log_prob(x).shape == (5, 3, 2)
    e = FractionalBrownianPath(t64(0.4), ts).expand((4, 2))
    assert e.batch_shape == (4, 2)
    assert e.log_prob(e.sample()).shape == (4, 2)
    assert_close(e.log_prob(x[0, 0, 0]), FractionalBrownianPath(t64(0.4), ts).log_prob(x[0, 0, 0]).expand(4, 2))
    assert d.mean.shape == (3, 2, 8) and d.variance.shape == (3, 2, 8)


def test_path_rsample_second_moments():
    # M draws; the sample variance of a Gaussian has relative sd √(2/M): allow 4 of those
    M = 4000
    ts = t64([0.2, 0.5, 1.0, 2.5])
    torch.manual_seed(0)
    d = FractionalBrownianPath(t64(0.7), ts, kind="type2", scale=1.3)
    x = d.sample((M,))
    emp = torch.cov(x.T)
    tol = 4 * math.sqrt(2 / M)
    assert_close(emp.diagonal() / d.variance, torch.ones(4, dtype=F64), rtol=0, atol=tol)
    # the sample is differentiable in the parameters
    h = t64(0.7).requires_grad_()
    FractionalBrownianPath(h, ts).rsample().sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad)


def test_path_argument_errors():
    with pytest.raises(ValueError, match="strictly positive"):
        FractionalBrownianPath(0.5, torch.linspace(0, 1, 5))
    with pytest.raises(ValueError, match="kind"):
        FractionalBrownianPath(0.5, t64([1.0, 2.0]), kind="type3")
    with pytest.raises(ValueError, match="increasing"):
        FractionalBrownianPath(0.5, t64([1.0, 1.0]))
    with pytest.raises(ValueError, match="hurst"):
        FractionalBrownianPath(t64(1.0), t64([1.0, 2.0]), validate_args=True)
    with pytest.raises(ValueError, match="scale"):
        FractionalBrownianPath(0.5, t64([1.0, 2.0]), scale=-1.0, validate_args=True)
    d = FractionalBrownianPath(0.5, t64([1.0, 2.0]), validate_args=True)
    with pytest.raises(ValueError):
        d.log_prob(torch.tensor([1.0, float("nan")], dtype=F64))


# =========================================================================== FractionalOU: exactness
def _ou_kernel_covariance(hurst, theta, sigma, kind, s, t, gammas, horizon):
    """Independent reference: X_t = σ∫_0^t K(t − v) dW_v (+ a Y(0) term for type I), by scipy quad.

    With B̂ = Σω_k Y_k and Y_k(u) = e^{−γu}Y_k(0) + ∫_0^u e^{−γ(u−v)} dW_v,
    K(r) = Σ_k ω_k [e^{−θr} − γ_k (e^{−γ_k r} − e^{−θr}) / (θ − γ_k)],
    and the type-I start adds −σ Σ_k ω_k γ_k (e^{−γ_k t} − e^{−θt}) / (θ − γ_k) · Y_k(0).
    """
    w = optimal_weights(hurst, gammas, kind, horizon).weights.numpy()
    g = gammas.numpy()

    def K(r):
        return float(np.sum(w * (np.exp(-theta * r) - g * (np.exp(-g * r) - np.exp(-theta * r)) / (theta - g))))

    lo, hi = min(s, t), max(s, t)
    val, _ = scipy.integrate.quad(lambda v: K(lo - v) * K(hi - v), 0, lo, epsabs=1e-14, epsrel=1e-12, limit=200)
    cov = sigma ** 2 * val
    if kind == "type1":
        def c(tt):
            return -sigma * w * g * (np.exp(-g * tt) - np.exp(-theta * tt)) / (theta - g)
        P0 = 1.0 / (g[:, None] + g[None, :])
        cov += float(c(s) @ P0 @ c(t))
    return cov


@pytest.mark.parametrize("kind", ["type1", "type2"])
def test_ou_dense_covariance_matches_independent_quadrature(kind):
    ts = t64([0.1, 0.35, 0.8, 1.7])
    d = FractionalOU(0.7, 1.3, 0.9, ts, obs_noise=0.1, kind=kind, horizon=1.0)
    C = x_covariance(d)
    for i in range(4):
        for j in range(i, 4):
            ref = _ou_kernel_covariance(0.7, 1.3, 0.9, kind, float(ts[i]), float(ts[j]), d.gammas, 1.0)
            assert abs(float(C[i, j]) - ref) < 1e-9 * max(1.0, abs(ref)), (i, j, float(C[i, j]), ref)


@pytest.mark.parametrize("kind", ["type1", "type2"])
def test_ou_theta_zero_is_ma_fbm(kind):
    ts = _irregular_grid(30, 4, 0.0, 1.0)
    noise = MarkovApproxFBM(0.3, num_processes=3, kind=kind)
    d = FractionalOU(0.3, 0.0, 1.7, ts, obs_noise=0.1, kind=kind, horizon=1.0)
    assert_close(x_covariance(d), 1.7 ** 2 * noise.covariance(ts[:, None], ts[None, :]), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kind", ["type1", "type2"])
@pytest.mark.parametrize("grid", ["uniform", "irregular", "from_zero", "huge_steps"])
def test_ou_kalman_log_prob_equals_dense_mvn(kind, grid):
    ts = {
        "uniform": torch.arange(1, 81, dtype=F64) / 80,
        "irregular": _irregular_grid(80, 5, 0.001, 1.0),
        "from_zero": torch.linspace(0, 2, 60, dtype=F64),
        "huge_steps": t64([0.5, 10.0, 60.0, 61.0, 200.0]),   # γ_max·h up to 2800: doubling path
    }[grid]
    d = FractionalOU(t64(0.65), 1.3, 0.8, ts, obs_noise=0.07, kind=kind, x0=0.4, loc=-0.3, horizon=1.0)
    torch.manual_seed(1)
    y = d.sample((3,))
    assert_close(d.log_prob(y), d.to_multivariate_normal().log_prob(y), rtol=0, atol=1e-6)


def test_ou_kalman_matches_dense_batched_and_gradients():
    ts = _irregular_grid(40, 6, 0.0, 1.5)
    params = dict(hurst=t64([0.25, 0.75]), theta=t64([[0.5], [2.0], [4.0]]), sigma=t64(1.1), obs_noise=t64(0.2),
                  x0=t64(0.3), loc=t64(0.1))
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    d = FractionalOU(ts=ts, **leaves)
    assert d.batch_shape == (3, 2)
    torch.manual_seed(2)
    y = d.sample((4,)).detach()
    lp = d.log_prob(y)
    dense = d.to_multivariate_normal().log_prob(y)
    assert lp.shape == (4, 3, 2)
    assert_close(lp, dense, rtol=0, atol=1e-6)
    g_kalman = torch.autograd.grad(lp.sum(), list(leaves.values()), retain_graph=True)
    g_dense = torch.autograd.grad(dense.sum(), list(leaves.values()))
    for name, a, b in zip(leaves, g_kalman, g_dense, strict=True):
        assert_close(a, b, rtol=1e-6, atol=1e-8, msg=name)


def test_ou_log_prob_gradcheck_all_parameters():
    ts = t64([0.0, 0.1, 0.3, 0.4, 0.9, 1.0])
    y = t64([0.05, -0.2, 0.1, 0.3, 0.2, -0.1])
    args = [t64(v).requires_grad_() for v in (0.6, 1.5, 0.9, 0.3, 0.2, -0.1)]

    def f(h, th, s, r, x0, loc):
        return FractionalOU(h, th, s, ts, r, x0=x0, loc=loc, kind="type1").log_prob(y)

    assert torch.autograd.gradcheck(f, args, atol=1e-6, rtol=1e-5)


def test_ou_rsample_moments_and_gradient():
    # M draws: mean error sd √(C_ii/M), variance relative sd √(2/M); allow 4 sd
    M = 4000
    ts = t64([0.0, 0.2, 0.5, 1.0, 2.0])
    d = FractionalOU(t64(0.3), 1.0, 1.0, ts, obs_noise=0.1, x0=1.0, loc=0.5, kind="type1", horizon=1.0)
    torch.manual_seed(3)
    y = d.sample((M,))
    var = d.variance
    assert_close(y.mean(0), d.mean, rtol=0, atol=float(4 * (var / M).sqrt().max()))
    assert_close(y.var(0) / var, torch.ones(5, dtype=F64), rtol=0, atol=4 * math.sqrt(2 / M))
    emp_corr = torch.corrcoef(y.T)[1, 4]
    C = d.covariance_matrix
    true_corr = C[1, 4] / (C[1, 1] * C[4, 4]).sqrt()
    assert abs(float(emp_corr - true_corr)) < 4 * (1 - float(true_corr) ** 2) / math.sqrt(M)
    h = t64(0.3).requires_grad_()
    FractionalOU(h, 1.0, 1.0, ts, 0.1).rsample((2,)).sum().backward()
    assert torch.isfinite(h.grad)


# =========================================================================== FractionalOU: conventions
def test_ou_expand_and_pyro_trace():
    ts = torch.linspace(0, 1, 20, dtype=F64)
    d = FractionalOU(t64(0.6), 1.0, 1.0, ts, 0.1)
    e = d.expand((3,))
    assert e.batch_shape == (3,) and e.event_shape == (20,)
    y = d.sample()
    assert_close(e.log_prob(y), d.log_prob(y).expand(3))

    def model():
        h = pyro.sample("h", dist.Beta(t64(2.0), t64(2.0)))
        pyro.sample("y", FractionalOU(h, 1.0, 1.0, ts, 0.1), obs=y)

    tr = poutine.trace(poutine.condition(model, {"h": t64(0.6)})).get_trace()
    assert_close(tr.nodes["y"]["fn"].log_prob(y), d.log_prob(y))
    assert torch.isfinite(tr.log_prob_sum())


def test_ou_associative_scan_matches_loop():
    g = torch.Generator().manual_seed(7)
    for n in (1, 2, 3, 7, 8, 33):
        A = 0.5 * torch.randn(n, 2, 3, 3, generator=g, dtype=F64)
        b = torch.randn(n, 2, 3, generator=g, dtype=F64)
        _, scanned = _associative_scan(_affine_combine, (A, b))
        z = torch.zeros(2, 3, dtype=F64)
        for k in range(n):
            z = (A[k] @ z.unsqueeze(-1)).squeeze(-1) + b[k]
            assert_close(scanned[k], z, rtol=1e-12, atol=1e-12)


def test_ou_argument_errors():
    ts = torch.linspace(0, 1, 5, dtype=F64)
    with pytest.raises(ValueError, match="hurst"):
        FractionalOU(1.0, 1.0, 1.0, ts, 0.1, validate_args=True)
    with pytest.raises(ValueError, match="obs_noise"):
        FractionalOU(0.5, 1.0, 1.0, ts, 0.0, validate_args=True)
    with pytest.raises(ValueError, match="theta"):
        FractionalOU(0.5, -1.0, 1.0, ts, 0.1, validate_args=True)
    with pytest.raises(ValueError, match="kind"):
        FractionalOU(0.5, 1.0, 1.0, ts, 0.1, kind="rl")
    with pytest.raises(ValueError, match="non-negative"):
        FractionalOU(0.5, 1.0, 1.0, t64([-1.0, 0.0]), 0.1)
    with pytest.raises(ValueError, match="gammas"):
        FractionalOU(0.5, 1.0, 1.0, ts, 0.1, gammas=[1.0, -2.0])
    with pytest.raises(ValueError, match="num_processes"):
        FractionalOU(0.5, 1.0, 1.0, ts, 0.1, num_processes=0)


def test_ou_unbatched_equals_batched_for_every_length():
    # regression: a (D, D) right-hand side in a batched solve was read as D vectors when the
    # scan level had exactly D elements, so some lengths were silently wrong unbatched
    for n in range(1, 12):
        ts = torch.linspace(0, 1, n, dtype=F64)
        d = FractionalOU(t64(0.6), 1.0, 1.0, ts, 0.1, horizon=1.0)
        torch.manual_seed(n)
        y = d.sample()
        assert_close(d.log_prob(y), d.to_multivariate_normal().log_prob(y), rtol=0, atol=1e-9)
        assert_close(d.expand((2,)).log_prob(y), d.log_prob(y).expand(2), rtol=0, atol=1e-9)


def test_path_toeplitz_route_equals_dense_route():
    # ts = kδ with type I takes the O(n²) Durbin–Levinson route; a shifted grid takes the dense one
    ts = torch.arange(1, 65, dtype=F64) * 0.25
    hurst = t64([0.2, 0.75]).requires_grad_()
    scale = t64(1.7).requires_grad_()
    d = FractionalBrownianPath(hurst, ts, scale=scale)
    assert d._toeplitz_step == 0.25
    torch.manual_seed(4)
    x = d.sample((3,))
    lp = d.log_prob(x)
    dense = _GaussianLogDensity.apply(d.covariance_matrix, x)
    assert_close(lp, dense, rtol=1e-11, atol=1e-9)
    g1 = torch.autograd.grad(lp.sum(), (hurst, scale))
    g2 = torch.autograd.grad(dense.sum(), (hurst, scale))
    for a, b in zip(g1, g2, strict=True):
        assert_close(a, b, rtol=1e-8, atol=1e-8)
    assert FractionalBrownianPath(t64(0.3), ts + 0.1)._toeplitz_step is None
    assert FractionalBrownianPath(t64(0.3), ts, kind="type2")._toeplitz_step is None


@pytest.mark.parametrize("kind", ["type1", "type2"])
def test_ou_batch_of_hurst_equals_one_distribution_per_hurst(kind):
    """A batch of H (one weight solve for all) gives each series the log_prob and H-gradient of its own
    distribution; the weights are the batched optimal_weights (no per-H loop)."""
    ts = torch.linspace(0, 1, 31, dtype=F64)[1:]
    hurst = t64([0.15, 0.4, 0.6, 0.9]).requires_grad_()
    d = FractionalOU(hurst, 1.5, 0.7, ts, 0.1, kind=kind)
    assert_close(d.weights, optimal_weights(hurst, d.gammas, kind, d.horizon).weights, rtol=0, atol=0)
    torch.manual_seed(3)
    y = d.sample().detach()
    lp = d.log_prob(y)
    assert lp.shape == (4,)
    lp.sum().backward()
    for i in range(4):
        hi = hurst.detach()[i].clone().requires_grad_()
        lpi = FractionalOU(hi, 1.5, 0.7, ts, 0.1, kind=kind).log_prob(y[i])
        lpi.backward()
        assert_close(lp[i].detach(), lpi.detach(), rtol=1e-10, atol=1e-10)
        assert_close(hurst.grad[i], hi.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("n", [3, 4, 5, 6, 7, 8, 17, 64])
def test_ou_shared_matrix_scan_equals_general_scan(n):
    """On a uniform grid log_prob runs the scan specialised to shared step matrices; it equals the general
    associative scan (forced on the same distribution), values and gradients, for odd and even lengths."""
    ts = torch.linspace(0, 1, n + 1, dtype=F64)[1:] + 0.3          # first step (from 0) differs from the rest
    params = dict(hurst=t64([0.3, 0.8]), theta=t64(1.2), sigma=t64(0.9), obs_noise=t64(0.15), x0=t64(0.4))
    results = []
    for shared in (True, False):
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        d = FractionalOU(ts=ts, kind="type1", **leaves)
        assert d._uniform_steps
        if shared:                      # one sample, scored by both routes
            torch.manual_seed(5)
            y = d.sample((3,)).detach()
        else:
            d._uniform_steps = False
        lp = d.log_prob(y)
        results.append((lp.detach(), torch.autograd.grad(lp.sum(), list(leaves.values()))))
    assert_close(results[0][0], results[1][0], rtol=1e-11, atol=1e-10)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert_close(a, b, rtol=1e-9, atol=1e-10)
