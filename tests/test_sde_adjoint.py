"""Gradients through fracsde.sdeint: adjoint vs backprop on one Brownian path, dL/dH vs finite differences."""
import pytest
import torch

from fracsde.markov import MarkovApproxFBM
from fracsde.sde import FractionalSDE, sdeint
from problems import AdditiveOU

F64 = torch.float64




class Model(FractionalSDE):
    """Drift and diffusion with parameters, for every noise type; m = 2 where m is free."""

    def __init__(self, noise, noise_type, sde_type):
        super().__init__(noise, noise_type=noise_type, sde_type=sde_type)
        self.theta = torch.nn.Parameter(torch.tensor(1.2, dtype=F64))
        self.scale = torch.nn.Parameter(torch.tensor(0.6, dtype=F64))

    def f(self, t, x):
        return -self.theta * x + torch.sin(t)

    def g(self, t, x):
        if self.noise_type == "additive":
            return (self.scale * torch.tensor([[1.0, 0.3], [0.2, 0.8]], dtype=F64)).expand(x.shape[0], 2, 2)
        g = self.scale * torch.cos(x)
        if self.noise_type == "diagonal":
            return g
        if self.noise_type == "scalar":
            return g.unsqueeze(-1)
        return g.unsqueeze(-1) * torch.tensor([0.5, 1.0], dtype=F64)


class Posterior(Model):
    def control(self, t, x, y):
        return self.theta * torch.tanh(y.sum(-1)) - x.mean(-1, keepdim=True)


def gradients(sde, method, steps, adjoint, adjoint_method=None, controlled=False):
    torch.manual_seed(0)
    x0 = torch.randn(16, 2, dtype=F64, requires_grad=True)
    ts = torch.linspace(0, 0.5, 3, dtype=F64)
    out = sdeint(sde, x0, ts, method=method, dt=0.5 / steps, entropy=7, adjoint=adjoint,
                 adjoint_method=adjoint_method, return_kl=controlled)
    if controlled:
        xs, kl = out
        loss = (xs ** 2).mean() + xs[1].mean() + kl[-1].mean()
    else:
        xs = out
        loss = (xs ** 2).mean() + xs[1].mean()
    grads = torch.autograd.grad(loss, [x0] + list(sde.parameters()))
    return torch.cat([g.flatten() for g in grads])


# every (noise type, forward method, adjoint method) torchsde's adjoint supports after augmentation
CASES = [
    ("additive", "ito", "euler", "euler"),
    ("additive", "ito", "srk", "euler"),
    ("additive", "stratonovich", "midpoint", "midpoint"),
    ("additive", "stratonovich", "heun", "heun"),
    ("additive", "stratonovich", "euler_heun", "euler_heun"),
    ("scalar", "ito", "euler", "euler"),
    ("scalar", "ito", "milstein", "euler"),
    ("scalar", "stratonovich", "midpoint", "midpoint"),
    ("scalar", "stratonovich", "heun", "heun"),
    ("scalar", "stratonovich", "euler_heun", "euler_heun"),
    ("general", "ito", "euler", "euler"),
    ("general", "stratonovich", "midpoint", "midpoint"),
    ("general", "stratonovich", "heun", "heun"),
    ("diagonal", "stratonovich", "euler_heun", "euler_heun"),
    ("diagonal", "stratonovich", "log_ode", "midpoint"),
]


@pytest.mark.parametrize("noise_type,sde_type,method,adjoint_method", CASES)
def test_adjoint_agrees_with_backprop_within_discretisation_error(noise_type, sde_type, method, adjoint_method):
    """The adjoint solves a different discretisation (of the adjoint SDE) than backprop differentiates,
    so they differ by the discretisation error: small, and shrinking as dt shrinks (8× here: at least
    2.8× for order 0.5, measured 9–2800×). Gradients w.r.t. x0, θ, the diffusion scale and H."""
    noise = MarkovApproxFBM(0.7, num_processes=3, gamma_max=4.0, learnable_hurst=True)
    sde = Model(noise, noise_type, sde_type)
    errors = []
    for steps in (16, 128):
        exact = gradients(sde, method, steps, adjoint=False)
        adj = gradients(sde, method, steps, adjoint=True, adjoint_method=adjoint_method)
        errors.append(float((adj - exact).abs().max() / exact.abs().max()))
    assert errors[0] < 0.1 and errors[1] < errors[0] / 2.5, errors


@pytest.mark.parametrize("noise_type", ["additive", "scalar", "general", "diagonal"])
def test_reversible_heun_adjoint_is_exact(noise_type):
    """Reversible Heun's adjoint reconstructs the forward steps algebraically: float64 round-off only
    (dt = 2^-6 divides the output spacing exactly, so the backward pass steps on the forward grid)."""
    noise = MarkovApproxFBM(0.7, num_processes=3, gamma_max=4.0, learnable_hurst=True)
    sde = Model(noise, noise_type, "stratonovich")
    exact = gradients(sde, "reversible_heun", 32, adjoint=False)
    adj = gradients(sde, "reversible_heun", 32, adjoint=True)
    torch.testing.assert_close(adj, exact, rtol=1e-6, atol=1e-6 * float(exact.abs().max()))


@pytest.mark.parametrize("noise_type,tol", [("additive", 1e-3), ("general", 1e-2)])
def test_adjoint_checkpoints_keep_default_gamma_max_usable(noise_type, tol):
    """γ_max = 20 (the default) over T = 1: rebuilding the OU states backwards amplifies errors by up
    to e^{20}; without checkpoints the adjoint gradient is useless (measured relative errors 2e3 and
    1e144), with them it is back to the discretisation error (measured 2e-5 additive, 2e-3 general)."""
    noise = MarkovApproxFBM(0.7, num_processes=3, gamma_max=20.0, learnable_hurst=True)
    sde = Model(noise, noise_type, "stratonovich")

    def grads(adjoint, checkpoints):
        torch.manual_seed(0)
        x0 = torch.randn(16, 2, dtype=F64, requires_grad=True)
        xs = sdeint(sde, x0, torch.tensor([0.0, 1.0], dtype=F64), method="midpoint", dt=2 ** -7, entropy=7,
                    adjoint=adjoint, adjoint_checkpoints=checkpoints)
        return torch.cat([g.flatten() for g in torch.autograd.grad((xs[-1] ** 2).mean(),
                                                                   [x0] + list(sde.parameters()))])

    exact = grads(False, True)
    scale = float(exact.abs().max())
    assert float((grads(True, True) - exact).abs().max()) < tol * scale
    without = float((grads(True, False) - exact).abs().max())
    assert not without <= scale  # also fails on a NaN


def test_adjoint_through_controlled_posterior_and_kl():
    noise = MarkovApproxFBM(0.7, num_processes=2, gamma_max=4.0, learnable_hurst=True)
    sde = Posterior(noise, "general", "stratonovich")
    exact = gradients(sde, "reversible_heun", 32, adjoint=False, controlled=True)
    adj = gradients(sde, "reversible_heun", 32, adjoint=True, controlled=True)
    torch.testing.assert_close(adj, exact, rtol=1e-6, atol=1e-6 * float(exact.abs().max()))


# ----------------------------------------------------------------------------- dL/dH
def loss_at(hurst, kind, learnable, method="midpoint", adjoint=False):
    noise = MarkovApproxFBM(hurst, num_processes=3, gamma_max=4.0, kind=kind, learnable_hurst=learnable)
    ts = torch.linspace(0, 1, 5, dtype=F64)
    # common random numbers: one generator seed draws the same W (entropy) and type I start for every H
    xs = sdeint(AdditiveOU(noise, theta=1.0, sigma=0.7, sde_type="stratonovich"), torch.ones(64, 1, dtype=F64), ts,
                method=method, dt=2 ** -6, adjoint=adjoint,
                generator=torch.Generator().manual_seed(4))
    return (xs[-1] ** 2).mean() + xs[2].mean(), noise


@pytest.mark.parametrize("kind", ["type1", "type2"])
@pytest.mark.parametrize("method,adjoint,rtol", [
    ("midpoint", False, 1e-6),        # backprop: the exact derivative of the discrete map
    ("reversible_heun", True, 1e-6),  # algebraically reversible adjoint: exact too
    ("midpoint", True, 5e-3),         # continuous adjoint: O(dt) discretisation error (measured 4e-4)
])
def test_hurst_gradient_matches_finite_differences(kind, method, adjoint, rtol):
    h, eps = 0.65, 1e-5
    loss, noise = loss_at(h, kind, True, method, adjoint)
    (grad_logit,) = torch.autograd.grad(loss, [noise.hurst_logit])
    grad_h = grad_logit / (h * (1 - h))  # H = sigmoid(logit): dH/dlogit = H(1 − H)
    fd = (loss_at(h + eps, kind, False, method)[0] - loss_at(h - eps, kind, False, method)[0]) / (2 * eps)
    assert abs(float(fd)) > 1e-3  # a gradient worth checking
    torch.testing.assert_close(grad_h, fd.detach(), rtol=rtol, atol=0)
