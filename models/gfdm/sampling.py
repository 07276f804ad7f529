"""Sampling from a GFDM ε-model by the reverse-time SDE or the probability-flow ODE.

``sample(eps_model, dyn, shape, steps, method)`` starts from the terminal law N(0, Σ_T) (or from a given
augmented state), integrates from T down to ``t_end`` on a uniform grid (GFDM's choice), and returns the
x-component there. Any callable ``eps_model(u, t)`` works, e.g. the exact Gaussian model of
:mod:`models.gfdm.gaussian`. Streaming: O(1) memory in ``steps``, noise drawn per step on the device.

Samplers are registered in :data:`SAMPLERS` (name → function); ``sample(..., method=NAME)`` and the CLI take
their names from it. Every sampler has the signature

    sampler(eps_model, dynamics, u, y_newton, ts, *, generator=None, model_kwargs=None, progress=False)
        -> (u, y_newton)

in the innovation coordinates u = x − ηᵀy, ỹ = N y (see :mod:`fracsde.reverse`), integrating over the
decreasing times ``ts`` with ``len(ts) − 1`` network evaluations. To add one, write such a function and
register it with :func:`register_sampler`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from fracsde.linear import LinearFractionalDynamics
from fracsde.numerics import check_shape
from fracsde.reverse import ReverseTimeSDE, euler_maruyama, sample_innovation

__all__ = ["sample", "time_grid", "SAMPLERS", "register_sampler", "COORDINATES"]

COORDINATES = ("innovation", "augmented")


def reverse_sde(eps_model, dynamics, u, y_newton, ts, *, generator=None, model_kwargs=None, progress=False):
    """Euler–Maruyama on the reverse-time SDE (GFDM's sampler), stable innovation coordinates."""
    return sample_innovation(dynamics, eps_model, u, y_newton, ts, method="sde", generator=generator,
                             model_kwargs=model_kwargs, progress=progress)


def probability_flow_ode(eps_model, dynamics, u, y_newton, ts, *, generator=None, model_kwargs=None,
                         progress=False):
    """Euler on the probability-flow ODE (deterministic), stable innovation coordinates."""
    return sample_innovation(dynamics, eps_model, u, y_newton, ts, method="ode", generator=generator,
                             model_kwargs=model_kwargs, progress=progress)


#: name → sampler (see the module docstring for the shared signature)
SAMPLERS: dict[str, Callable] = {"sde": reverse_sde, "ode": probability_flow_ode}
#: the deterministic samplers (integrate the probability-flow ODE); the others draw noise
DETERMINISTIC = {"ode"}


def register_sampler(name: str, sampler: Callable, deterministic: bool = False) -> Callable:
    """Add ``sampler`` to :data:`SAMPLERS` under ``name`` (refuses to replace an existing one)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"sampler name must be a non-empty string; got {name!r}")
    if name in SAMPLERS:
        raise ValueError(f"a sampler named {name!r} is already registered: {tuple(SAMPLERS)}")
    if not callable(sampler):
        raise TypeError(f"sampler must be callable; got {type(sampler).__name__}")
    SAMPLERS[name] = sampler
    if deterministic:
        DETERMINISTIC.add(name)
    return sampler


def time_grid(dynamics: LinearFractionalDynamics, steps: int, t_end: float, device=None) -> torch.Tensor:
    """steps + 1 decreasing float64 times, uniform from T to t_end."""
    return torch.linspace(dynamics.horizon, t_end, steps + 1, dtype=torch.float64, device=device)


def _check_args(dynamics, shape, steps, method, t_end, coordinates):
    if not isinstance(dynamics, LinearFractionalDynamics):
        raise TypeError(f"dyn must be linear fractional dynamics (FVP, FVE, ...); got {type(dynamics).__name__}")
    shape = check_shape(shape)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
    if method not in SAMPLERS:
        raise ValueError(f"method must be one of {tuple(SAMPLERS)} (models.gfdm.SAMPLERS); got {method!r}")
    if coordinates not in COORDINATES:
        raise ValueError(f"coordinates must be one of {COORDINATES}; got {coordinates!r}")
    t_end = float(t_end)
    if not (0.0 < t_end < dynamics.horizon):
        raise ValueError(f"t_end must lie in (0, T) with T = {dynamics.horizon:g}; got {t_end}")
    return shape, t_end


def sample(eps_model: Callable, dyn: LinearFractionalDynamics, shape, steps: int = 1000, method: str = "sde",
           t_end: float = 1e-3, generator: Optional[torch.Generator] = None, device=None,
           dtype: torch.dtype = torch.float32, model_kwargs: Optional[dict] = None, progress: bool = False,
           init=None, coordinates: str = "innovation", return_augmented: bool = False):
    """Draw samples of shape ``shape`` = (batch, *data_shape) from the model defined by ``eps_model``.

    Args:
        eps_model: ``eps_model(u, t, **model_kwargs)``, u of ``shape``, t of shape (batch,).
        dyn: the forward dynamics (FVP/FVE/...); its buffers must be on ``device``.
        steps: number of Euler(–Maruyama) steps (= network evaluations), ≥ 1.
        method: ``"sde"`` (reverse SDE) or ``"ode"`` (probability-flow ODE).
        t_end: the last time, in (0, T).
        init: optional ``(x_T, y_T)`` augmented state at T (y of shape (*shape, K)) instead of a prior draw.
        coordinates: ``"innovation"`` (default; the stable (u, ỹ) scheme of :func:`fracsde.reverse.sample_innovation`)
            or ``"augmented"`` (plain Euler on (x, y), :class:`fracsde.reverse.ReverseTimeSDE`; unstable for
            K ≥ 3 near t = 0, kept for comparison).
        return_augmented: also return y at t_end (standard basis).
    Runs under ``torch.no_grad()`` (use :func:`fracsde.reverse.sample_innovation` to differentiate through it).
    Returns:
        x at t_end, of ``shape`` (and y when ``return_augmented``).
    """
    with torch.no_grad():                     # a sampler never needs the autograd graph of 1000 steps
        return _sample(eps_model, dyn, shape, steps, method, t_end, generator, device, dtype, model_kwargs,
                       progress, init, coordinates, return_augmented)


def _sample(eps_model, dyn, shape, steps, method, t_end, generator, device, dtype, model_kwargs, progress, init,
            coordinates, return_augmented):
    shape, t_end = _check_args(dyn, shape, steps, method, t_end, coordinates)
    if not callable(eps_model):
        raise TypeError(f"eps_model must be callable; got {type(eps_model).__name__}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype; got {dtype}")
    buf_device = dyn.gammas.device
    device = torch.device(device) if device is not None else buf_device
    if device.type != buf_device.type or (device.index is not None and buf_device.index is not None
                                          and device.index != buf_device.index):
        raise ValueError(f"the dynamics' buffers are on {buf_device} but device={device}; call dyn.to({device!s})")
    K = dyn.num_processes
    if init is None:
        x, y_newton = dyn.prior_sample(shape, generator=generator, device=device, dtype=dtype, return_newton=True)
    else:
        x, y = init
        if tuple(x.shape) != shape or tuple(y.shape) != shape + (K,):
            raise ValueError(f"init must be (x, y) of shapes {shape} and {shape + (K,)}; "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        x, y_newton = x.to(device=device, dtype=dtype), dyn.to_newton(y.to(device=device, dtype=dtype))
    ts = time_grid(dyn, steps, t_end, device=device)
    kw = model_kwargs or {}
    checked = _ShapeChecked(eps_model, shape)
    if coordinates == "innovation":
        eta_T = dyn.coefficients(ts[0])["eta_newton"].to(dtype)
        u = x - (y_newton * eta_T).sum(-1) if K else x
        u, y_newton = SAMPLERS[method](checked, dyn, u, y_newton, ts, generator=generator, model_kwargs=kw,
                                       progress=progress)
        eta_end = dyn.coefficients(ts[-1])["eta_newton"].to(dtype)
        x = u + (y_newton * eta_end).sum(-1) if K else u
        y = dyn.from_newton(y_newton)
    else:
        if method not in ("sde", "ode"):
            raise ValueError(f"coordinates='augmented' supports method 'sde' or 'ode' only; got {method!r}")
        sde = ReverseTimeSDE(dyn, shape[1:], eps_model=checked, probability_flow=(method == "ode"),
                             model_kwargs=kw)
        z = euler_maruyama(sde, sde.pack(x, dyn.from_newton(y_newton)), dyn.horizon - ts, generator=generator,
                           progress=progress)
        x, y = sde.unpack(z)
    return (x, y) if return_augmented else x


class _ShapeChecked:
    """Check the model's output shape on the first call only (metadata, no host sync)."""

    def __init__(self, model, shape):
        self.model, self.shape, self.checked = model, tuple(shape), False

    def __call__(self, u, t, **kw):
        out = self.model(u, t, **kw)
        if not self.checked:
            if tuple(out.shape) != tuple(u.shape):
                raise ValueError(f"eps_model must return a tensor of the input's shape {tuple(u.shape)}; "
                                 f"got {tuple(out.shape)}")
            self.checked = True
        return out
