"""fracsde.sde: API, shapes, method selection, bad input, controlled posterior/KL, Itô vs Stratonovich."""
import math

import pytest
import torch
import torchsde

from fracsde.markov import MarkovApproxFBM
from fracsde.sde import FractionalSDE, NonFiniteStateError, StiffnessWarning, default_method, sdeint, supported_methods
from problems import FGBM, Linear

F64 = torch.float64




def noise(h=0.7, k=3, **kw):
    return MarkovApproxFBM(hurst=h, num_processes=k, **kw)


TS = torch.linspace(0, 1, 11, dtype=F64)


# --------------------------------------------------------------------------------- shapes, API
@pytest.mark.parametrize("noise_type,m", [("diagonal", 6), ("scalar", 1), ("additive", 4), ("general", 4)])
def test_shapes_with_multidimensional_state(noise_type, m):
    sde = Linear(noise(), noise_type=noise_type, sde_type="stratonovich", m=m)
    x0 = torch.randn(5, 2, 3, dtype=F64)
    xs, bhat = sdeint(sde, x0, TS, dt=0.05, return_noise=True, entropy=0)
    assert xs.shape == (11, 5, 2, 3)
    assert bhat.shape == (11, 5, m)
    torch.testing.assert_close(xs[0], x0)
    assert torch.all(bhat[0] == 0)


def test_noise_type_labels_agree_when_they_describe_the_same_sde():
    """Constant diagonal g declared additive, general or diagonal: identical paths on one Brownian motion."""
    x0 = torch.randn(7, 3, dtype=F64)
    out = []
    for noise_type in ("diagonal", "additive", "general"):
        class S(FractionalSDE):
            def f(self, t, x):
                return torch.sin(x)

            def g(self, t, x):
                scale = torch.tensor([0.3, 0.5, 0.7], dtype=F64)
                return scale.expand_as(x) if self.noise_type == "diagonal" else torch.diag(scale).expand(
                    x.shape[0], 3, 3)
        out.append(sdeint(S(noise(), noise_type=noise_type, sde_type="ito"), x0, TS, method="euler", dt=0.02,
                          entropy=3))
    torch.testing.assert_close(out[0], out[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[0], out[2], rtol=1e-12, atol=1e-12)


def test_seeding_is_reproducible_and_uses_torch_rng():
    sde = Linear(noise(kind="type1"))
    x0 = torch.zeros(4, 1, dtype=F64)
    a = sdeint(sde, x0, TS, dt=0.05, generator=torch.Generator().manual_seed(1))
    b = sdeint(sde, x0, TS, dt=0.05, generator=torch.Generator().manual_seed(1))
    c = sdeint(sde, x0, TS, dt=0.05, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    torch.manual_seed(5)
    d = sdeint(sde, x0, TS, dt=0.05)
    torch.manual_seed(5)
    e = sdeint(sde, x0, TS, dt=0.05)
    torch.testing.assert_close(d, e, rtol=0, atol=0)


def test_type1_starts_ou_states_in_stationary_law_type2_at_zero():
    """With f = 0, g = 1, x − B̂ is constant; the type I noise path still starts at 0."""
    class Integrator(FractionalSDE):
        noise_type = "additive"

        def f(self, t, x):
            return torch.zeros_like(x)

        def g(self, t, x):
            return torch.ones_like(x).unsqueeze(-1)

    for kind in ("type1", "type2"):
        xs, bhat = sdeint(Integrator(noise(kind=kind)), torch.zeros(64, 1, dtype=F64), TS, dt=0.02,
                          return_noise=True, entropy=4)
        torch.testing.assert_close(xs[..., 0], bhat[..., 0], rtol=1e-10, atol=1e-10)
        assert torch.all(bhat[0] == 0)


def test_default_methods_and_support_table():
    assert default_method("additive", "ito") == "srk"
    assert default_method("scalar", "ito") == "srk"
    assert default_method("general", "ito") == "euler"
    assert default_method("diagonal", "stratonovich") == "midpoint"
    assert default_method("general", "stratonovich", adjoint=True) == "midpoint"
    assert default_method("general", "ito", adjoint=True) == "euler"
    assert "srk" in supported_methods("additive", "stratonovich")  # Itô = Stratonovich for additive noise
    assert supported_methods("general", "ito") == ("euler", "exponential_euler")
    assert "milstein" not in supported_methods("diagonal", "stratonovich")


@pytest.mark.parametrize("noise_type,sde_type", [("additive", "stratonovich"), ("scalar", "ito"),
                                                 ("scalar", "stratonovich"), ("diagonal", "ito"),
                                                 ("general", "stratonovich")])
def test_every_supported_method_runs(noise_type, sde_type):
    sde = Linear(noise(k=2, gamma_max=5.0), noise_type=noise_type, sde_type=sde_type, m=2,
                 multiplicative=noise_type != "additive")
    x0 = torch.ones(3, 2, dtype=F64)
    for method in supported_methods(noise_type, sde_type):
        xs = sdeint(sde, x0, TS, method=method, dt=0.05, entropy=1)
        assert xs.shape == (11, 3, 2) and bool(torch.isfinite(xs).all()), method


def test_srk_beats_midpoint_on_additive_noise():
    """srk (strong order 1.5 with space-time Lévy area) against midpoint (order 1) on one Brownian path."""
    sde = Linear(noise(gamma_max=5.0), noise_type="additive", sde_type="stratonovich")
    bm = torchsde.BrownianInterval(0.0, 1.0, size=(32, 1), dtype=F64, entropy=9, dt=2 ** -9,
                                   levy_area_approximation="space-time")
    x0 = torch.ones(32, 1, dtype=F64)
    ts = torch.linspace(0, 1, 5, dtype=F64)  # on the step grid: no output interpolation error
    ref = sdeint(sde, x0, ts, method="srk", dt=2 ** -9, bm=bm)
    err = {m: float((sdeint(sde, x0, ts, method=m, dt=2 ** -4, bm=bm) - ref).abs().mean()) for m in ("srk", "midpoint")}
    assert err["srk"] < 0.5 * err["midpoint"] and err["midpoint"] < 1e-2, err


def test_adaptive_stepping_matches_a_fine_fixed_step_solve():
    sde = Linear(noise(gamma_max=5.0), noise_type="scalar", sde_type="stratonovich", multiplicative=True)
    bm = torchsde.BrownianInterval(0.0, 1.0, size=(8, 1), dtype=F64, entropy=2, dt=2 ** -9)
    x0 = torch.ones(8, 1, dtype=F64)
    ts = torch.linspace(0, 1, 5, dtype=F64)
    a = sdeint(sde, x0, ts, method="midpoint", dt=0.05, adaptive=True, rtol=1e-3, atol=1e-4, bm=bm)
    b = sdeint(sde, x0, ts, method="midpoint", dt=2 ** -9, bm=bm)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-2)


# --------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    sde = Linear(noise())
    x0 = torch.zeros(4, 1, dtype=F64)
    with pytest.raises(ValueError, match="x0 must have shape"):
        sdeint(sde, torch.zeros(4, dtype=F64), TS)
    with pytest.raises(TypeError, match="dtype float32 or float64"):
        sdeint(sde, torch.zeros(4, 1, dtype=torch.int64), TS)
    with pytest.raises(TypeError, match="dtype float32 or float64"):
        sdeint(sde, torch.zeros(4, 1, dtype=torch.float16), TS)
    with pytest.raises(ValueError, match="NaN"):
        sdeint(sde, torch.full((4, 1), float("nan"), dtype=F64), TS)
    with pytest.raises(ValueError, match="strictly increasing"):
        sdeint(sde, x0, torch.tensor([0.0, 0.5, 0.5, 1.0], dtype=F64))
    with pytest.raises(ValueError, match="strictly increasing"):
        sdeint(sde, x0, [1.0, 0.0])
    with pytest.raises(ValueError, match="same device"):
        sdeint(sde, x0, torch.tensor([0.0, 1.0], device="meta"))
    with pytest.raises(ValueError, match="at least two"):
        sdeint(sde, x0, [0.0])
    for dt in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="dt"):
            sdeint(sde, x0, TS, dt=dt)
    with pytest.raises(TypeError, match="unexpected keyword argument 'logqp'"):
        sdeint(sde, x0, TS, logqp=True)
    with pytest.raises(ValueError, match="generator or entropy"):
        sdeint(sde, x0, TS, generator=torch.Generator(), entropy=1)
    with pytest.raises(ValueError, match="bm must have shape"):
        sdeint(sde, x0, TS, bm=torchsde.BrownianInterval(0.0, 1.0, size=(4, 2), dtype=F64))
    with pytest.raises(ValueError, match="levy_area_approximation"):
        sdeint(sde, x0, TS, method="srk", bm=torchsde.BrownianInterval(0.0, 1.0, size=(4, 1), dtype=F64))
    with pytest.raises(TypeError, match="FractionalSDE"):
        sdeint(object(), x0, TS)
    with pytest.raises(TypeError, match="MarkovApproxFBM"):
        Linear(0.7)


def test_dtype_mismatch_with_parameters_is_named():
    class P(Linear):
        def __init__(self, n):
            super().__init__(n)
            self.theta_p = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float32))
    with pytest.raises(TypeError, match="theta_p"):
        sdeint(P(noise()), torch.zeros(2, 1, dtype=F64), TS)


def test_wrong_output_shapes_name_the_function():
    class BadG(Linear):
        def g(self, t, x):
            return torch.ones_like(x)  # additive needs (batch, *shape, m)
    with pytest.raises(ValueError, match=r"g\(t, x\) must return shape"):
        sdeint(BadG(noise()), torch.zeros(2, 1, dtype=F64), TS)

    class BadF(Linear):
        def f(self, t, x):
            return x[:, :1]
    with pytest.raises(ValueError, match=r"f\(t, x\) must return the shape of x"):
        sdeint(BadF(noise()), torch.zeros(2, 3, dtype=F64), TS)


def test_unsupported_method_pair_names_pair_and_lists_what_works():
    sde = Linear(noise(), noise_type="general", sde_type="stratonovich", m=2, multiplicative=True)
    with pytest.raises(ValueError) as info:
        sdeint(sde, torch.zeros(2, 1, dtype=F64), TS, method="milstein")
    msg = str(info.value)
    assert "'milstein'" in msg and "'general'" in msg and "stratonovich" in msg
    assert "midpoint" in msg and "log_ode" in msg
    with pytest.raises(ValueError, match="srk"):
        sdeint(Linear(noise(), noise_type="diagonal", sde_type="ito"), torch.zeros(2, 1, dtype=F64), TS,
               method="srk")
    with pytest.raises(ValueError, match="adjoint methods that work"):
        sdeint(sde, torch.zeros(2, 1, dtype=F64), TS, adjoint=True, method="midpoint",
               adjoint_method="log_ode")
    with pytest.raises(ValueError, match="adjoint methods that work"):
        sdeint(sde, torch.zeros(2, 1, dtype=F64), TS, adjoint=True, method="midpoint",
               adjoint_method="adjoint_reversible_heun")
    with pytest.raises(ValueError, match="adjoint=True"):
        sdeint(sde, torch.zeros(2, 1, dtype=F64), TS, adjoint_method="midpoint")


def test_nan_mid_solve_names_the_time_interval():
    class Breaks(Linear):
        def f(self, t, x):
            return torch.where(t > 0.45, torch.full_like(x, float("nan")), -x)
    with pytest.raises(NonFiniteStateError, match=r"between t = 0.4 and t = 0.5"):
        sdeint(Breaks(noise()), torch.zeros(3, 1, dtype=F64), TS, method="euler", dt=0.05)
    # opting out returns the NaN path
    xs = sdeint(Breaks(noise()), torch.zeros(3, 1, dtype=F64), TS, method="euler", dt=0.05, check_finite=False)
    assert bool(torch.isnan(xs[-1]).all()) and bool(torch.isfinite(xs[4]).all())


def test_stiffness_warnings():
    sde = Linear(noise(gamma_max=20.0))
    with pytest.warns(StiffnessWarning, match="gamma_max"):
        sdeint(sde, torch.zeros(2, 1, dtype=F64), TS, method="euler", dt=0.1)
    with pytest.warns(StiffnessWarning, match="reversible_heun"):
        sdeint(sde, torch.zeros(2, 1, dtype=F64), TS, method="reversible_heun", dt=0.01, check_finite=False)


# --------------------------------------------------------------------------------- controlled SDE, KL
class Controlled(Linear):
    def __init__(self, n, u, **kw):
        super().__init__(n, **kw)
        self.u = u

    def control(self, t, x, y):
        return self.u.expand(x.shape[0], -1)


class ShiftedBM(torchsde.BrownianInterval):
    """W_t + u t: the Brownian motion the controlled SDE is, by construction, driven by."""

    def __init__(self, u, **kw):
        super().__init__(**kw)
        self._u = u

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        return super().__call__(ta, tb) + self._u * (tb - ta)


# heun and midpoint treat drift and diffusion alike, so a drift g·Σω·u and an increment u·dt added to
# dW give the same step exactly (euler_heun would differ by O(dt): its drift is Euler, its diffusion Heun)
@pytest.mark.parametrize("method", ["heun", "midpoint"])
@pytest.mark.parametrize("noise_type,m", [("additive", 3), ("diagonal", 2)])
def test_kl_of_constant_control_and_girsanov_shift(method, noise_type, m):
    n = noise(kind="type1")
    u = torch.randn(1, m, dtype=F64)
    sde = Controlled(n, u, noise_type=noise_type, sde_type="stratonovich", m=m, multiplicative=noise_type != "additive")
    x0 = torch.randn(6, 2, dtype=F64)
    gen = dict(size=(6, m), dtype=F64, dt=0.01)
    xs, bhat, kl = sdeint(sde, x0, TS, method=method, dt=0.01, return_noise=True, return_kl=True,
                          bm=torchsde.BrownianInterval(0.0, 1.0, entropy=5, **gen),
                          generator=torch.Generator().manual_seed(0))
    assert kl.shape == (11, 6)
    # KL = ½ |u|² (t − t0) exactly: the KL channel's drift is constant
    torch.testing.assert_close(kl, (0.5 * (u ** 2).sum() * TS)[:, None].expand(11, 6), rtol=1e-12, atol=1e-14)
    # the controlled solve is the uncontrolled one driven by W + u t (same stationary OU start)
    plain = Linear(n, noise_type=noise_type, sde_type="stratonovich", m=m, multiplicative=noise_type != "additive")
    xs2, bhat2 = sdeint(plain, x0, TS, method=method, dt=0.01, return_noise=True,
                        bm=ShiftedBM(u, t0=0.0, t1=1.0, entropy=5, **gen),
                        generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(xs, xs2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bhat, bhat2, rtol=1e-10, atol=1e-12)


def test_state_dependent_control_sees_ou_states_and_kl_needs_control():
    seen = {}

    class Feedback(Linear):
        def control(self, t, x, y):
            seen["y"] = y.shape
            return -y.sum(-1)  # (batch, m)

    sde = Feedback(noise(k=3), noise_type="general", sde_type="stratonovich", m=2)
    xs, kl = sdeint(sde, torch.zeros(5, 1, dtype=F64), TS, dt=0.01, return_kl=True, entropy=0)
    assert seen["y"] == (5, 2, 3)
    assert bool((kl[1:] > 0).all()) and bool((kl[1:] >= kl[:-1]).all())
    with pytest.raises(ValueError, match="control"):
        sdeint(Linear(noise()), torch.zeros(5, 1, dtype=F64), TS, return_kl=True)


# --------------------------------------------------------------------------------- Itô vs Stratonovich
def test_ito_with_correction_equals_stratonovich_exact_solution():
    """dX = σX∘dB̂ has X = X0 exp(σB̂) pathwise; the Itô SDE needs the drift ½σ²(Σω)²X to match it,
    and without it solves X = X0 exp(σB̂ − ½σ²(Σω)² t) (B̂ has quadratic variation (Σω)² t)."""
    n = noise(h=0.3, k=3, gamma_max=5.0)
    sigma = 0.5
    s2 = 0.5 * sigma ** 2 * float(n.weights.sum()) ** 2
    assert s2 > 0.2  # the correction is large at H = 0.3: the test can tell the readings apart
    bm = torchsde.BrownianInterval(0.0, 1.0, size=(100, 1), dtype=F64, entropy=8, dt=2 ** -9)
    x0 = torch.ones(100, 1, dtype=F64)
    args = dict(dt=2 ** -9, bm=bm, return_noise=True)
    with torch.no_grad():  # milstein differentiates g; without no_grad it also builds a graph of that
        xs_s, b_s = sdeint(FGBM(n, sigma), x0, TS, method="midpoint", **args)
        xs_c, b_c = sdeint(FGBM(n, sigma, "ito", correction=s2), x0, TS, method="milstein", **args)
        xs_i, b_i = sdeint(FGBM(n, sigma, "ito"), x0, TS, method="milstein", **args)
    # pathwise, on the solver's own noise: log X − σB̂ = 0 (Stratonovich, corrected Itô), −½σ²(Σω)² t (Itô)
    for xs, b, shift in ((xs_s, b_s, 0.0), (xs_c, b_c, 0.0), (xs_i, b_i, -s2)):
        resid = torch.log(xs[..., 0]) - sigma * b[..., 0] - shift * TS[:, None]
        assert float(resid.abs().max()) < 0.02, float(resid.abs().max())  # O(dt) error, dt = 2^-9
    torch.testing.assert_close(xs_c, xs_s, rtol=0.02, atol=0)
    assert float((xs_i[-1] / xs_s[-1]).mean()) < math.exp(-s2) * 1.05
