"""Example fractional SDEs shared by the test files (one definition each, as torchsde's tests/problems.py)."""
import torch

from fracsde import FractionalSDE

F64 = torch.float64


class AdditiveOU(FractionalSDE):
    """Fractional Ornstein–Uhlenbeck dX = −θ X dt + σ dB̂ (θ = 0, σ = 1 gives X = B̂); additive noise."""

    noise_type = "additive"

    def __init__(self, noise, theta=1.0, sigma=0.5, sde_type="ito"):
        super().__init__(noise, sde_type=sde_type)
        self.theta, self.sigma = theta, sigma

    def f(self, t, x):
        return -self.theta * x

    def g(self, t, x):
        return torch.full_like(x, self.sigma).unsqueeze(-1)


class Linear(FractionalSDE):
    """dX = −θX dt + g dB̂ with a g of every noise type (constant or state dependent)."""

    def __init__(self, noise, noise_type="additive", sde_type="ito", m=1, multiplicative=False, theta=1.0):
        super().__init__(noise, noise_type=noise_type, sde_type=sde_type)
        self.m, self.multiplicative, self.theta = m, multiplicative, theta

    def f(self, t, x):
        return -self.theta * x

    def g(self, t, x):
        base = 0.5 * x if self.multiplicative else torch.full_like(x, 0.5)
        if self.noise_type == "diagonal":
            return base
        if self.noise_type == "scalar":
            return base.unsqueeze(-1)
        return base.unsqueeze(-1) * torch.linspace(0.5, 1.0, self.m, dtype=x.dtype)


class FGBM(FractionalSDE):
    """dX = σ X dB̂ (scalar noise), optionally with the Itô-to-Stratonovich drift ½ σ² (Σω)² X."""

    def __init__(self, noise, sigma, sde_type="stratonovich", correction=0.0):
        super().__init__(noise, noise_type="scalar", sde_type=sde_type)
        self.sigma, self.correction = sigma, correction

    def f(self, t, x):
        return self.correction * x

    def g(self, t, x):
        return (self.sigma * x).unsqueeze(-1)


class DiagonalFGBM(FractionalSDE):
    """dX_i = σ_i X_i ∘ dB̂_i, two coordinates with independent MA-fBMs: X_i = exp(σ_i B̂_i) exactly."""
    noise_type = "diagonal"
    sde_type = "stratonovich"
    sigma = torch.tensor([0.5, 1.0], dtype=F64)

    def f(self, t, x):
        return torch.zeros_like(x)

    def g(self, t, x):
        return self.sigma * x


class PlainMAFBM(FractionalSDE):
    """dX = dB̂ in two channels: X = B̂, solved by srk (order 1.5 for additive noise) for the reference."""
    noise_type = "additive"
    sde_type = "ito"

    def f(self, t, x):
        return torch.zeros_like(x)

    def g(self, t, x):
        return torch.eye(2, dtype=x.dtype).expand(x.shape[0], 2, 2)
