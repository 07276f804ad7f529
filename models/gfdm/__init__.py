"""Generative fractional diffusion models (Nobis et al., NeurIPS 2024) on top of fracsde.

The core (this package's public API, used by the image pipeline in ``train``/``generate``/``cli``):

    from models.gfdm import FVP, FVE, DynamicsSpec, score_matching_loss, sample, nll_bits_per_dim
    dyn = FVP(hurst=0.9, num_processes=3)
    loss = score_matching_loss(eps_model, dyn, x0)
    x = sample(eps_model, dyn, (64, 3, 32, 32), steps=1000, method="sde")

See docs/gfdm.md for the maths, the numerics near t = 0 and the 2-D study (``models/gfdm/study2d.py``).
"""
from .dynamics import FVE, FVP
from .gaussian import GaussianEpsModel, GaussianMixtureEpsModel, gaussian_loss_minimum
from .likelihood import nll_bits_per_dim
from .loss import score_matching_loss
from .precondition import Preconditioned
from .sampling import SAMPLERS, register_sampler, sample
from .spec import DynamicsSpec

__all__ = ["FVP", "FVE", "DynamicsSpec", "score_matching_loss", "Preconditioned", "sample", "SAMPLERS",
           "register_sampler", "nll_bits_per_dim", "GaussianEpsModel", "GaussianMixtureEpsModel",
           "gaussian_loss_minimum"]
