"""The augmented denoising score-matching loss of GFDM.

Given x_0 and t, Z_t = (X_t, Y_t) is Gaussian and u = X_t − η_tᵀY_t = c x_0 + (ξ_X − ηᵀξ_Y) where the
residual ξ_X − ηᵀξ_Y ~ N(0, σ̃²) is independent of Y_t. The score of the augmented state is fixed by ε(u, t)
(∇_x log p = −ε/σ̃, the y-part follows in closed form), so matching the augmented score with the weighting
σ̃² is exactly  E ‖ε_θ(c x_0 + σ̃ ε, t) − ε‖².  We draw the residual directly as σ̃ ε instead of drawing
the (K+1)-dimensional ξ and subtracting ηᵀξ_Y: same law of (u, target), no cancellation, and the cost of a
plain VP/VE training step.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from fracsde.linear import LinearFractionalDynamics

from .time_sampling import time_sampler

__all__ = ["score_matching_loss", "perturb", "check_data", "check_t_eps"]


def check_data(x0, finite: bool = True) -> None:
    """Require a floating-point data batch ``(batch, *data_shape)`` with batch ≥ 1, and (``finite``) no NaN or
    infinity in it — one reduction and one host synchronisation."""
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating-point tensor of shape (batch, *data_shape); got {type(x0).__name__}"
                        + (f" of dtype {x0.dtype}" if isinstance(x0, torch.Tensor) else ""))
    if x0.dim() < 1 or x0.shape[0] < 1:
        raise ValueError(f"x0 must have shape (batch, *data_shape) with batch >= 1; got {tuple(x0.shape)}")
    if finite and not bool(torch.isfinite(x0).all()):
        bad = int((~torch.isfinite(x0)).reshape(x0.shape[0], -1).any(1).sum())
        raise ValueError(f"x0 must be finite; {bad} of its {x0.shape[0]} samples hold NaN or infinity")


def check_t_eps(t_eps: float, horizon: float) -> float:
    """Require the smallest training/likelihood time inside (0, T)."""
    t_eps = float(t_eps)
    if not (0.0 < t_eps < horizon):
        raise ValueError(f"t_eps must lie in (0, T) with T = {horizon:g}; got {t_eps}")
    return t_eps


def perturb(dynamics: LinearFractionalDynamics, x0: torch.Tensor, t: torch.Tensor,
            generator: torch.Generator | None = None):
    """(u, ε): u = c(t) x_0 + σ̃(t) ε with ε ~ N(0, I), for t of shape (batch,)."""
    view = (-1,) + (1,) * (x0.dim() - 1)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    c = dynamics.mean_coefficient(t.to(torch.float64)).to(x0.dtype).view(view)
    sigma = dynamics.conditional_std(t.to(torch.float64)).to(x0.dtype).view(view)
    return c * x0 + sigma * eps, eps


def score_matching_loss(eps_model: Callable, dynamics: LinearFractionalDynamics, x0: torch.Tensor,
                        t_eps: float = 1e-5, generator: torch.Generator | None = None,
                        model_kwargs: dict | None = None, reduction: str = "mean",
                        time_sampling="uniform", check_finite: bool = True) -> torch.Tensor:
    """Mean (over batch and coordinates) of w(t)‖ε_θ(u, t) − ε‖², t ~ ``time_sampling``, u = c x_0 + σ̃ ε.

    ``eps_model(u, t, **model_kwargs)`` gets u of x0's shape and t of shape (batch,) in x0's dtype. If it has a
    ``loss_weight(t)`` method (:class:`models.gfdm.Preconditioned`), w(t) is that, else 1.
    ``time_sampling``: ``"uniform"`` (t ~ U(t_eps, T), the paper's; default), ``"log-snr[:LO,HI]"``, ``"edm"``,
    ``"like:SPEC"`` or a :class:`models.gfdm.time_sampling.TimeSampler` — see that module for the λ-weighting
    each one optimises. Times whose noise σ̃ would be rounded away in x0's dtype are never drawn.
    ``reduction="none"`` returns the per-sample loss (batch,). ``check_finite``: refuse an x0 holding NaN or
    infinity (one host synchronisation; the training loop, whose 8-bit images are finite by construction,
    turns it off and then has no host synchronisation here).

    Args:
        eps_model: the ε-network, called as ``eps_model(u, t, **model_kwargs)``.
        dynamics: an FVP/FVE (any :class:`fracsde.LinearFractionalDynamics`).
        x0: (batch, *shape) clean data.
        t_eps: smallest training time, in (0, T).
        generator: for t and the noise.
        model_kwargs: extra arguments of the network (e.g. class labels).
        reduction: ``"mean"`` or ``"none"``.
        time_sampling: the training-time law (see above).
        check_finite: refuse non-finite x0 (and name a non-finite network output).

    Returns:
        The loss: a 0-d tensor, or (batch,) with ``reduction="none"``.

    Raises:
        ValueError: bad t_eps, reduction or time law; non-finite x0 or network output.
    """
    check_data(x0, finite=check_finite)
    t_eps = check_t_eps(t_eps, dynamics.horizon)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none'; got {reduction!r}")
    sampler = time_sampler(dynamics, time_sampling, t_eps, x0.dtype)
    t = sampler(x0.shape[0], generator, x0.device)
    u, eps = perturb(dynamics, x0, t, generator)
    pred = eps_model(u, t.to(x0.dtype), **(model_kwargs or {}))
    if pred.shape != x0.shape:
        raise ValueError(f"eps_model must return a tensor of the data's shape {tuple(x0.shape)}; "
                         f"got {tuple(pred.shape)}")
    if check_finite and not bool(torch.isfinite(pred).all()):
        bad = int((~torch.isfinite(pred)).reshape(pred.shape[0], -1).any(1).sum())
        raise ValueError(f"eps_model returned NaN or infinity for {bad} of {pred.shape[0]} samples (its output, "
                         f"not the data, is non-finite: check the model's weights and inputs)")
    err = (pred - eps).pow(2)
    weight = getattr(eps_model, "loss_weight", None)
    if weight is None and reduction == "mean":
        return err.mean()
    per_sample = err.reshape(err.shape[0], -1).mean(1)
    if weight is not None:
        per_sample = per_sample * weight(t).to(per_sample.dtype)
    return per_sample if reduction == "none" else per_sample.mean()
