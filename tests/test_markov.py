"""MA-fBM: weights, covariance, sampler, learnable H, validation."""
import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate

from fracsde import FractionalBrownianMotion, IllConditionedWarning, MarkovApproxFBM, geometric_gammas, optimal_weights
from stats_helpers import assert_covariance_matches, variogram_slope

# Reference sheet, type II, T = 1, gamma_max = 20 (printed to 4 digits / 2-3 significant digits).
REFERENCE = {
    (0.9, 2): ([0.7695, -0.9204], 0.0479),
    (0.9, 3): ([1.6948, -1.3197, -0.2640], 7.4e-5),
    (0.7, 2): ([0.9058, -0.7018], 0.0124),
    (0.3, 3): ([0.6727, 0.5635, 1.2289], 0.0085),
    (0.1, 3): ([0.6326, 0.4780, 4.4757], 0.24),
}


@pytest.mark.parametrize("key", sorted(REFERENCE))
def test_weights_match_reference_table(key):
    hurst, k = key
    weights, err = REFERENCE[key]
    noise = MarkovApproxFBM(hurst, k)
    # the table is rounded to 4 decimals: agreement to half a unit of the last digit
    np.testing.assert_allclose(noise.weights.numpy(), weights, rtol=0, atol=5e-5)
    # the sheet prints errors to 2-3 significant digits (0.0085 is 0.00845 rounded twice): agree within 1%
    assert float(noise.approximation_error) == pytest.approx(err, rel=1e-2)


def _mpmath_weights_type2(hurst, gammas, T=1.0):
    """Independent high-precision solve: A closed form, b and c by mpmath quadrature of the defining integrals."""
    mpmath.mp.dps = 30
    a = mpmath.mpf(hurst) + mpmath.mpf(1) / 2
    g = [mpmath.mpf(x) for x in gammas]
    K = len(g)
    A = mpmath.matrix(K, K)
    for i in range(K):
        for j in range(K):
            s = g[i] + g[j]
            A[i, j] = mpmath.quad(lambda t, s=s: (1 - mpmath.exp(-s * t)) / s, [0, T])
    # E[B_t Y_k(t)] = 1/Gamma(a) int_0^t u^{a-1} e^{-gamma u} du
    b = mpmath.matrix(K, 1)
    for k in range(K):
        def inner(t, k=k):
            return mpmath.quad(lambda u: u ** (a - 1) * mpmath.exp(-g[k] * u), [0, t]) / mpmath.gamma(a)
        b[k] = mpmath.quad(inner, [0, T])
    c = mpmath.quad(lambda t: t ** (2 * a - 1) / ((2 * a - 1) * mpmath.gamma(a) ** 2), [0, T])
    w = mpmath.lu_solve(A, b)
    err = 1 - sum(b[k] * w[k] for k in range(K)) / c
    return np.array([float(x) for x in w]), float(err)


@pytest.mark.parametrize("hurst,k", [(0.9, 3), (0.3, 3), (0.7, 2)])
def test_type2_weights_match_independent_high_precision_solve(hurst, k):
    gammas = geometric_gammas(k, 20.0)
    w_ref, err_ref = _mpmath_weights_type2(hurst, gammas.tolist())
    sol = optimal_weights(hurst, gammas, "type2")
    np.testing.assert_allclose(sol.weights.numpy(), w_ref, rtol=1e-6)
    assert float(sol.relative_error) == pytest.approx(err_ref, rel=1e-6)


@pytest.mark.parametrize("hurst", [0.25, 0.5, 0.8])
@pytest.mark.parametrize("gamma", [0.05, 1.0, 20.0])
def test_type1_moments_match_quadrature_of_defining_integrals(hurst, gamma):
    """b_k = int_0^T E[B_t (Y(t) - Y(0))] dt for standard fBM, checked by brute-force quadrature of the MvN kernel."""
    from fracsde.kinds import TypeI

    T = 1.0
    a = hurst + 0.5
    norm = math.sqrt(math.gamma(2 * hurst + 1) * math.sin(math.pi * hurst)) / math.gamma(a)

    def cov_b_y0(t):  # E[B_t Y(0)] = norm * int_{-inf}^0 [(t-s)^{H-1/2} - (-s)^{H-1/2}] e^{gamma s} ds
        def f(v):
            return ((t + v) ** (a - 1) - v ** (a - 1)) * math.exp(-gamma * v)
        return norm * integrate.quad(f, 0, np.inf, limit=200)[0]

    def cov_b_yt(t):  # E[B_t Y(t)]
        def f0(u):
            return u ** (a - 1) * math.exp(-gamma * u)
        part1 = integrate.quad(f0, 0, np.inf, limit=200)[0]
        part2 = math.exp(-gamma * t) * part1
        return norm * (part1 - part2)

    b_quad = integrate.quad(lambda t: cov_b_yt(t) - cov_b_y0(t), 0, T, limit=100)[0]
    b, c = TypeI().moments(torch.tensor(hurst, dtype=torch.float64), torch.tensor([gamma], dtype=torch.float64), T)
    assert float(b[0]) == pytest.approx(b_quad, rel=1e-6)
    assert float(c) == pytest.approx(T ** (2 * hurst + 1) / (2 * hurst + 1))


@pytest.mark.parametrize("kind", ["type1", "type2"])
def test_error_identity_and_covariance_bound(kind):
    """For the L2-optimal projection, int_0^T (Var B_t - Var B^_t) dt = err * c exactly (normal equations),
    and by Cauchy-Schwarz  int int |Cov_B - Cov_B^| ds dt <= 2 T c sqrt(err)."""
    T = 1.0
    for hurst in (0.3, 0.7):
        noise = MarkovApproxFBM(hurst, 3, kind=kind)
        fbm = FractionalBrownianMotion(hurst, kind)
        c = integrate.quad(lambda t, fbm=fbm: float(fbm.variance(t)), 0, T)[0]
        lhs = integrate.quad(lambda t, fbm=fbm, noise=noise: float(fbm.variance(t) - noise.covariance(t, t)), 0, T,
                             limit=200)[0]
        err = float(noise.approximation_error)
        assert lhs == pytest.approx(err * c, rel=1e-6)
        # midpoint rule on a 200 x 200 grid; its error is far below the bound's slack
        ts = (torch.arange(200, dtype=torch.float64) + 0.5) / 200 * T
        diff = (fbm.covariance(ts[:, None], ts[None, :]) - noise.covariance(ts[:, None], ts[None, :])).abs()
        assert float(diff.mean()) * T * T <= 2 * T * c * math.sqrt(err)


@pytest.mark.filterwarnings("ignore::fracsde.ApproximationWarning")   # includes K = 1 on purpose
@pytest.mark.parametrize("kind", ["type1", "type2"])
@given(hurst=st.floats(0.55, 0.95))
@settings(max_examples=10)
def test_error_falls_from_k1_to_k3(kind, hurst):
    errs = [float(MarkovApproxFBM(hurst, k, kind=kind).approximation_error) for k in (1, 2, 3)]
    assert errs[0] > errs[2]
    assert errs[1] > errs[2] if kind == "type2" else errs[0] > errs[1]


@pytest.mark.filterwarnings("ignore::fracsde.ApproximationWarning")   # includes K = 1 on purpose
@given(hurst=st.floats(0.05, 0.95), k=st.integers(1, 5), kind=st.sampled_from(["type1", "type2"]),
       times=st.lists(st.floats(0.0, 3.0), min_size=2, max_size=12, unique=True))
@settings(max_examples=25)
def test_ma_covariance_symmetric_psd(hurst, k, kind, times):
    noise = MarkovApproxFBM(hurst, k, kind=kind)
    ts = torch.tensor(sorted(times), dtype=torch.float64)
    cov = noise.covariance(ts[:, None], ts[None, :])
    torch.testing.assert_close(cov, cov.T)
    evals = torch.linalg.eigvalsh(cov)
    assert float(evals.min()) >= -1e-10 * max(1.0, float(evals.max()))


@pytest.mark.parametrize("method", ["innovations", "state"])
@pytest.mark.parametrize("kind", ["type1", "type2"])
@pytest.mark.parametrize("grid", ["uniform", "irregular_offset"])
def test_sampler_matches_closed_form_covariance(kind, grid, method):
    gen = torch.Generator().manual_seed(1)
    noise = MarkovApproxFBM(0.7, 3, kind=kind)
    ts = torch.linspace(0, 1, 9) if grid == "uniform" else torch.tensor([0.05, 0.1, 0.4, 0.45, 1.0, 2.5])
    x = noise.sample(ts, 40_000, generator=gen, dtype=torch.float64, method=method)
    assert x.shape == (40_000, len(ts))
    assert_covariance_matches(x, noise.covariance(ts[:, None].double(), ts[None, :].double()))


def test_sampled_state_has_exact_ou_law_and_sums_to_path():
    """Y_k(t) of type II has Cov (1 - e^{-(g_i+g_j)t})/(g_i+g_j); paths equal sum_k w_k Y_k."""
    gen = torch.Generator().manual_seed(2)
    noise = MarkovApproxFBM(0.6, 4)
    ts = torch.tensor([0.0, 0.3, 1.0])
    paths, states = noise.sample(ts, 40_000, generator=gen, dtype=torch.float64, return_state=True)
    assert states.shape == (40_000, 3, 4)
    torch.testing.assert_close(paths, states @ noise.weights)
    assert bool((states[:, 0] == 0).all())
    for i, t in enumerate(ts.tolist()[1:], start=1):
        assert_covariance_matches(states[:, i], noise.ou_covariance(torch.tensor(t)))


def test_type1_state_starts_stationary():
    gen = torch.Generator().manual_seed(3)
    noise = MarkovApproxFBM(0.4, 3, kind="type1")
    _, states = noise.sample(torch.tensor([0.0, 0.5]), 40_000, generator=gen, dtype=torch.float64,
                             return_state=True)
    for i in range(2):  # stationary: same law at every time
        assert_covariance_matches(states[:, i], noise.stationary_covariance())


def test_sampler_reproducible_with_generator_and_float32_default():
    noise = MarkovApproxFBM(0.7, 3)
    ts = torch.linspace(0, 1, 33)
    a = noise.sample(ts, 4, generator=torch.Generator().manual_seed(5))
    b = noise.sample(ts, 4, generator=torch.Generator().manual_seed(5))
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("hurst", [0.5, 0.7, 0.8])
def test_ma_variogram_slope_in_covered_scales(hurst):
    """Within the scales the gamma grid covers ([0.02, 0.25] for gamma in [1/20, 20], K = 5) the
    variogram slope of the closed-form MA-fBM covariance is 2H +- 0.05; far below 1/gamma_max B^ is a
    semimartingale and the slope tends to 1. Samples reproduce the closed-form slope."""
    noise = MarkovApproxFBM(hurst, 5)

    def closed_form(d):
        ts = torch.linspace(0, 1 - d, 50, dtype=torch.float64)
        return float((noise.covariance(ts, ts) + noise.covariance(ts + d, ts + d)
                      - 2 * noise.covariance(ts, ts + d)).mean())

    lags = np.geomspace(0.02, 0.25, 8)
    slope = np.polyfit(np.log(lags), np.log([closed_form(d) for d in lags]), 1)[0]
    assert abs(slope - 2 * hurst) < 0.05
    tiny = np.geomspace(1e-4, 1e-3, 5)
    assert abs(np.polyfit(np.log(tiny), np.log([closed_form(d) for d in tiny]), 1)[0] - 1) < 0.05

    paths = noise.sample(torch.linspace(0, 1, 513), 512, generator=torch.Generator().manual_seed(0),
                         dtype=torch.float64)
    lag_steps = np.unique(np.round(lags * 512).astype(int))
    sampled = variogram_slope(paths, lag_steps, 1 / 512)
    expected = np.polyfit(np.log(lag_steps / 512), np.log([closed_form(k / 512) for k in lag_steps]), 1)[0]
    assert abs(sampled - expected) < 0.05


def test_module_buffers_move_and_state_dict():
    noise = MarkovApproxFBM(0.7, 3)
    names = set(noise.state_dict())
    assert {"gammas", "_weights", "_hurst"} <= names
    moved = noise.to(torch.device("meta"))
    assert moved.gammas.device.type == "meta" and moved.weights.device.type == "meta"


def test_learnable_hurst_gradient_matches_finite_differences():
    noise = MarkovApproxFBM(0.65, 3, learnable_hurst=True)
    params = list(noise.parameters())
    assert len(params) == 1
    assert float(noise.hurst.detach()) == pytest.approx(0.65)
    w = noise.weights
    (w * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)).sum().backward()
    grad_logit = float(noise.hurst_logit.grad)

    def objective(h):
        sol = optimal_weights(h, noise.gammas, "type2")
        return float((sol.weights * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)).sum())

    eps = 1e-6
    h = 0.65
    fd = (objective(h + eps) - objective(h - eps)) / (2 * eps)
    assert grad_logit == pytest.approx(fd * h * (1 - h), rel=1e-6)


@pytest.mark.parametrize("kind", ["type1", "type2"])
def test_weights_gradcheck_in_hurst(kind):
    g = geometric_gammas(3, 20.0)

    def weights_and_error(h):
        sol = optimal_weights(h, g, kind)
        return sol.weights, sol.relative_error

    h = torch.tensor(0.37, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(weights_and_error, (h,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_ill_conditioned_system_warns_with_achieved_error():
    with pytest.warns(IllConditionedWarning, match=r"relative L2 error"):
        MarkovApproxFBM(0.7, 8)


def test_explicit_gammas_override_grid():
    noise = MarkovApproxFBM(0.7, num_processes=99, gammas=[0.5, 3.0])
    assert noise.num_processes == 2
    torch.testing.assert_close(noise.gammas, torch.tensor([0.5, 3.0], dtype=torch.float64))


def test_geometric_grid():
    torch.testing.assert_close(geometric_gammas(3, 20.0), torch.tensor([0.05, 1.0, 20.0], dtype=torch.float64))
    torch.testing.assert_close(geometric_gammas(1, 20.0), torch.tensor([1.0], dtype=torch.float64))


@pytest.mark.parametrize("kwargs,match", [
    (dict(hurst=1.0), "hurst"), (dict(hurst=0.0), "hurst"), (dict(hurst=float("nan")), "hurst"),
    (dict(hurst=0.5, num_processes=0), "num_processes"), (dict(hurst=0.5, gamma_max=1.0), "gamma_max"),
    (dict(hurst=0.5, gammas=[1.0, -2.0]), "gammas"), (dict(hurst=0.5, horizon=0.0), "horizon"),
    (dict(hurst=0.5, kind="type3"), "kind"),
])
def test_constructor_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MarkovApproxFBM(**kwargs)


def test_sample_rejects_bad_input():
    noise = MarkovApproxFBM(0.5, 2)
    with pytest.raises(ValueError, match="strictly increasing"):
        noise.sample(torch.tensor([0.0, 0.5, 0.5]), 2)
    with pytest.raises(ValueError, match="non-negative"):
        noise.sample(torch.tensor([-0.1, 0.5]), 2)
    with pytest.raises(ValueError, match="batch_size"):
        noise.sample(torch.tensor([0.0, 0.5]), 0)
    with pytest.raises(TypeError, match="batch_size"):
        noise.sample(torch.tensor([0.0, 0.5]), 2.5)


@pytest.mark.parametrize("kind", ["type1", "type2"])
@pytest.mark.parametrize("K", [1, 3, 5])
def test_batched_hurst_solve_equals_one_at_a_time(kind, K):
    """A (2, 3) tensor of H is solved at once; each entry equals the scalar solve (same float64 formulas; only the
    LAPACK solve sees several right-hand sides, so they agree to round-off times cond(A) <= 8e6 at K = 5)."""
    g = geometric_gammas(K, 20.0)
    hurst = torch.tensor([[0.05, 0.3, 0.5], [0.62, 0.8, 0.97]], dtype=torch.float64)
    sol = optimal_weights(hurst, g, kind)
    assert sol.weights.shape == (2, 3, K) and sol.relative_error.shape == (2, 3)
    for idx in np.ndindex(2, 3):
        one = optimal_weights(float(hurst[idx]), g, kind)
        assert one.weights.shape == (K,) and one.relative_error.shape == ()
        torch.testing.assert_close(sol.weights[idx], one.weights, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(sol.relative_error[idx], one.relative_error, rtol=1e-9, atol=1e-12)
        assert sol.condition_number == one.condition_number


@pytest.mark.parametrize("kind", ["type1", "type2"])
def test_batched_hurst_gradients(kind):
    """Gradients in a batch of H: gradcheck, and each equals the gradient of its own scalar solve."""
    g = geometric_gammas(3, 20.0)
    h = torch.tensor([0.21, 0.5, 0.83], dtype=torch.float64, requires_grad=True)

    def weights_and_error(hh):
        sol = optimal_weights(hh, g, kind)
        return sol.weights, sol.relative_error

    assert torch.autograd.gradcheck(weights_and_error, (h,), eps=1e-6, atol=1e-7, rtol=1e-5)
    v = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    (optimal_weights(h, g, kind).weights @ v).sum().backward()
    for i in range(3):
        hi = h.detach()[i].clone().requires_grad_()
        (optimal_weights(hi, g, kind).weights @ v).backward()
        assert float(h.grad[i]) == pytest.approx(float(hi.grad), rel=1e-9, abs=1e-12)


def test_markov_approx_fbm_rejects_a_batch_of_hurst():
    with pytest.raises(ValueError, match="single Hurst index"):
        MarkovApproxFBM(torch.tensor([0.3, 0.7]), 3)
