"""The rough regime (issue 17): rate rules, exact sampling at any K, exponential Euler, lifted Volterra SDEs."""
import math
import time

import mpmath
import pytest
import torch

from fracsde import (
    FractionalSDE,
    IllConditionedWarning,
    MarkovApproxFBM,
    NonFiniteStateError,
    VolterraSDE,
    markov_rates,
    sdeint,
    strong_error,
    volterra_blocks,
    volterra_sdeint,
)
from fracsde.noise import step_covariance
from fracsde.rules import kernel_projection
from stats_helpers import assert_covariance_matches, bonferroni_z

F64 = torch.float64


def ill_conditioned_geometric(hurst, K, gamma_max=20.0):
    """A geometric grid with K ≥ 6 (cond(A) > 1e10): accepted, with the IllConditionedWarning it must give."""
    with pytest.warns(IllConditionedWarning):
        return MarkovApproxFBM(hurst, K, gamma_max=gamma_max)

#: Bayer & Breneis' optimised rates, H = 0.1, T = 1, relative strong error (REFERENCE §7)
PUBLISHED = {1: 0.552, 2: 0.374, 4: 0.201, 8: 0.0763, 16: 0.0177, 32: 0.00206}


# --------------------------------------------------------------------------------------------- rate rules
def test_optimal_rule_meets_the_published_optimum_and_decreases_strictly():
    start = time.perf_counter()
    rules = {K: markov_rates(0.1, K, "optimal", horizon=1.0) for K in range(1, 33)}
    elapsed = time.perf_counter() - start
    for K, published in PUBLISHED.items():
        bound = 0.0025 if K == 32 else 1.05 * published
        assert rules[K].strong_error <= bound, (K, rules[K].strong_error, published)
    errors = [rules[K].strong_error for K in range(1, 33)]
    assert all(b < a for a, b in zip(errors[:-1], errors[1:], strict=True)), errors
    assert elapsed < 30.0, f"building K = 1..32 took {elapsed:.1f} s"        # ~0.5 s measured on one thread
    assert all(bool((r.rates[1:] / r.rates[:-1] >= 1.4 - 1e-9).all()) for r in rules.values())


def test_strong_error_agrees_with_a_50_digit_evaluation():
    """The achieved error of the float64 weights at K = 32 (rates up to ~4e27), recomputed with mpmath."""
    rule = markov_rates(0.1, 32, "optimal")
    H = mpmath.mpf("0.1")
    with mpmath.workdps(50):
        g = [mpmath.mpf(float(x)) for x in rule.rates]
        w = [mpmath.mpf(float(x)) for x in rule.weights]
        a = H + mpmath.mpf("0.5")
        norm2 = 1 / (2 * H * mpmath.gamma(a) ** 2)
        cross = sum(wi * gi ** (-a) * mpmath.gammainc(a, 0, gi, regularized=True) for wi, gi in zip(w, g, strict=True))
        pairs = list(zip(w, g, strict=True))
        gram = sum(wi * wj * (1 - mpmath.exp(-(gi + gj))) / (gi + gj) for wi, gi in pairs for wj, gj in pairs)
        exact = float(mpmath.sqrt(norm2 - 2 * cross + gram) / mpmath.sqrt(norm2))
    assert rule.strong_error == pytest.approx(exact, rel=1e-6)
    assert strong_error(0.1, rule.rates, rule.weights) == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("rates", ["optimal", "quadrature"])
def test_the_same_error_at_every_horizon(rates):
    errs = [markov_rates(0.1, 8, rates, horizon=T).strong_error for T in (0.01, 1.0, 100.0)]
    assert max(errs) - min(errs) <= 1e-9 * max(errs), errs


def test_quadrature_and_capped_rules():
    quad = [markov_rates(0.1, K, "quadrature").strong_error for K in (2, 8, 32)]
    assert quad[0] > quad[1] > quad[2] and quad[2] < 0.05, quad
    capped = markov_rates(0.1, 8, "optimal", max_rate=1e4)
    assert float(capped.rates.max()) <= 1e4 * (1 + 1e-12)
    assert PUBLISHED[8] < capped.strong_error < markov_rates(0.1, 8, "geometric", gamma_max=1e4).strong_error


def test_learnable_hurst_gradients_of_the_weights_with_fixed_rates():
    noise = MarkovApproxFBM(0.1, 16, rates="optimal", learnable_hurst=True)
    probe = torch.linspace(1.0, 2.0, 16, dtype=F64)
    (noise.weights * probe).sum().backward()
    eps, h = 1e-6, 0.1
    fd = float(((kernel_projection(h + eps, noise.gammas) - kernel_projection(h - eps, noise.gammas)) * probe).sum())
    fd = fd / (2 * eps) * h * (1 - h)                       # d/dlogit(H) = H(1 − H) d/dH
    assert float(noise.hurst_logit.grad) == pytest.approx(fd, rel=1e-6)


def test_bad_rules_are_refused_clearly():
    with pytest.raises(ValueError, match="type I fBM"):
        markov_rates(0.1, 8, "optimal", kind="type1")
    with pytest.raises(ValueError, match="hurst < 0.5"):
        markov_rates(0.7, 4, "quadrature")
    with pytest.raises(ValueError, match="rates"):
        MarkovApproxFBM(0.1, 4, rates="chebyshev")
    with pytest.raises(ValueError, match=r"num_processes must be in \[1, 64\]"):
        MarkovApproxFBM(0.7, 10 ** 6)
    for kwargs in ({"num_processes": 22}, {"num_processes": 40}, {"num_processes": 3, "gamma_max": 1 + 1e-9}):
        with pytest.raises(ValueError, match="num_processes=.*gamma_max=.*rates='optimal'"):
            MarkovApproxFBM(0.7, **kwargs)


def test_both_error_measures_are_reported():
    noise = MarkovApproxFBM(0.1, 8, rates="optimal")
    rule = markov_rates(0.1, 8, "optimal")
    assert float(noise.strong_error) == pytest.approx(rule.strong_error, rel=1e-12)
    assert float(noise.approximation_error) == pytest.approx(rule.approximation_error, rel=1e-9)
    assert 0 < float(noise.approximation_error) < float(ill_conditioned_geometric(0.1, 8, 1e3).approximation_error)
    with pytest.raises(ValueError, match="type II"):
        _ = MarkovApproxFBM(0.7, 3, kind="type1").strong_error


# --------------------------------------------------------------------------------------------- sampling
CASES = [(0.7, 3, "geometric"), (0.7, 8, "geometric"), (0.1, 32, "optimal"), (0.7, 16, "optimal"),
         (0.1, 8, "quadrature")]


@pytest.mark.parametrize("hurst,K,rates", CASES)
@pytest.mark.parametrize("method", ["state", "innovations"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_samples_match_the_covariance_at_any_K(hurst, K, rates, method, dtype):
    noise = ill_conditioned_geometric(hurst, K) if K >= 6 and rates == "geometric" else \
        MarkovApproxFBM(hurst, K, rates=rates)
    ts = torch.linspace(0, 1, 65)
    idx = [8, 32, 64]
    paths = noise.sample(ts, 4000, generator=torch.Generator().manual_seed(K), method=method, dtype=dtype)
    assert paths.dtype == dtype
    t = ts[idx].double()
    assert_covariance_matches(paths[:, idx].double(), noise.covariance(t[:, None], t[None, :]), alpha=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_sampling_is_computed_safely_and_cast(dtype):
    noise = MarkovApproxFBM(0.1, 16, rates="optimal")
    paths = noise.sample(torch.linspace(0, 1, 65), 4000, generator=torch.Generator().manual_seed(0), dtype=dtype)
    assert paths.dtype == dtype and bool(torch.isfinite(paths).all())
    var = float(noise.covariance(1.0, 1.0))
    z = bonferroni_z(2)
    assert abs(float(paths[:, -1].double().var()) - var) <= z * var * math.sqrt(2 / 4000) + 0.01 * var


@pytest.mark.parametrize("method", ["state", "innovations"])
@pytest.mark.parametrize("hurst,K,rates,kind", [(0.1, 8, "optimal", "type2"), (0.7, 3, "geometric", "type1")])
def test_return_brownian_gives_the_driving_brownian_motion(method, hurst, K, rates, kind):
    """(B̂, W) jointly: the full state (K + 1 normals per step) or the joint innovations (2 per step)."""
    noise = MarkovApproxFBM(hurst, K, rates=rates, kind=kind)
    ts = torch.linspace(0, 1, 33, dtype=F64)
    bhat, w = noise.sample(ts, 6000, generator=torch.Generator().manual_seed(1), dtype=F64, return_brownian=True,
                           method=method)
    assert w.shape == bhat.shape and bool((w[:, 0] == 0).all())
    t = torch.tensor([0.25, 1.0], dtype=F64)
    g, om = noise.gammas, noise.weights
    cov = torch.zeros(4, 4, dtype=F64)                    # (B̂_.25, B̂_1, W_.25, W_1)
    cov[:2, :2] = noise.covariance(t[:, None], t[None, :])
    cov[2:, 2:] = torch.minimum(t[:, None], t[None, :])
    for i, s in enumerate(t):                             # Cov(B̂_s, W_u) = Σ ω_k e^{−γ_k(s−m)}(1 − e^{−γ_k m})/γ_k
        for j, u in enumerate(t):
            m = min(s, u)
            cov[i, 2 + j] = cov[2 + j, i] = float((om * torch.exp(-g * (s - m)) * -torch.expm1(-g * m) / g).sum())
    assert_covariance_matches(torch.stack([bhat[:, 8], bhat[:, 32], w[:, 8], w[:, 32]], 1), cov)


def test_covariance_is_never_negative_and_refuses_nan():
    noise = MarkovApproxFBM(0.9, 6)
    t = torch.linspace(0, 1, 50, dtype=F64)
    assert bool((noise.covariance(t, t) >= 0).all())
    with pytest.raises(ValueError, match="finite"):
        noise.covariance(float("nan"), 1.0)


# --------------------------------------------------------------------------------------------- stiff solving
class AdditiveOU(FractionalSDE):
    noise_type, sde_type = "additive", "ito"

    def f(self, t, x):
        return -x

    def g(self, t, x):
        return torch.full((x.shape[0], 1, 1), 0.5, dtype=x.dtype)


def _ou_variance(noise):
    """Var X_1 of dX = −X dt + ½ dB̂, X_0 = 0: X_1 = ∫ k(1 − u) dW_u,
    k(r) = ½ Σ ω_k (e^{−r} − γ_k e^{−γ_k r})/(1 − γ_k)."""
    g, w = noise.gammas, noise.weights
    c = 0.5 * w / (1 - g)
    lam = torch.cat([g, torch.ones(1, dtype=F64)])
    a = torch.cat([-c * g, c.sum()[None]])
    return float(a @ step_covariance(lam, 1.0) @ a)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_exponential_euler_variance_of_a_stiff_fractional_ou(dtype):
    noise = MarkovApproxFBM(0.1, 16, rates="optimal")          # rates up to 3e17, dt = 0.01
    n = 40000
    xs = sdeint(AdditiveOU(noise), torch.zeros(n, 1, dtype=dtype), torch.linspace(0, 1, 11), dt=0.01,
                generator=torch.Generator().manual_seed(0))
    var = _ou_variance(noise)
    assert xs.dtype == dtype
    assert abs(float(xs[-1].double().var()) - var) <= 4 * var * math.sqrt(2 / n)


def test_explicit_methods_beyond_the_stability_limit():
    noise = ill_conditioned_geometric(0.1, 8, 1e3)          # the failing case
    x0 = torch.zeros(64, 1, dtype=F64)
    ts = torch.linspace(0, 1, 11, dtype=F64)
    with pytest.raises(ValueError, match="exponential_euler"):
        sdeint(AdditiveOU(noise), x0, ts, method="euler", dt=0.01)
    xs = sdeint(AdditiveOU(noise), x0, ts, dt=0.01, entropy=3)   # no method: switches instead of diverging
    assert bool(torch.isfinite(xs).all())
    with pytest.raises(ValueError, match="no adjoint"):
        sdeint(AdditiveOU(noise), x0, ts, method="exponential_euler", dt=0.01, adjoint=True)


class ItoGBM(FractionalSDE):
    noise_type, sde_type = "scalar", "ito"

    def __init__(self, noise, sigma=0.5):
        super().__init__(noise)
        self.sigma = torch.nn.Parameter(torch.tensor(sigma, dtype=F64))

    def f(self, t, x):
        return 0.1 * x

    def g(self, t, x):
        return (self.sigma * x).unsqueeze(-1)


def test_exponential_euler_converges_on_an_ito_fgbm():
    """X = exp(0.1t + σB̂ − ½σ²(Σω)²t) exactly (B̂ a semimartingale with d⟨B̂⟩ = (Σω)² dt); error falls with dt."""
    noise = MarkovApproxFBM(0.7, 3)
    ts = torch.linspace(0, 1, 5, dtype=F64)
    errors = []
    for dt in (2 ** -5, 2 ** -9):
        sde = ItoGBM(noise)
        xs, bhat = sdeint(sde, torch.ones(2000, 1, dtype=F64), ts, method="exponential_euler", dt=dt,
                          return_noise=True, generator=torch.Generator().manual_seed(5))
        qv = float(noise.weights.sum()) ** 2
        exact = torch.exp(0.1 * ts[:, None, None] + 0.5 * bhat - 0.125 * qv * ts[:, None, None])
        errors.append(float((xs - exact).abs().mean().detach()))
    assert errors[1] < 0.35 * errors[0], errors


def test_exponential_euler_gradients_are_checkpointed_and_exact():
    """Backprop through the checkpointed segments equals central finite differences on common random numbers."""
    noise = MarkovApproxFBM(0.3, 4, rates="optimal")
    ts = torch.linspace(0, 1, 3, dtype=F64)

    def mean_end(sigma):
        sde = ItoGBM(noise, sigma)
        xs = sdeint(sde, torch.ones(16, 1, dtype=F64), ts, method="exponential_euler", dt=1 / 200,
                    generator=torch.Generator().manual_seed(2))
        return xs[-1].mean(), sde

    value, sde = mean_end(0.4)
    value.backward()
    fd = (float(mean_end(0.4 + 1e-6)[0].detach()) - float(mean_end(0.4 - 1e-6)[0].detach())) / 2e-6
    assert float(sde.sigma.grad) == pytest.approx(fd, rel=1e-6)


def test_exponential_euler_stratonovich_fgbm_obeys_the_chain_rule():
    """Heun's corrector: X = exp(0.1t + σB̂) (Stratonovich) up to the discretisation error, small at dt = 2^-10."""
    class StratGBM(ItoGBM):
        sde_type = "stratonovich"

    noise = MarkovApproxFBM(0.7, 3)
    ts = torch.linspace(0, 1, 5, dtype=F64)
    xs, bhat = sdeint(StratGBM(noise), torch.ones(500, 1, dtype=F64), ts, method="exponential_euler", dt=2 ** -10,
                      return_noise=True, generator=torch.Generator().manual_seed(6))
    exact = torch.exp(0.1 * ts[:, None, None] + 0.5 * bhat)
    assert float(((xs - exact).abs() / exact).max().detach()) < 2e-3


def test_exponential_euler_reports_a_non_finite_drift():
    class Blows(AdditiveOU):
        def f(self, t, x):
            return torch.full_like(x, float("nan")) if t > 0.5 else -x

    with pytest.raises(NonFiniteStateError):
        sdeint(Blows(MarkovApproxFBM(0.1, 4, rates="optimal")), torch.zeros(4, 1, dtype=F64),
               torch.linspace(0, 1, 5, dtype=F64), method="exponential_euler", dt=0.05)


# --------------------------------------------------------------------------------------------- Volterra
class Linear(VolterraSDE):
    def __init__(self, noise, lam=0.0, sig=1.0):
        super().__init__(noise)
        self.lam, self.sig = lam, sig

    def b(self, t, x):
        return -self.lam * x

    def sigma(self, t, x):
        return torch.full_like(x, self.sig)


def test_volterra_with_unit_diffusion_is_the_noise():
    noise = MarkovApproxFBM(0.1, 16, rates="optimal")
    ts = torch.linspace(0, 1, 17, dtype=F64)
    xs = volterra_sdeint(Linear(noise), torch.zeros(5000, 1, dtype=F64), ts, generator=torch.Generator().manual_seed(3))
    idx = [4, 16]
    t = ts[idx]
    assert_covariance_matches(xs[idx, :, 0].T, noise.covariance(t[:, None], t[None, :]))


def test_linear_volterra_equation_against_its_exact_solution():
    """X = x0 − λ∫K̂(t−s)X ds + ∫K̂(t−s)dW: the lifted system is a linear SDE, whose exact moments we compute
    by the Van Loan formula (moderate rates keep it well conditioned). The scheme's bias is O(dt)."""
    from fracsde.numerics import discretize_linear_sde

    noise = MarkovApproxFBM(0.3, 4, rates="optimal", max_rate=50.0)
    lam, x0 = 1.0, 1.0
    g, w = noise.gammas, noise.weights
    K = g.numel()
    # U' = (−Γ − λ 1ωᵀ)U dt − λx0 1 dt + 1 dW; mean via the augmented constant state c ≡ 1
    F = torch.zeros(K + 1, K + 1, dtype=F64)
    F[:K, :K] = -torch.diag(g) - lam * torch.outer(torch.ones(K, dtype=F64), w)
    F[:K, K] = -lam * x0
    G = torch.cat([torch.ones(K, dtype=F64), torch.zeros(1, dtype=F64)])
    A, Q = discretize_linear_sde(F, G, torch.tensor([1.0], dtype=F64))
    z0 = torch.cat([torch.zeros(K, dtype=F64), torch.ones(1, dtype=F64)])
    mean = x0 + float(w @ (A[0] @ z0)[:K])
    var = float(w @ Q[0, :K, :K] @ w)
    n = 20000
    xs = volterra_sdeint(Linear(noise, lam), torch.full((n, 1), x0, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                         dt=1 / 400, generator=torch.Generator().manual_seed(4))
    z = bonferroni_z(2)
    assert abs(float(xs[-1].mean()) - mean) <= z * math.sqrt(var / n) + 0.01 * abs(mean - x0)
    assert abs(float(xs[-1].var()) - var) <= z * var * math.sqrt(2 / n) + 0.01 * var


def test_square_root_volterra_stays_well_defined():
    """The rough Heston variance: b = θ − λV, σ = ν√V⁺ at H = 0.1 with rates up to 1e17 (dt = 1/100)."""
    class SquareRoot(VolterraSDE):
        def b(self, t, v):
            return 0.02 - 0.3 * v

        def sigma(self, t, v):
            return 0.3 * v.clamp(min=0).sqrt()

    noise = MarkovApproxFBM(0.1, 16, rates="optimal")
    xs, w = volterra_sdeint(SquareRoot(noise), torch.full((2000, 1), 0.02, dtype=F64), torch.linspace(0, 1, 101),
                            generator=torch.Generator().manual_seed(0), return_brownian=True)
    assert bool(torch.isfinite(xs).all()) and w.shape == xs.shape
    # E V_t solves the linear Volterra equation m = V0 + ∫K̂(t−s)(θ − λm) ds, ≈ V0 = θ/λ·… here θ − λV0 = 0.014
    assert 0.02 < float(xs[-1].mean()) < 0.08


class _SquareRoot(VolterraSDE):
    def b(self, t, v):
        return 0.02 - 0.3 * v

    def sigma(self, t, v):
        return 0.3 * v.clamp(min=0).sqrt()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("block", [None, 1, 7, 200])
def test_volterra_blocks_concatenate_to_the_solution_bit_for_bit(dtype, block):
    noise = MarkovApproxFBM(0.1, 8, rates="optimal", max_rate=64.0)
    x0, ts = torch.full((300, 2), 0.02, dtype=dtype), torch.linspace(0, 1, 65)
    xs, ws = volterra_sdeint(_SquareRoot(noise), x0, ts, dt=0.004, generator=torch.Generator().manual_seed(5),
                             return_brownian=True)
    blocks = list(volterra_blocks(_SquareRoot(noise), x0, ts, dt=0.004, generator=torch.Generator().manual_seed(5),
                                  block=block))
    assert [b[0] for b in blocks] == [sum(b[1].shape[0] for b in blocks[:i]) for i in range(len(blocks))]
    if block is not None:
        assert all(b[1].shape[0] == block for b in blocks[:-1])
    assert torch.equal(torch.cat([b[1] for b in blocks]), xs) and torch.equal(torch.cat([b[2] for b in blocks]), ws)


def test_volterra_blocks_name_the_interval_where_the_solution_blew_up_and_refuse_a_bad_block():
    class Explosive(VolterraSDE):
        def b(self, t, x):
            return torch.where(torch.tensor(t) > 0.5, x.new_tensor(float("inf")), torch.zeros_like(x))

        def sigma(self, t, x):
            return torch.zeros_like(x)

    with pytest.raises(FloatingPointError, match=r"volterra_blocks: .* between t = 0.5\d* and 0.5\d*"):
        for _ in volterra_blocks(Explosive(MarkovApproxFBM(0.3, 3)), torch.zeros(2, 1), torch.linspace(0, 1, 65),
                                 block=5):
            pass
    with pytest.raises(ValueError, match="block must be a positive int"):                # when called
        volterra_blocks(_SquareRoot(MarkovApproxFBM(0.3, 3)), torch.zeros(2, 1), torch.linspace(0, 1, 5), block=0)
    with pytest.raises(ValueError, match="x0 must be a float32/float64 tensor"):
        volterra_blocks(_SquareRoot(MarkovApproxFBM(0.3, 3)), torch.zeros(2), torch.linspace(0, 1, 5))


def test_volterra_and_projection_refuse_bad_input_clearly():
    class Scalar(VolterraSDE):
        def b(self, t, x):
            return torch.zeros(x.shape[0])                 # (batch,) instead of (batch, d)

        def sigma(self, t, x):
            return torch.ones_like(x)

    with pytest.raises(ValueError, match=r"b\(t, x\) must return a tensor of the state's shape \(4, 1\)"):
        volterra_sdeint(Scalar(MarkovApproxFBM(0.3, 3)), torch.zeros(4, 1), torch.linspace(0, 1, 3))
    with pytest.raises(ValueError, match="rates must be finite and > 0"):
        kernel_projection(0.1, [1.0, -2.0])
    with pytest.raises(ValueError, match="hurst"):
        kernel_projection(1.5, [1.0, 2.0])


def test_graded_factor_is_accurate_entry_by_entry():
    """OU innovations of the optimal K = 32 rates (variances 1e−28..1e−2) and ΔW over h = 0.01: the Jacobi-scaled
    factor reproduces every entry to 1e−12 of √(Q_ii Q_jj), whether or not an unscaled Cholesky would succeed (its
    eigen fallback is accurate only relative to the largest entry)."""
    from fracsde.noise import step_covariance
    from fracsde.numerics import graded_psd_factor

    g = markov_rates(0.1, 32, "optimal").rates
    Q = step_covariance(torch.cat([g, torch.zeros(1, dtype=F64)]), 0.01)
    scale = torch.sqrt(torch.outer(Q.diagonal(), Q.diagonal()))

    def error(L):
        return float(((L @ L.T - Q).abs() / scale).max())

    assert error(graded_psd_factor(Q)) < 1e-12
    h = torch.logspace(-6, 0, 7, dtype=F64)                     # down to nearly rank-one (≈ h·11ᵀ) steps
    for Qh in step_covariance(g, h):
        L = graded_psd_factor(Qh)
        assert float(((L @ L.T - Qh).abs() / torch.sqrt(torch.outer(Qh.diagonal(), Qh.diagonal()))).max()) < 1e-9
