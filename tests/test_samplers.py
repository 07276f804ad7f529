"""Fast samplers: u-space exponential integrators, ode-heun, time grids — against the exact Gaussian oracle."""
import math

import numpy as np
import pytest
import torch

from models.gfdm import FVE, FVP, SAMPLERS, GaussianEpsModel, sample
from models.gfdm import fast_samplers as fast
from models.gfdm.sampling import GRID_LOG_SNR_MAX, time_grid

F64 = torch.float64
MEAN, STD = 0.5, 0.2


def _affine(dyn, method, steps, grid=None):
    """Exact (mean, std) of a deterministic u-space sampler's output for the Gaussian oracle: the map from the
    prior's u_T ~ N(0, σ̃_T²) is affine, so two starting points determine it."""
    s_T = float(dyn.conditional_std(torch.tensor(dyn.horizon, dtype=F64)))
    x = torch.tensor([[0.0], [s_T]], dtype=F64)
    y = torch.zeros(2, 1, dyn.num_processes, dtype=F64)
    out = sample(GaussianEpsModel(dyn, MEAN, STD), dyn, (2, 1), steps=steps, method=method, grid=grid, init=(x, y),
                 dtype=F64)
    return float(out[0]), abs(float(out[1] - out[0]))


@pytest.mark.parametrize("dyn", [FVP(0.9, 0), FVP(0.9, 2), FVE(0.9, 2)], ids=["vp", "fvp92", "fve92"])
@pytest.mark.parametrize("method", ["ddim", "dpm++2m"])
def test_deterministic_u_space_samplers_recover_the_oracle(dyn, method):
    """Exact affine computation, no Monte Carlo: at 50 NFE the std error is below 1 % (dpm++2m) / 5 % (ddim,
    first order); the mean is off by the prior's neglect of c(T)·m (≤ 0.6 % for these dynamics)."""
    mean, std = _affine(dyn, method, 50)
    assert abs(std / STD - 1) < (0.01 if method == "dpm++2m" else 0.05)
    assert abs(mean / MEAN - 1) < 0.012


@pytest.mark.parametrize("method", ["sde-dpm++2m", "ancestral", "sde"])
def test_stochastic_samplers_recover_the_oracle(method):
    """n = 40000 draws at 100 NFE: |mean − m| < 4 SE + 0.6 % of m (prior) and |std/s − 1| < 4 SE + 2 % (the
    first-order bias of these schemes at 100 NFE, measured in benchmarks/bench_samplers.py); SE from n."""
    dyn, n = FVP(0.9, 2), 40000
    x = sample(GaussianEpsModel(dyn, MEAN, STD), dyn, (n, 1), steps=100, method=method, dtype=F64,
               generator=torch.Generator().manual_seed(11))
    se_mean, se_std = STD / math.sqrt(n), 1 / math.sqrt(2 * n)
    assert abs(float(x.mean()) - MEAN) < 4 * se_mean + 0.006 * MEAN
    assert abs(float(x.std()) / STD - 1) < 4 * se_std + 0.02


def _order(dyn, method, grid, steps=(20, 40, 80), ref_steps=640):
    """Empirical order from self-convergence: errors against a many-step result on nested step counts."""
    ref = _affine(dyn, method, ref_steps, grid)[1]
    errs = [abs(_affine(dyn, method, n, grid)[1] - ref) for n in steps]
    return -np.polyfit(np.log(steps), np.log(errs), 1)[0]


@pytest.mark.parametrize("method,band", [("ddim", (0.8, 1.25)), ("dpm++2m", (1.6, 2.5))])
def test_orders_of_convergence(method, band):
    order = _order(FVP(0.9, 2), method, "log-snr")
    assert band[0] < order < band[1], order


def test_ancestral_step_is_the_exact_gaussian_posterior():
    """One step with x₀ known: v_u | v_t, x₀ is N(x₀ + (s_u/s_t)²(v_t − x₀), s_u² − s_u⁴/s_t²) (from the joint law of
    the VE process v = x₀ + s ε, Markov in s²); n = 100000 draws, 5-SE tolerances."""
    n, s_t, s_u, x0 = 100000, torch.tensor(1.3, dtype=F64), torch.tensor(0.4, dtype=F64), 0.7
    v_t = torch.full((n, 1), 2.0, dtype=F64)
    D = torch.full_like(v_t, x0)
    v_u, _ = fast._ancestral_step(v_t, D, s_t, s_u, torch.log(s_t / s_u), None, torch.Generator().manual_seed(0))
    mean = x0 + (s_u / s_t) ** 2 * (2.0 - x0)
    var = s_u ** 2 - s_u ** 4 / s_t ** 2
    assert abs(float(v_u.mean()) - float(mean)) < 5 * math.sqrt(float(var) / n)
    assert abs(float(v_u.var()) / float(var) - 1) < 5 * math.sqrt(2 / n)


def test_ddim_and_the_probability_flow_ode_agree_as_steps_grow_for_vp():
    """For K = 0 both integrate the same probability-flow ODE: their affine maps converge to each other (the ODE
    ends at t_end = 1e-3, ddim denoises, so the remaining difference is below the noise level s(t_end) = 0.01)."""
    dyn = FVP(0.9, 0)
    m_ddim, s_ddim = _affine(dyn, "ddim", 2000, "uniform")
    m_ode, s_ode = _affine(dyn, "ode", 2000, "uniform")
    assert abs(m_ddim - m_ode) < 2e-3 and abs(s_ddim / s_ode - 1) < 5e-3


def test_ode_heun_is_second_order_for_vp():
    """Heun with 2 NFE per step (2n − 1 for n steps): on the uniform grid, asymptotically second order."""
    order = _order(FVP(0.9, 0), "ode-heun", "uniform", steps=(81, 161, 321), ref_steps=2561)
    assert 1.6 < order < 2.5, order


def test_grids_start_at_T_decrease_and_denoising_grids_stop_at_the_data_scale():
    dyn = FVP(0.9, 3)
    for grid in ("uniform", "log-snr", "edm"):
        ts = time_grid(dyn, 20, 1e-3, grid=grid, points=21)
        assert ts[0] == 1.0 and float(ts[-1]) == pytest.approx(1e-3) and bool((ts[1:] < ts[:-1]).all())
        ts = time_grid(dyn, 20, 1e-3, grid=grid, points=20, denoise=True)
        assert float(dyn.log_snr(ts[-1])) == pytest.approx(GRID_LOG_SNR_MAX, abs=1e-6)
    lam = dyn.log_snr(time_grid(dyn, 20, 1e-3, grid="log-snr", points=21))
    np.testing.assert_allclose(np.diff(lam.numpy()), np.diff(lam.numpy())[0], rtol=1e-6)


def test_user_grid_and_bad_input():
    dyn, eps = FVP(0.9, 2), GaussianEpsModel(FVP(0.9, 2), MEAN, STD)
    ts = torch.tensor([1.0, 0.5, 0.1, 0.01], dtype=F64)
    x = sample(eps, dyn, (8, 1), steps=None, method="ddim", grid=ts)
    assert x.shape == (8, 1)
    with pytest.raises(ValueError, match="method must be one of"):
        sample(eps, dyn, (8, 1), steps=10, method="dpm-solver")
    with pytest.raises(ValueError, match="grid must be one of"):
        sample(eps, dyn, (8, 1), steps=10, method="ddim", grid="cosine")
    message = "steps must be an integer >= 2 \\(network evaluations of method 'dpm\\+\\+2m'\\)"
    with pytest.raises(ValueError, match=message):
        sample(eps, dyn, (8, 1), steps=1, method="dpm++2m")
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(eps, dyn, (8, 1), steps=None, method="ddim", grid=torch.tensor([1.0, 0.1, 0.5]))
    with pytest.raises(ValueError, match=r"inside|lie in \(0, T\]"):
        sample(eps, dyn, (8, 1), steps=None, method="ddim", grid=torch.tensor([1.5, 0.1]))
    with pytest.raises(ValueError, match="gives 3 network evaluations"):
        sample(eps, dyn, (8, 1), steps=10, method="sde", grid=ts)
    with pytest.raises(ValueError, match="no y to return"):
        sample(eps, dyn, (8, 1), steps=10, method="ddim", return_augmented=True)


def test_every_registered_sampler_runs_and_counts_its_evaluations():
    dyn = FVP(0.9, 2)
    calls = []
    base = GaussianEpsModel(dyn, MEAN, STD)
    model = lambda u, t, **kw: (calls.append(1), base(u, t))[1]          # noqa: E731
    for name in SAMPLERS:
        calls.clear()
        x = sample(model, dyn, (4, 1), steps=9, method=name)
        assert x.shape == (4, 1) and bool(torch.isfinite(x).all()) and len(calls) == 9, (name, len(calls))


@pytest.mark.parametrize("method", ["sde", "dpm++2m"])
def test_a_nan_eps_model_is_reported_not_returned(method):
    from fracsde import NonFiniteStateError
    dyn = FVP(0.9, 2)
    nan_model = lambda u, t, **kw: torch.full_like(u, float("nan"))    # noqa: E731
    with pytest.raises(NonFiniteStateError, match="not finite at the end of sampling"):
        sample(nan_model, dyn, (4, 1), steps=5, method=method)
