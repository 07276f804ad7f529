"""fracsde.MarkovNoise: one noise interface for every model, and the bugs its introduction fixed."""
import gc
import warnings

import numpy as np
import pytest
import torch

import fracsde
from fracsde import FractionalSDE, LinearFractionalDynamics, MarkovApproxFBM, MarkovNoise, sdeint
from fracsde.distributions import FractionalOU
from fracsde.kinds import KINDS, get_kind
from fracsde.latent import BridgeProblem
from fracsde.linear import Schedule, VPSchedule
from fracsde.numerics import is_uniform_grid
from problems import AdditiveOU

# these tests check the numerics of dynamics that include deliberately high terminal log-SNRs
pytestmark = pytest.mark.filterwarnings("ignore::fracsde.PriorMismatchWarning")


def test_markov_approx_fbm_is_a_markov_noise_with_the_same_law():
    """A MarkovNoise with the MA-fBM's rates and weights is the same process: same covariance, same paths."""
    ma = MarkovApproxFBM(0.7, 3, kind="type1")
    plain = MarkovNoise(ma.gammas, ma.weights, kind="type1")
    assert isinstance(ma, MarkovNoise)
    ts = torch.linspace(0, 1, 9, dtype=torch.float64)
    torch.testing.assert_close(plain.covariance(ts[:, None], ts[None]), ma.covariance(ts[:, None], ts[None]),
                               rtol=0, atol=0)
    a = ma.sample(ts, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    b = plain.sample(ts, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(a, b)


@pytest.mark.parametrize("K", [1, 2, 3])
def test_gamma_max_is_derived_from_the_rates(K):
    noise = MarkovApproxFBM(0.7, K, gamma_max=20.0)
    assert noise.gamma_max == float(noise.gammas.max())
    assert MarkovNoise([0.5, 7.0], [1.0, 1.0]).gamma_max == 7.0


def test_single_process_solve_with_large_step_does_not_warn():
    """K = 1 has the rate [1]; the stiffness check used the unrelated gamma_max = 20 before (issue 9)."""
    sde = AdditiveOU(MarkovApproxFBM(0.7, num_processes=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sdeint(sde, torch.zeros(4, 1), torch.linspace(0, 1, 11), dt=0.1, method="euler")


def test_every_model_accepts_a_user_given_noise():
    noise = MarkovNoise([0.5, 4.0], [0.8, -0.2], kind="type2", horizon=1.0)
    # a fractional SDE
    xs = sdeint(AdditiveOU(noise), torch.zeros(3, 1), torch.linspace(0, 1, 5), dt=0.05, method="euler")
    assert xs.shape == (5, 3, 1) and bool(torch.isfinite(xs).all())
    # linear fractional dynamics
    dyn = LinearFractionalDynamics(VPSchedule(), noise)
    assert dyn.num_processes == 2 and torch.equal(dyn.weights, noise.weights)
    # a Pyro distribution: its covariance is that of the process driven by this noise
    ts = torch.linspace(0.1, 1, 6, dtype=torch.float64)
    d = FractionalOU(None, torch.tensor(1.0, dtype=torch.float64), 0.5, ts, 0.1, noise=noise)   # float64 result
    lp = d.log_prob(d.sample())
    assert torch.isfinite(lp) and "hurst" not in d.arg_constraints
    dense = d.to_multivariate_normal()
    y = d.sample((3,))
    torch.testing.assert_close(d.log_prob(y).double(), dense.log_prob(y.double()), rtol=1e-9, atol=1e-9)
    # the latent bridge
    bridge = BridgeProblem(None, driving_noise=noise)
    mean, std = bridge.exact_posterior(ts)
    assert bool((std > 0).all()) and bridge.noise() is noise


def test_fractional_ou_from_an_ma_fbm_noise_equals_the_hurst_parameterisation():
    ts = torch.linspace(0.05, 1, 20, dtype=torch.float64)
    noise = MarkovApproxFBM(0.7, 3, horizon=1.0)
    a = FractionalOU(None, 2.0, 0.5, ts, 0.1, noise=noise)
    b = FractionalOU(torch.tensor(0.7, dtype=torch.float64), 2.0, 0.5, ts, 0.1, horizon=1.0)
    y = b.sample((2,))
    torch.testing.assert_close(a.log_prob(y), b.log_prob(y), rtol=1e-12, atol=1e-12)


def test_bad_noise_inputs_name_the_parameter():
    with pytest.raises(ValueError, match="weights must have the shape of gammas"):
        MarkovNoise([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="gammas must be finite and > 0"):
        MarkovNoise([1.0, -2.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="weights must be finite"):
        MarkovNoise([1.0, 2.0], [1.0, float("nan")])
    with pytest.raises(ValueError, match="kind"):
        MarkovNoise([1.0], [1.0], kind="type3")
    with pytest.raises(TypeError, match="MarkovNoise"):
        FractionalSDE.__init__(AdditiveOU.__new__(AdditiveOU), "not a noise")
    with pytest.raises(ValueError, match="either hurst"):
        FractionalOU(0.7, 1.0, 1.0, torch.linspace(0.1, 1, 5), 0.1, noise=MarkovNoise([1.0], [1.0]))


def test_type1_and_type2_rules_live_in_one_place():
    g = torch.tensor([0.5, 2.0], dtype=torch.float64)
    assert KINDS["type1"].stationary_start and not KINDS["type2"].stationary_start
    torch.testing.assert_close(get_kind("type1").initial_covariance(g), 1 / (g[:, None] + g[None]))
    assert torch.equal(get_kind("type2").initial_covariance(g), torch.zeros(2, 2, dtype=torch.float64))
    y, y0 = torch.ones(3, 2), torch.full((3, 2), 0.25)
    assert torch.equal(get_kind("type1").read_out(y, y0), y - y0)
    assert torch.equal(get_kind("type2").read_out(y, y0), y)
    with pytest.raises(ValueError, match="kind must be one of"):
        get_kind("type3")


class _UserSchedule(Schedule):
    """A user schedule without __repr__ and without a closed-form variance (μ = −1, g = 1)."""

    def __init__(self, rate: float = 1.0):
        super().__init__(1.0)
        self.rate = rate

    def mu(self, t):
        return torch.full_like(t, -self.rate)

    def g(self, t):
        return torch.ones_like(t)

    def dg(self, t):
        return torch.zeros_like(t)

    def log_c(self, t):
        return -self.rate * t


def test_user_schedule_without_closed_variance_works_for_brownian_noise():
    """K = 0 with a Schedule subclass lacking brownian_variance failed with "'NoneType' ..." (issue 9)."""
    dyn = LinearFractionalDynamics(_UserSchedule(1.0))
    t = torch.tensor([0.2, 1.0], dtype=torch.float64)
    exact = -torch.expm1(-2 * t) / 2               # Var of dX = −X dt + dW from x_0
    torch.testing.assert_close(dyn.conditional_std(t) ** 2, exact, rtol=1e-8, atol=0)


def test_coefficient_cache_is_keyed_by_values_not_addresses():
    """Two schedules of one class with different values never share tables, even at a reused address."""
    t = torch.tensor([0.5], dtype=torch.float64)
    first = float(LinearFractionalDynamics(_UserSchedule(1.0)).conditional_std(t))
    gc.collect()
    second = float(LinearFractionalDynamics(_UserSchedule(3.0)).conditional_std(t))
    assert second == pytest.approx(float(torch.sqrt(-torch.expm1(torch.tensor(-3.0)) / 6)), rel=1e-8)
    assert first != second
    assert _UserSchedule(2.0).cache_key() == _UserSchedule(2.0).cache_key() != _UserSchedule(2.5).cache_key()


def test_uniform_grid_rule_uses_the_grids_own_precision():
    assert is_uniform_grid(torch.linspace(0, 1, 101))                      # float32 rounding: uniform
    assert is_uniform_grid(torch.linspace(0, 1, 100001, dtype=torch.float64))
    ts = torch.linspace(0, 1, 101, dtype=torch.float64)
    ts[50] += 1e-9
    assert not is_uniform_grid(ts)
    assert is_uniform_grid(torch.tensor([0.0, 0.3]))


def test_public_api_exports_the_noise():
    assert fracsde.MarkovNoise is MarkovNoise
    assert np.isfinite(float(MarkovNoise([1.0], [1.0]).covariance(0.5, 0.5)))


@pytest.mark.parametrize("horizon", [1e-3, 1.0, 10.0, 100.0, 1e6])
def test_rates_scale_with_the_horizon_so_the_error_does_not_depend_on_it(horizon):
    """fBM is self-similar: with rates γ_max^{…}/T the relative L2 error at any horizon is the one at T = 1
    (before: 0.573 at T = 100, 1.0 at 1e6 and negative at 1e-3 with the rates kept at [0.05, 1, 20])."""
    ref = MarkovApproxFBM(0.7, 3)
    noise = MarkovApproxFBM(0.7, 3, horizon=horizon)
    torch.testing.assert_close(noise.gammas, ref.gammas / horizon, rtol=1e-15, atol=0)
    assert float(noise.approximation_error) == pytest.approx(float(ref.approximation_error), rel=1e-6, abs=1e-12)
    assert noise.gamma_max == pytest.approx(20.0 / horizon)


def test_a_poor_approximation_warns():
    from fracsde import ApproximationWarning
    with pytest.warns(ApproximationWarning, match=r"relative L2 error of 0\.9"):
        MarkovApproxFBM(0.7, gammas=[20.0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_is_computed_in_float32_and_cast(dtype):
    """bfloat16 recursions gave Var B̂_1 +8 % (z = 18); now the variance at t = 1 matches the closed form within
    5 standard errors of a sample variance (SE = Var·√(2/n), n = 20000) and the result has the asked dtype."""
    noise, n = MarkovApproxFBM(0.7, 3), 20000
    paths = noise.sample(torch.linspace(0, 1, 65), n, generator=torch.Generator().manual_seed(0), dtype=dtype)
    assert paths.dtype == dtype
    var = float(noise.covariance(1.0, 1.0))
    assert abs(float(paths[:, -1].double().var()) / var - 1) < 5 * (2 / n) ** 0.5
    with pytest.raises(TypeError, match="real floating-point"):
        noise.sample(torch.linspace(0, 1, 5), 2, dtype=torch.int32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_a_device_this_machine_lacks_is_named():
    noise = MarkovApproxFBM(0.7, 3)
    with pytest.raises(ValueError, match="device='cuda' requested but CUDA is not available"):
        noise.sample(torch.linspace(0, 1, 5), 2, device="cuda")
    with pytest.raises(ValueError, match="device must be a torch device"):
        noise.sample(torch.linspace(0, 1, 5), 2, device="tpu")


def test_repeated_rates_and_a_wrong_distribution_are_named():
    from fracsde.distributions import x_covariance
    with pytest.raises(ValueError, match="gammas must be distinct"):
        MarkovApproxFBM(0.7, gammas=[1.0, 1.0, 1.0])
    with pytest.raises(TypeError, match="x_covariance needs a FractionalOU"):
        x_covariance("nope")
