"""models.gfdm core: dynamics, loss, reverse-time samplers and likelihood, checked with exact Gaussian ε-models."""
import math
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fracsde.reverse import ReverseTimeSDE, eps_to_score
from models.gfdm import (
    FVE,
    FVP,
    DynamicsSpec,
    GaussianEpsModel,
    gaussian_loss_minimum,
    nll_bits_per_dim,
    sample,
    score_matching_loss,
)
from stats_helpers import bonferroni_z


def _terminal_draw(dyn, mean, std, n, gen, dtype=torch.float64):
    """The exact terminal law for N(mean, std²) data: x_0 from the data, then Z_T | x_0 exactly."""
    x0 = mean + std * torch.randn(n, 1, generator=gen, dtype=dtype)
    return dyn.sample_marginal(x0, dyn.horizon, generator=gen)


def _assert_matches(x, mean, std, z, label):
    """Sample mean and std within z standard errors (Gaussian: se(mean) = σ/√n, se(std) ≈ σ/√(2n))."""
    n = x.numel()
    m, s = float(x.mean()), float(x.std())
    assert abs(m - mean) <= z * std / math.sqrt(n), f"{label}: mean {m:.4f} vs {mean:.4f}"
    assert abs(s - std) <= z * std / math.sqrt(2 * n), f"{label}: std {s:.4f} vs {std:.4f}"


# ------------------------------------------------------------------------------------------------- dynamics
def test_dynamics_spec_names_and_brownian_limit():
    vp, ve = DynamicsSpec.parse("vp").build(), DynamicsSpec.parse("VE").build()
    assert vp.num_processes == 0 and ve.num_processes == 0 and vp.name == "VP" and ve.name == "VE"
    assert isinstance(DynamicsSpec.parse("fvp:H=0.7,K=2").build(), FVP)
    assert DynamicsSpec.parse("fve:H=0.7,K=2").build().name == "FVE(H=0.7,K=2)"
    with pytest.raises(ValueError, match="family 'vpsde' is not one of"):
        DynamicsSpec.parse("vpsde")
    t = torch.tensor([1e-3, 0.5, 1.0], dtype=torch.float64)
    c = torch.exp(-0.5 * (0.1 * t + 9.95 * t ** 2))
    m = FVP(num_processes=0).marginal(t)
    torch.testing.assert_close(m.c, c, rtol=1e-14, atol=0)
    torch.testing.assert_close(m.sigma, torch.sqrt(1 - c ** 2), rtol=1e-13, atol=0)
    m = FVE(num_processes=0).marginal(t)
    torch.testing.assert_close(m.sigma, 0.01 * torch.sqrt(torch.expm1(2 * math.log(5000.0) * t)), rtol=1e-13, atol=0)


@pytest.mark.filterwarnings("ignore::fracsde.PriorMismatchWarning")   # sweeps include high-λ(T) settings
@pytest.mark.parametrize("cls, target", [(FVP, lambda: -math.expm1(-10.05)),
                                         (FVE, lambda: 0.01 ** 2 * (5000.0 ** 2 - 1))])
def test_weight_normalisation_matches_the_brownian_terminal_variance(cls, target):
    dyn = cls(hurst=0.9, num_processes=3)
    raw = cls(hurst=0.9, num_processes=3, normalize_weights=False)
    T = torch.tensor(1.0, dtype=torch.float64)
    assert abs(float(dyn.marginal(T).cov_xx) / target() - 1) < 1e-9
    assert raw.weight_scale == 1.0 and dyn.weight_scale != 1.0
    torch.testing.assert_close(dyn.weights, raw.weights * dyn.weight_scale)


def test_contract_shapes_and_prior():
    dyn = FVP(hurst=0.7, num_processes=2)
    t = torch.full((5,), 0.3)
    m = dyn.marginal(t)
    assert m.c.shape == (5,) and m.eta.shape == (5, 2) and m.sigma.shape == (5,) and m.cov_yy.shape == (5, 2, 2)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    x, y = dyn.prior_sample((7, 3, 4), generator=g1)
    x2, y2 = dyn.prior_sample((7, 3, 4), generator=g2)
    assert x.shape == (7, 3, 4) and y.shape == (7, 3, 4, 2) and x.dtype == torch.float32
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x, y = DynamicsSpec.parse("vp").build().prior_sample((4, 2), dtype=torch.float64)
    assert y.shape == (4, 2, 0) and x.dtype == torch.float64
    with pytest.raises(ValueError, match="shape must be"):
        dyn.prior_sample((0, 3))


def test_prior_is_the_terminal_law_in_distribution():
    """N(0, Σ_T) draws: (x, y) second moments equal Σ_T within Bonferroni-corrected standard errors."""
    from stats_helpers import assert_covariance_matches
    dyn = FVE(hurst=0.7, num_processes=2)
    x, y = dyn.prior_sample((20000,), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    m = dyn.marginal(torch.tensor(1.0, dtype=torch.float64))
    cov = torch.zeros(3, 3, dtype=torch.float64)
    cov[0, 0], cov[0, 1:], cov[1:, 0], cov[1:, 1:] = m.cov_xx, m.cov_xy, m.cov_xy, m.cov_yy
    assert_covariance_matches(torch.cat([x[:, None], y], 1), cov)


# ------------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("dyn", [DynamicsSpec.parse("vp").build(), FVP(hurst=0.9, num_processes=3),
                                 FVE(hurst=0.7, num_processes=2)], ids=["vp", "fvp", "fve"])
def test_loss_of_exact_model_is_the_analytic_minimum(dyn):
    """E‖ε* − ε‖² = ⟨c²s²/(c²s² + σ̃²)⟩_t for N(m, s²) data; the per-sample losses are i.i.d., so the batch
    mean lies within z of its empirical standard errors. Perturbed models are worse (paired comparison)."""
    mean, std, n = 0.5, 0.3, 40000
    gen = torch.Generator().manual_seed(2)
    x0 = mean + std * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    exact = GaussianEpsModel(dyn, mean, std)
    per_sample = score_matching_loss(exact, dyn, x0, generator=torch.Generator().manual_seed(3), reduction="none")
    target = gaussian_loss_minimum(dyn, std)
    se = float(per_sample.std()) / math.sqrt(n)
    z = bonferroni_z(3)
    assert abs(float(per_sample.mean()) - target) <= z * se, (float(per_sample.mean()), target, se)
    for worse in (lambda u, t: exact(u, t) * 1.2, lambda u, t: exact(u, t) + 0.1):
        # same generator = same (t, ε): the paired difference is positive beyond its standard error
        diff = score_matching_loss(worse, dyn, x0, generator=torch.Generator().manual_seed(3),
                                   reduction="none") - per_sample
        assert float(diff.mean()) > z * float(diff.std()) / math.sqrt(n)


def test_loss_validation_and_determinism():
    dyn = FVP(hurst=0.7, num_processes=2)
    x0 = torch.randn(8, 3)
    model = lambda u, t: torch.zeros_like(u)  # noqa: E731
    a = score_matching_loss(model, dyn, x0, generator=torch.Generator().manual_seed(0))
    b = score_matching_loss(model, dyn, x0, generator=torch.Generator().manual_seed(0))
    assert a.dim() == 0 and torch.equal(a, b)
    seen = {}

    def spy(u, t, label=None):
        seen.update(u=u.shape, t=t.shape, label=label)
        return torch.zeros_like(u)
    score_matching_loss(spy, dyn, x0, model_kwargs={"label": 3})
    assert seen == {"u": (8, 3), "t": (8,), "label": 3}
    with pytest.raises(ValueError, match="t_eps"):
        score_matching_loss(model, dyn, x0, t_eps=0.0)
    with pytest.raises(ValueError, match="t_eps"):
        score_matching_loss(model, dyn, x0, t_eps=1.0)
    with pytest.raises(ValueError, match="data's shape"):
        score_matching_loss(lambda u, t: u[:, :1], dyn, x0)
    with pytest.raises(TypeError, match="floating-point"):
        score_matching_loss(model, dyn, torch.ones(4, 2, dtype=torch.long))


@pytest.mark.filterwarnings("ignore::fracsde.PriorMismatchWarning")   # sweeps include high-λ(T) settings
# ------------------------------------------------------------------------------------------------- sampling
@settings(max_examples=5)
@given(family=st.sampled_from(["fvp", "fve"]), hurst=st.sampled_from([0.1, 0.3, 0.5, 0.7, 0.9]),
       K=st.integers(1, 5))
def test_reverse_sde_and_ode_recover_gaussian_data(family, hurst, K):
    """From the exact terminal law, the reverse SDE and the probability-flow ODE with the exact ε-model give
    x at t_end with the law N(c m, c²s² + Σ_XX(t_end)) (= N(m, s²) up to 1e-4), to within Bonferroni-
    corrected standard errors (4 checks). 1000 steps keep the Euler bias below ~0.5 standard error."""
    dyn = DynamicsSpec.parse(f"{family}:H={hurst},K={K}").build()
    mean, std, n = 1.0, 0.5, 3000
    exact = GaussianEpsModel(dyn, mean, std)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{family}{hurst}{K}".encode()))   # str hash() is salted
    x_T, y_T = _terminal_draw(dyn, mean, std, n, gen)
    m_end, s_end = (float(v) for v in exact.marginal(1e-3))
    z = bonferroni_z(4)
    for method in ("sde", "ode"):
        x = sample(exact, dyn, (n, 1), steps=1000, method=method, generator=gen, init=(x_T, y_T),
                   dtype=torch.float64)
        _assert_matches(x, m_end, s_end, z, f"{dyn.name} {method}")


@pytest.mark.filterwarnings("ignore::fracsde.PriorMismatchWarning")   # sweeps include high-λ(T) settings
def test_stable_sampler_against_plain_euler_on_the_augmented_state():
    """The failure without the treatment: plain Euler on (x, y) in the standard basis (the OU states near
    t = 0 are all ≈ W_t, Σ_YY⁻¹ y loses every digit) blows up for K = 5 and is biased for K = 3 (ODE);
    the innovation-coordinates sampler (Newton basis, implicit pinning) is not."""
    mean, std, n = 1.0, 0.5, 2000
    z = bonferroni_z(2)
    for K, method in ((5, "sde"), (3, "ode")):
        dyn = FVE(hurst=0.7 if K == 3 else 0.1, num_processes=K)
        exact = GaussianEpsModel(dyn, mean, std)
        gen = torch.Generator().manual_seed(K)
        x_T, y_T = _terminal_draw(dyn, mean, std, n, gen, dtype=torch.float32)
        plain = sample(exact, dyn, (n, 1), steps=500, method=method, generator=gen, init=(x_T, y_T),
                       coordinates="augmented", check_finite=False)          # its divergence is the point
        stable = sample(exact, dyn, (n, 1), steps=500, method=method, generator=gen, init=(x_T, y_T))
        _assert_matches(stable, mean, std, z, f"stable K={K}")
        off = (not bool(torch.isfinite(plain).all())) or abs(float(plain.std()) - std) > z * std / math.sqrt(2 * n)
        assert off, f"plain Euler unexpectedly fine for K={K}: std {float(plain.std())}"


def test_reverse_time_sde_is_solvable_by_torchsde():
    """ReverseTimeSDE (augmented state, s = T − t) with torchsde's Euler and a BrownianInterval, as the reverse
    SDE and as the probability-flow ODE (zero diffusion); K = 2, where the standard basis is still well
    conditioned. Also: the ε-form and the generic score form of the drift agree."""
    import torchsde
    dyn = FVP(hurst=0.7, num_processes=2)
    mean, std, n = 1.0, 0.5, 2000
    exact = GaussianEpsModel(dyn, mean, std)
    gen = torch.Generator().manual_seed(5)
    x_T, y_T = _terminal_draw(dyn, mean, std, n, gen)
    sde = ReverseTimeSDE(dyn, (1,), eps_model=exact)
    generic = ReverseTimeSDE(dyn, (1,), score=eps_to_score(dyn, exact))
    z0 = sde.pack(x_T, y_T)
    for s in (0.0, 0.5, 0.95):
        torch.testing.assert_close(sde.f(s, z0[:50]), generic.f(s, z0[:50]), rtol=1e-7, atol=1e-9)
    t_end, steps = 1e-2, 500
    dt = (1 - t_end) / steps
    torch.manual_seed(6)
    bm = sde.brownian_motion(n, t_end, dt, dtype=torch.float64)
    span = torch.tensor([0.0, 1 - t_end], dtype=torch.float64)
    m_end, s_end = (float(v) for v in exact.marginal(t_end))
    zs = torchsde.sdeint(sde, z0, span, method="euler", dt=dt, bm=bm)
    _assert_matches(sde.unpack(zs[-1])[0], m_end, s_end, bonferroni_z(4), "torchsde euler, reverse SDE")
    ode = ReverseTimeSDE(dyn, (1,), eps_model=exact, probability_flow=True)
    zs = torchsde.sdeint(ode, z0, span, method="euler", dt=dt, bm=bm)
    _assert_matches(ode.unpack(zs[-1])[0], m_end, s_end, bonferroni_z(4), "torchsde euler, probability flow")


def test_sampler_validation():
    dyn = FVP(hurst=0.7, num_processes=2)
    model = lambda u, t: torch.zeros_like(u)  # noqa: E731
    for kwargs, match in [({"steps": 0}, "steps must be an integer >= 1"), ({"steps": 2.5}, "steps"),
                          ({"method": "heun"}, "method must be one of"),
                          ({"t_end": 0.0}, r"t_end must lie in \(0, T\)"), ({"t_end": 1.0}, "t_end"),
                          ({"coordinates": "x"}, "coordinates")]:
        with pytest.raises(ValueError, match=match):
            sample(model, dyn, (4, 2), **{"steps": 3, **kwargs})
    with pytest.raises(ValueError, match="shape must be"):
        sample(model, dyn, (), steps=3)
    with pytest.raises(ValueError, match="input's shape"):
        sample(lambda u, t: u.sum(1), dyn, (4, 2), steps=3)
    with pytest.raises(ValueError, match="init must be"):
        sample(model, dyn, (4, 2), steps=3, init=(torch.zeros(4, 2), torch.zeros(4, 2, 3)))
    with pytest.raises(TypeError, match="linear fractional dynamics"):
        sample(model, "fvp", (4, 2), steps=3)


def test_sampler_is_streaming_deterministic_and_reports_progress(monkeypatch, capsys):
    """Noise is drawn one step at a time (no (steps, …) tensor), the result is a function of the generator,
    and progress=True shows a tqdm bar."""
    dyn = FVP(hurst=0.7, num_processes=2)
    model = GaussianEpsModel(dyn, 0.0, 1.0)
    sizes = []
    real = torch.randn

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        sizes.append(out.numel())
        return out
    monkeypatch.setattr(torch, "randn", spy)
    a = sample(model, dyn, (6, 3), steps=50, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(torch, "randn", real)
    assert max(sizes) <= 6 * 3 * 2 and len(sizes) >= 50
    b = sample(model, dyn, (6, 3), steps=50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    sample(model, dyn, (6, 3), steps=5, method="ode", progress=True)
    assert "gfdm ode" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- likelihood
@pytest.mark.parametrize("dyn", [DynamicsSpec.parse("vp").build(), FVP(hurst=0.9, num_processes=2)], ids=["vp", "fvp"])
def test_nll_of_exact_gaussian_model(dyn):
    """For N(m, s²) data the u-space probability-flow ODE is affine, u_T − c_T m = (u_ε − c_ε m) std_T/std_ε, so
    log p(x_0) = log N(u_T; 0, σ̃_T²) + d log(std_T/std_ε) + d log c_ε in closed form. The divergence of ε* is
    diagonal, so Hutchinson with Rademacher probes is exact."""
    mean, std, t_eps = 0.3, 0.6, 1e-5
    exact = GaussianEpsModel(dyn, mean, std)
    x0 = mean + std * torch.randn(16, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    bpd = nll_bits_per_dim(exact, dyn, x0, steps=200, generator=torch.Generator().manual_seed(0), t_eps=t_eps)
    t = torch.tensor([t_eps, 1.0], dtype=torch.float64)
    c, s = dyn.mean_coefficient(t), dyn.conditional_std(t)
    sd = torch.sqrt(c ** 2 * std ** 2 + s ** 2)
    u_T = c[1] * mean + (c[0] * x0 - c[0] * mean) * sd[1] / sd[0]
    d = 3
    logp = (-0.5 * (u_T ** 2).sum(1) / s[1] ** 2 - 0.5 * d * torch.log(2 * math.pi * s[1] ** 2)
            + d * torch.log(sd[1] / sd[0]) + d * torch.log(c[0]))
    torch.testing.assert_close(bpd, -logp / (d * math.log(2)), rtol=0, atol=2e-3)
    exact_tr = nll_bits_per_dim(exact, dyn, x0[:4], steps=50, exact_trace=True)
    hutch = nll_bits_per_dim(exact, dyn, x0[:4], steps=50, hutchinson_samples=2)
    torch.testing.assert_close(exact_tr, hutch, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="steps"):
        nll_bits_per_dim(exact, dyn, x0, steps=0)
