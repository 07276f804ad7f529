"""Noise-level-aware ε-models: EDM's preconditioning (Karras et al. 2022) in the u-space of GFDM.

For sampling and training, GFDM(H, K) is a Gaussian diffusion in u = c x₀ + σ̃ ε (docs/gfdm.md). Written in the
x-scale, u/c = x₀ + σ ε with the noise level σ = σ̃/c = e^{−λ/2}. EDM's denoiser D(x; σ) = c_skip x +
c_out F(c_in x, c_noise) with c_in = 1/√(σ² + σ_d²), c_skip = σ_d²/(σ² + σ_d²), c_out = σσ_d/√(σ² + σ_d²),
c_noise = ¼ ln σ = −λ/8, turned into an ε-prediction ε = (x − D)/σ, is

    ε_θ(u, t) = c_in (σ x_in − σ_d F(x_in, c_noise)),      x_in = c_in u/c = u/√(c²σ_d² + σ̃²),

so the network's input has unit variance at every noise level (for data of std σ_d), its conditioning depends on
λ alone, and its target F* = (x₀ − c_skip u/c)/c_out has unit variance too. EDM's loss weight
(σ² + σ_d²)/(σσ_d)² on ‖D − x₀‖² is the weight w = (σ² + σ_d²)/σ_d² on ‖ε_θ − ε‖²: the unit-weight MSE of F
(:meth:`Preconditioned.loss_weight`, applied by :func:`models.gfdm.score_matching_loss`).

``kind="none"`` is today's behaviour: ``net(u, t)`` returns ε directly, weight 1.
"""
from __future__ import annotations

import torch
from torch import nn

from fracsde import _validation as V
from fracsde.linear import LinearFractionalDynamics

__all__ = ["Preconditioned", "PRECONDITIONINGS", "make_eps_model"]

PRECONDITIONINGS = ("none", "edm")


class Preconditioned(nn.Module):
    """Wrap a raw network ``net(x_in, c_noise, **kw)`` into an ε-model ``eps_model(u, t, **kw)`` for any sampler.

    Args:
        net: the network; called with x_in of the data's shape and c_noise of shape (batch,).
        dynamics: the forward dynamics (its c, σ̃, λ define the scalings).
        kind: ``"edm"`` (see the module docstring) or ``"none"`` (x_in = u, c_noise = t, output = ε).
        sigma_data: σ_d, the data's standard deviation (0.5 for images in [−1, 1], as EDM).
    """

    def __init__(self, net: nn.Module, dynamics: LinearFractionalDynamics, kind: str = "edm",
                 sigma_data: float = 0.5):
        super().__init__()
        V.check_choice(kind, "kind", PRECONDITIONINGS)
        if not isinstance(dynamics, LinearFractionalDynamics):
            raise TypeError(f"dynamics must be linear fractional dynamics (FVP, FVE, ...); got "
                            f"{type(dynamics).__name__}")
        self.net, self.kind = net, kind
        self.sigma_data = V.check_positive_float(sigma_data, "sigma_data")
        self.dynamics = dynamics           # not a submodule: its buffers belong to the caller's dynamics

    def scalings(self, t: torch.Tensor) -> dict:
        """c_in (on u), the noise level σ = σ̃/c and c_noise = −λ/8 at times t (float64, t's shape).

        Times outside (0, T] or NaN are refused as :meth:`~fracsde.linear.LinearFractionalDynamics.marginal`
        refuses them — for times on the CPU; on an accelerator the check would cost a host synchronisation per
        network call (training and sampling loops), so it is left to the caller there."""
        t = torch.as_tensor(t)
        if t.device.type == "cpu":
            t = self.dynamics.check_times(t)
        t64 = t.to(torch.float64)
        c = self.dynamics.mean_coefficient(t64)
        sigma_tilde = self.dynamics.conditional_std(t64)
        sigma = sigma_tilde / c
        c_in = 1.0 / torch.sqrt(sigma * sigma + self.sigma_data ** 2)
        return {"c": c, "sigma": sigma, "c_in": c_in, "c_noise": -self.dynamics.log_snr(t64, check=False) / 8.0}

    def forward(self, u: torch.Tensor, t: torch.Tensor, **kw) -> torch.Tensor:
        if self.kind == "none":
            return self.net(u, t, **kw)
        s = self.scalings(t)
        view = (-1,) + (1,) * (u.dim() - 1)
        c_in_u = (s["c_in"] / s["c"]).to(u.dtype).view(view)
        x_in = u * c_in_u
        F = self.net(x_in, s["c_noise"].to(u.dtype), **kw)
        c_in = s["c_in"].to(u.dtype).view(view)
        return c_in * (s["sigma"].to(u.dtype).view(view) * x_in - self.sigma_data * F)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weight of ‖ε_θ − ε‖² (shape of t, float64): (σ² + σ_d²)/σ_d² for EDM, 1 otherwise."""
        if self.kind == "none":
            return torch.ones_like(t, dtype=torch.float64)
        sigma = self.scalings(t)["sigma"]
        return (sigma * sigma + self.sigma_data ** 2) / self.sigma_data ** 2

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, sigma_data={self.sigma_data:g}"


def make_eps_model(net: nn.Module, dynamics: LinearFractionalDynamics, kind: str = "none",
                   sigma_data: float = 0.5) -> nn.Module:
    """``net`` itself for ``kind="none"`` (today's ε-network, unchanged), else ``Preconditioned(net, ...)``."""
    V.check_choice(kind, "precondition", PRECONDITIONINGS)
    return net if kind == "none" else Preconditioned(net, dynamics, kind, sigma_data)
