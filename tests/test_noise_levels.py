"""Noise-level-aware training: EDM preconditioning in u-space and the time-sampling rules (a λ-weighting)."""
import math

import pytest
import torch
from scipy import stats

from models.gfdm import FVE, FVP, GaussianEpsModel, score_matching_loss
from models.gfdm.precondition import Preconditioned, make_eps_model
from models.gfdm.time_sampling import LOG_SNR_CAP, TimeSampler

F64 = torch.float64
KS_ALPHA = 1e-3     # one seeded KS test per rule: a false alarm has probability 1e-3


class Recorder(torch.nn.Module):
    """A raw network that records (x_in, c_noise) and returns a fixed function of them."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, c_noise, **kw):
        self.calls.append((x.detach().clone(), c_noise.detach().clone()))
        return torch.tanh(x) * (1 + c_noise.view(-1, *(1,) * (x.dim() - 1)))


def test_none_is_the_plain_network_and_make_eps_model_does_not_wrap_it():
    dyn, net = FVP(0.9, 2), Recorder()
    assert make_eps_model(net, dyn, "none") is net
    u, t = torch.randn(4, 3, dtype=F64), torch.full((4,), 0.3, dtype=F64)
    torch.testing.assert_close(Preconditioned(net, dyn, kind="none")(u, t), net(u, t))


@pytest.mark.parametrize("t", [1e-3, 0.1, 0.5, 1.0])
def test_edm_input_has_unit_variance_for_data_of_std_sigma_data(t):
    """Var(x_in) = (c²σ_d² + σ̃²)/(c²σ_d² + σ̃²) = 1 exactly; checked on n = 20000 draws (tolerance: 5 SE of a
    sample variance, SE = √(2/n))."""
    dyn, net = FVP(0.9, 3), Recorder()
    model = Preconditioned(net, dyn, sigma_data=0.5)
    n = 20000
    g = torch.Generator().manual_seed(0)
    x0 = 0.5 * torch.randn(n, 1, generator=g, dtype=F64)
    tt = torch.full((n,), t, dtype=F64)
    c, s = dyn.mean_coefficient(tt)[:, None], dyn.conditional_std(tt)[:, None]
    model(c * x0 + s * torch.randn(n, 1, generator=g, dtype=F64), tt)
    x_in, c_noise = net.calls[-1]
    assert abs(float(x_in.var()) - 1.0) < 5 * math.sqrt(2 / n)
    lam = float(dyn.log_snr(torch.tensor(t, dtype=F64)))
    torch.testing.assert_close(c_noise, torch.full_like(c_noise, -lam / 8), rtol=1e-12, atol=1e-12)


def test_edm_with_zero_network_is_the_exact_denoiser_of_gaussian_data():
    """For x₀ ~ N(0, σ_d²) the optimal denoiser is c_skip·x, i.e. F = 0: the wrapper then returns E[ε | u]."""
    dyn = FVP(0.9, 3)
    zero = lambda x, c, **kw: torch.zeros_like(x)                      # noqa: E731
    model = Preconditioned(zero, dyn, sigma_data=0.5)
    exact = GaussianEpsModel(dyn, mean=0.0, std=0.5)
    u = torch.randn(64, 2, dtype=F64)
    for t in (1e-3, 0.2, 0.9):
        tt = torch.full((64,), t, dtype=F64)
        torch.testing.assert_close(model(u, tt), exact(u, tt), rtol=1e-9, atol=1e-12)


def test_edm_loss_weight_makes_the_eps_loss_the_unit_mse_of_the_network_output():
    dyn, net = FVE(0.7, 2), Recorder()
    model = Preconditioned(net, dyn, sigma_data=0.5)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(8, 5, generator=g, dtype=F64), torch.randn(8, 5, generator=g, dtype=F64)
    t = torch.linspace(0.01, 1.0, 8, dtype=F64)
    c, s = dyn.mean_coefficient(t)[:, None], dyn.conditional_std(t)[:, None]
    u = c * x0 + s * eps
    eps_hat = model(u, t)
    F = net(*net.calls[-1])
    sigma = (s / c)
    sd = 0.5
    c_skip, c_out = sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / torch.sqrt(sigma ** 2 + sd ** 2)
    target = (x0 - c_skip * u / c) / c_out                              # EDM's F target
    lhs = model.loss_weight(t) * (eps_hat - eps).pow(2).mean(1)
    torch.testing.assert_close(lhs, (F - target).pow(2).mean(1), rtol=1e-9, atol=1e-12)


def _lam(dyn, t):
    return dyn.log_snr(t, check=False)


def test_each_time_sampling_draws_lambda_from_its_stated_density():
    """One-sample KS tests (n = 4000, seeded) against the exact CDFs of λ."""
    dyn = FVP(0.9, 3)
    n = 4000
    g = lambda: torch.Generator().manual_seed(5)                      # noqa: E731
    # uniform: t ~ U(t_min, T)
    s = TimeSampler(dyn, "uniform", 1e-5)
    t = s(n, g())
    assert stats.kstest(t.numpy(), stats.uniform(loc=s.t_min, scale=1 - s.t_min).cdf).pvalue > KS_ALPHA
    # log-snr: λ ~ U(lo, hi)
    s = TimeSampler(dyn, "log-snr:-6,12", 1e-5)
    lam = _lam(dyn, s(n, g()))
    assert stats.kstest(lam.numpy(), stats.uniform(loc=-6, scale=18).cdf).pvalue > KS_ALPHA
    # edm: λ = −2 ln σ, ln σ ~ N(−1.2, 1.2²), truncated to the model's bounds
    s = TimeSampler(dyn, "edm", 1e-5)
    lam = _lam(dyn, s(n, g()))
    lo, hi = s.log_snr_bounds
    truncated = stats.truncnorm((lo - 2.4) / 2.4, (hi - 2.4) / 2.4, loc=2.4, scale=2.4)
    assert stats.kstest(lam.numpy(), truncated.cdf).pvalue > KS_ALPHA
    # like:vp: VP's λ under uniform t, truncated to the shared range
    vp = FVP(0.9, 0)
    s = TimeSampler(dyn, "like:vp", 1e-5)
    lam = _lam(dyn, s(n, g()))
    a, b = s.other_times
    cdf = lambda x: (b - vp.time_at_log_snr(torch.as_tensor(x, dtype=F64), check=False).numpy()) / (b - a)  # noqa
    assert stats.kstest(lam.numpy(), cdf).pvalue > KS_ALPHA
    assert float(lam.min()) >= dyn.log_snr_range[0] - 1e-9


def test_like_vp_trains_on_the_pairs_vp_trains_on():
    """With EDM preconditioning, (x_in, c_noise, target) depend on the dynamics only through λ: an FVP(0.9, 3) time
    and a VP time with the same λ give the same recorded inputs for the same (x₀, ε), and like:vp draws VP's λ."""
    fvp, vp = FVP(0.9, 3), FVP(0.9, 0)
    net_f, net_v = Recorder(), Recorder()
    model_f, model_v = Preconditioned(net_f, fvp), Preconditioned(net_v, vp)
    lam = torch.linspace(-6.0, 9.0, 16, dtype=F64)                   # inside both ranges
    t_f, t_v = fvp.time_at_log_snr(lam), vp.time_at_log_snr(lam)
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(16, 4, generator=g, dtype=F64), torch.randn(16, 4, generator=g, dtype=F64)
    for model, dyn, t in ((model_f, fvp, t_f), (model_v, vp, t_v)):
        c, s = dyn.mean_coefficient(t)[:, None], dyn.conditional_std(t)[:, None]
        out = model(c * x0 + s * eps, t)
        model.last = (out, model.loss_weight(t))
    (xf, cf), (xv, cv) = net_f.calls[-1], net_v.calls[-1]
    torch.testing.assert_close(xf, xv, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(cf, cv, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(model_f.last[0], model_v.last[0], rtol=1e-7, atol=1e-9)   # same ε prediction
    torch.testing.assert_close(model_f.last[1], model_v.last[1], rtol=1e-8, atol=0)      # same weight


def test_float32_training_never_draws_times_whose_noise_is_rounded_away():
    dyn = FVP(0.9, 3)
    s = TimeSampler(dyn, "uniform", 1e-5, torch.float32)
    t = s(20000, torch.Generator().manual_seed(0))
    assert float(_lam(dyn, t).max()) <= LOG_SNR_CAP[torch.float32] + 1e-9
    sigma_over_c = dyn.conditional_std(t) / dyn.mean_coefficient(t)
    assert float(sigma_over_c.min()) >= 16 * torch.finfo(torch.float32).eps * (1 - 1e-9)
    assert TimeSampler(FVP(0.9, 0), "uniform", 1e-5, torch.float32).t_min == 1e-5        # VP: not affected


def test_the_loss_accepts_every_rule_and_weights_by_the_preconditioner():
    dyn = FVP(0.9, 2)
    net = lambda x, c, **kw: 0.1 * x                                   # noqa: E731
    x0 = torch.randn(32, 1, 4, 4)
    for rule in ("uniform", "log-snr", "edm", "like:vp", "like:fvp:H=0.7,K=2"):
        loss = score_matching_loss(Preconditioned(net, dyn), dyn, x0, generator=torch.Generator().manual_seed(0),
                                   time_sampling=rule)
        assert torch.isfinite(loss) and loss.dtype == torch.float32


@pytest.mark.parametrize("rule,match", [
    ("sometimes", "time_sampling must be one of"),
    ("like:vpsde", "does not parse"),
    ("log-snr:-20,5", "must lie inside the model's"),
    ("log-snr:3", "expected 'log-snr:LO,HI'"),
    ("uniform:3", "time_sampling must be one of"),
])
def test_bad_time_sampling_names_the_rule(rule, match):
    with pytest.raises(ValueError, match=match):
        TimeSampler(FVP(0.9, 2), rule, 1e-5)


def test_bad_preconditioning_is_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        Preconditioned(lambda x, c: x, FVP(0.9, 2), kind="karras")
    with pytest.raises(ValueError, match="sigma_data must be finite and > 0"):
        Preconditioned(lambda x, c: x, FVP(0.9, 2), sigma_data=0)
