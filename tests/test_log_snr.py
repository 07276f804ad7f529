"""The log-SNR view of linear fractional dynamics: λ(t) = 2 log(c/σ̃), its inverse, and PriorMismatchWarning."""
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fracsde import LinearFractionalDynamics, PriorMismatchWarning, VESchedule, VPSchedule
from models.gfdm import FVE, FVP

F64 = torch.float64


def _quiet(factory, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PriorMismatchWarning)
        return factory(*args)


def test_brownian_log_snr_matches_the_closed_forms():
    t = torch.tensor([1e-4, 1e-2, 0.3, 1.0], dtype=F64)
    vp = LinearFractionalDynamics(VPSchedule())
    log_c = -0.5 * (0.1 * t + 0.5 * 19.9 * t * t)
    torch.testing.assert_close(vp.log_snr(t), 2 * log_c - torch.log(-torch.expm1(2 * log_c)), rtol=1e-14, atol=0)
    ve = LinearFractionalDynamics(VESchedule())
    var = 0.01 ** 2 * torch.expm1(2 * math.log(5000.0) * t)
    torch.testing.assert_close(ve.log_snr(t), -torch.log(var), rtol=1e-14, atol=0)


@pytest.mark.parametrize("family,hurst,K", [(FVP, 0.9, 2), (FVP, 0.9, 3), (FVP, 0.3, 3), (FVE, 0.7, 2)])
def test_log_snr_is_two_log_c_over_sigma_where_sigma_is_representable(family, hurst, K):
    dyn = _quiet(family, hurst, K)
    t = torch.tensor([0.02, 0.1, 0.5, 1.0], dtype=F64)
    m = dyn.marginal(t)
    torch.testing.assert_close(dyn.log_snr(t), 2 * torch.log(m.c / m.sigma), rtol=1e-12, atol=1e-12)


def test_log_snr_stays_accurate_where_sigma_underflows_float32():
    """FVP(0.9, 3) at t = 1e-3 has σ̃ ≈ 2e-8 (λ ≈ 35.6): the tables give λ without rounding σ̃."""
    dyn = FVP(0.9, 3)
    lam = float(dyn.log_snr(torch.tensor(1e-3, dtype=F64)))
    assert lam == pytest.approx(35.58, abs=0.01)
    assert dyn.log_snr_range[0] == pytest.approx(-6.16, abs=0.01)


@pytest.mark.parametrize("family", [FVP, FVE])
@pytest.mark.parametrize("hurst", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("K", [1, 2, 3, 4, 5])
def test_log_snr_decreases_strictly(family, hurst, K):
    dyn = _quiet(family, hurst, K)
    t = torch.logspace(-5, 0, 400, dtype=F64)
    lam = dyn.log_snr(t)
    assert dyn.log_snr_decreasing and bool((lam[1:] < lam[:-1]).all())


@pytest.mark.parametrize("family,hurst,K", [(FVP, 0.9, 0), (FVE, 0.9, 0), (FVP, 0.9, 3), (FVE, 0.7, 2)])
def test_time_at_log_snr_inverts_log_snr(family, hurst, K):
    dyn = family(hurst, K)
    t = torch.tensor([1e-5, 1e-3, 0.05, 0.4, 0.999, 1.0], dtype=F64)
    back = dyn.time_at_log_snr(dyn.log_snr(t))
    torch.testing.assert_close(back, t, rtol=1e-9, atol=0)
    lo, hi = dyn.log_snr_range
    assert float(dyn.time_at_log_snr(lo)) == pytest.approx(1.0, rel=1e-12)
    assert float(dyn.time_at_log_snr(hi)) == pytest.approx(dyn.log_snr_min_time, rel=1e-9)


def test_time_at_log_snr_refuses_values_outside_the_range():
    dyn = FVP(0.9, 2)
    lo, hi = dyn.log_snr_range
    for bad in (lo - 0.5, hi + 1.0, float("nan")):
        with pytest.raises(ValueError, match=r"lam must lie in the model's log-SNR range"):
            dyn.time_at_log_snr(bad)


@pytest.mark.parametrize("family,hurst,K", [(FVP, 0.9, 0), (FVE, 0.9, 0), (FVP, 0.9, 2), (FVP, 0.9, 3)])
def test_paper_settings_with_a_sound_prior_do_not_warn(family, hurst, K):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        family(hurst, K)


@settings(max_examples=12, deadline=None)
@given(family=st.sampled_from([FVP, FVE]), hurst=st.sampled_from([0.1, 0.3, 0.5, 0.7, 0.9]),
       K=st.integers(min_value=0, max_value=5))
def test_prior_mismatch_warning_fires_exactly_above_minus_five(family, hurst, K):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PriorMismatchWarning)
        dyn = family(hurst, K)
    fired = any(issubclass(w.category, PriorMismatchWarning) for w in caught)
    T = torch.tensor(1.0, dtype=F64)
    m = dyn.marginal(T)                                     # σ̃(T) is O(1): the direct formula is exact here
    terminal = float(2 * torch.log(m.c / m.sigma))
    assert fired == (terminal > -5.0), (terminal, fired)
    if fired:
        message = str(next(w.message for w in caught if issubclass(w.category, PriorMismatchWarning)))
        assert f"{terminal:.2f}" in message and "fewer" in message
