"""Exact fBM references: covariance formulas, samplers, Hurst scaling, validation."""

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fracsde import FractionalBrownianMotion
from stats_helpers import assert_covariance_matches, variogram_slope

KINDS = ["type1", "type2"]


def _rl_cov_quadrature(hurst, s, t):
    """Defining integral, after v = (s - u)^(a+1) / (a+1), which removes the (s - u)^a endpoint singularity."""
    mpmath.mp.dps = 30
    s, t = mpmath.mpf(min(s, t)), mpmath.mpf(max(s, t))
    a = mpmath.mpf(hurst) - mpmath.mpf(1) / 2
    def f(w):
        return (t - s + ((a + 1) * w) ** (1 / (a + 1))) ** a

    return float(mpmath.quad(f, [0, s ** (a + 1) / (a + 1)]) / mpmath.gamma(a + 1) ** 2)


def _rl_cov_mpmath_hyp2f1(hurst, s, t):
    mpmath.mp.dps = 30
    s, t = mpmath.mpf(min(s, t)), mpmath.mpf(max(s, t))
    a = mpmath.mpf(hurst) - mpmath.mpf(1) / 2
    return float(s ** (a + 1) * t ** a * mpmath.hyp2f1(-a, 1, a + 2, s / t) / ((a + 1) * mpmath.gamma(a + 1) ** 2))


@given(hurst=st.floats(0.02, 0.98), s=st.floats(0.01, 3.0), t=st.floats(0.01, 3.0))
@settings(max_examples=40)
def test_type2_covariance_accurate_to_1e8(hurst, s, t):
    """scipy's 2F1 path against the same closed form in 30-digit arithmetic."""
    got = float(FractionalBrownianMotion(hurst, "type2").covariance(s, t))
    assert got == pytest.approx(_rl_cov_mpmath_hyp2f1(hurst, s, t), rel=1e-8)


@pytest.mark.parametrize("hurst,s,t", [(0.3, 0.4, 1.0), (0.55, 1.0, 1.2), (0.8, 0.3, 2.5), (0.95, 1.0, 1.0)])
def test_type2_closed_form_matches_defining_integral(hurst, s, t):
    got = float(FractionalBrownianMotion(hurst, "type2").covariance(s, t))
    assert got == pytest.approx(_rl_cov_quadrature(hurst, s, t), rel=1e-8)


def test_type2_variance_reference_value():
    # reference sheet: Var B_1 = 0.8473 at H = 0.7
    assert float(FractionalBrownianMotion(0.7, "type2").covariance(1.0, 1.0)) == pytest.approx(0.8473, abs=5e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_half_is_brownian_motion(kind):
    ts = torch.tensor([0.0, 0.2, 0.5, 1.3], dtype=torch.float64)
    cov = FractionalBrownianMotion(0.5, kind).covariance(ts[:, None], ts[None, :])
    torch.testing.assert_close(cov, torch.minimum(ts[:, None], ts[None, :]))


@pytest.mark.parametrize("kind", KINDS)
@given(hurst=st.floats(0.05, 0.95), times=st.lists(st.floats(0.01, 5.0), min_size=2, max_size=15, unique=True))
@settings(max_examples=20)
def test_covariance_symmetric_psd(kind, hurst, times):
    ts = torch.tensor(sorted(times), dtype=torch.float64)
    cov = FractionalBrownianMotion(hurst, kind).covariance(ts[:, None], ts[None, :])
    torch.testing.assert_close(cov, cov.T)
    evals = torch.linalg.eigvalsh(cov)
    assert float(evals.min()) >= -1e-9 * float(evals.max())


@pytest.mark.parametrize("kind", KINDS)
@given(hurst=st.floats(0.05, 0.95), c=st.floats(0.1, 10.0), t=st.floats(0.1, 2.0))
@settings(max_examples=15)
def test_self_similarity(kind, hurst, c, t):
    fbm = FractionalBrownianMotion(hurst, kind)
    assert float(fbm.covariance(c * t, c * t)) == pytest.approx(c ** (2 * hurst) * float(fbm.covariance(t, t)),
                                                                rel=1e-9)
    # and for covariances, not only variances
    assert float(fbm.covariance(c * t, 0.5 * c * t)) == pytest.approx(
        c ** (2 * hurst) * float(fbm.covariance(t, 0.5 * t)), rel=1e-9)


@pytest.mark.parametrize("kind,method", [("type1", "cholesky"), ("type2", "cholesky"), ("type1", "davies-harte")])
@pytest.mark.parametrize("hurst", [0.25, 0.75])
def test_sampler_matches_covariance(kind, method, hurst):
    fbm = FractionalBrownianMotion(hurst, kind)
    ts = torch.linspace(0, 2, 11) if method == "davies-harte" else torch.tensor([0.0, 0.1, 0.15, 0.7, 1.0, 1.9])
    x = fbm.sample(ts, 40_000, method=method, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    assert x.shape == (40_000, len(ts))
    assert_covariance_matches(x, fbm.covariance(ts[:, None].double(), ts[None, :].double()))


def test_davies_harte_on_offset_grid_and_odd_batch():
    fbm = FractionalBrownianMotion(0.3)
    ts = torch.arange(3, 12, dtype=torch.float64) * 0.25          # starts at 3 * dt, not 0
    x = fbm.sample(ts, 30_001, method="davies-harte", generator=torch.Generator().manual_seed(1),
                   dtype=torch.float64)
    assert x.shape == (30_001, len(ts))
    assert_covariance_matches(x, fbm.covariance(ts[:, None], ts[None, :]))


@pytest.mark.parametrize("hurst", [0.2, 0.5, 0.8])
def test_variogram_slope_recovers_2h(hurst):
    """Uniform grid of 1024 points: slope of log E|B_{t+d} - B_t|^2 on log d is 2H +- 0.03."""
    fbm = FractionalBrownianMotion(hurst)
    paths = fbm.sample(torch.linspace(0, 1, 1024), 256, generator=torch.Generator().manual_seed(4),
                       dtype=torch.float64)
    slope = variogram_slope(paths, [1, 2, 4, 8, 16, 32, 64], 1 / 1023)
    assert abs(slope - 2 * hurst) < 0.03


def test_auto_method_and_dtype():
    fbm = FractionalBrownianMotion(0.6)
    x = fbm.sample(torch.linspace(0, 1, 17), 3)
    assert x.dtype == torch.get_default_dtype() and x.shape == (3, 17)
    assert bool((x[:, 0] == 0).all())
    # irregular grid falls back to Cholesky without complaint
    y = fbm.sample(torch.tensor([0.1, 0.3, 0.35]), 2)
    assert y.shape == (2, 3)


def test_type1_covariance_differentiable_in_hurst():
    h = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    fbm = FractionalBrownianMotion(h)
    fbm.covariance(torch.tensor(0.5), torch.tensor(2.0)).backward()
    d = 1e-6

    def f(hh):
        return float(FractionalBrownianMotion(hh).covariance(0.5, 2.0))

    assert float(h.grad) == pytest.approx((f(0.3 + d) - f(0.3 - d)) / (2 * d), rel=1e-6)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: FractionalBrownianMotion(1.2), ValueError, "hurst"),
    (lambda: FractionalBrownianMotion(float("nan")), ValueError, "hurst"),
    (lambda: FractionalBrownianMotion("0.5"), TypeError, "hurst"),
    (lambda: FractionalBrownianMotion(0.5, kind="rl"), ValueError, "kind"),
    (lambda: FractionalBrownianMotion(0.5).sample([0.0, 0.2, 0.1], 2), ValueError, "strictly increasing"),
    (lambda: FractionalBrownianMotion(0.5).sample([-1.0, 0.2], 2), ValueError, "non-negative"),
    (lambda: FractionalBrownianMotion(0.5).sample([0.0, 0.2], 0), ValueError, "batch_size"),
    (lambda: FractionalBrownianMotion(0.5).sample([0.0, 0.2], 2, method="hosking"), ValueError, "method"),
    (lambda: FractionalBrownianMotion(0.5).sample([0.0, 0.2, 0.5], 2, method="davies-harte"), ValueError,
     "uniform grid"),
    (lambda: FractionalBrownianMotion(0.5, "type2").sample([0.0, 0.5], 2, method="davies-harte"), ValueError,
     "type1"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
