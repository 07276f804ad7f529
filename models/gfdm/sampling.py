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

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fracsde.linear import LinearFractionalDynamics
from fracsde.numerics import check_shape
from fracsde.reverse import ReverseTimeSDE, euler_maruyama, sample_innovation
from fracsde.sde import NonFiniteStateError

from . import fast_samplers as fast

__all__ = ["sample", "time_grid", "check_grid", "SAMPLERS", "SAMPLER_INFO", "SamplerInfo", "register_sampler",
           "COORDINATES", "GRIDS"]

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
SAMPLERS: dict[str, Callable] = {}
#: the deterministic samplers (integrate a probability-flow ODE); the others draw noise
DETERMINISTIC: set = set()


@dataclass(frozen=True)
class SamplerInfo:
    """What ``sample`` needs to know of a sampler: how many grid points ``steps`` network evaluations buy, whether
    its last evaluation denoises (it returns the data prediction, not u), the fewest steps it accepts."""

    deterministic: bool = False
    denoises: bool = False
    min_steps: int = 1
    points: Callable[[int], int] = staticmethod(lambda steps: steps + 1)     # Euler-type: one NFE per interval
    steps_for_points: Callable[[int], int] = staticmethod(lambda points: points - 1)


SAMPLER_INFO: dict[str, SamplerInfo] = {}


def register_sampler(name: str, sampler: Callable, deterministic: bool = False, denoises: bool = False,
                     min_steps: int = 1, info: SamplerInfo | None = None) -> Callable:
    """Add ``sampler`` to :data:`SAMPLERS` under ``name`` (refuses to replace an existing one).

    Args:
        name: the method name that :func:`sample` and the CLI's ``--sampler`` take (non-empty).
        sampler: ``sampler(eps_model, dynamics, u, y_newton, ts, *, generator, model_kwargs, progress)``
            integrating from ``ts[0]`` down to ``ts[-1]`` (docs/CONTRIBUTING.md, "A sampler").
        deterministic: the sampler draws no noise (it integrates a probability-flow ODE).
        denoises: the sampler evaluates the network at every grid point and returns the data prediction of the
            last (``steps`` points for ``steps`` evaluations); otherwise it returns (u, ỹ) at the last point
            (``steps + 1`` points).
        min_steps: the fewest network evaluations it accepts (>= 1).
        info: a full ``SamplerInfo`` instead of the three flags above.

    Returns:
        ``sampler`` itself.

    Raises:
        ValueError: an empty name or one already registered. TypeError: ``sampler`` not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"sampler name must be a non-empty string; got {name!r}")
    if name in SAMPLERS:
        raise ValueError(f"a sampler named {name!r} is already registered: {tuple(SAMPLERS)}")
    if not callable(sampler):
        raise TypeError(f"sampler must be callable; got {type(sampler).__name__}")
    if info is None:
        info = SamplerInfo(deterministic, denoises, min_steps,
                           (lambda steps: steps) if denoises else (lambda steps: steps + 1),
                           (lambda points: points) if denoises else (lambda points: points - 1))
    SAMPLERS[name] = sampler
    SAMPLER_INFO[name] = info
    if info.deterministic:
        DETERMINISTIC.add(name)
    return sampler


register_sampler("sde", reverse_sde)
register_sampler("ode", probability_flow_ode, deterministic=True)
register_sampler("ddim", fast.ddim, deterministic=True, denoises=True)
register_sampler("dpm++2m", fast.dpmpp_2m, deterministic=True, denoises=True, min_steps=2)
register_sampler("sde-dpm++2m", fast.sde_dpmpp_2m, denoises=True, min_steps=2)
register_sampler("ancestral", fast.ancestral, denoises=True)
register_sampler("ode-heun", fast.ode_heun, info=SamplerInfo(          # 2 NFE per interval, the last one 1
    deterministic=True, min_steps=1, points=lambda steps: (steps + 1) // 2 + 1,
    steps_for_points=lambda points: 2 * (points - 1) - 1))

GRIDS = ("uniform", "log-snr", "edm")
#: denoising samplers refine down to this log-SNR (EDM's σ_min = 0.002 of the data scale), then denoise
GRID_LOG_SNR_MAX = -2.0 * math.log(0.002)
#: ... and space their log-SNR / EDM grids from this one (s = e^1.5 ≈ 4.5), after one step from T
GRID_LOG_SNR_MIN = -3.0
EDM_RHO = 7.0


def time_grid(dynamics: LinearFractionalDynamics, steps: int, t_end: float, device=None, grid: str = "uniform",
              points: int | None = None, denoise: bool = False) -> torch.Tensor:
    """Decreasing float64 times from T: ``points`` of them (default ``steps + 1``).

    ``grid``: ``"uniform"`` in t (the paper's), ``"log-snr"`` (uniform in λ), ``"edm"`` (Karras et al.'s ρ = 7
    spacing of the noise level s = σ̃/c). The last time is t_end, or — for a sampler whose last evaluation
    denoises (``denoise=True``) — the time where λ = :data:`GRID_LOG_SNR_MAX` (s = 0.002, EDM's σ_min) for every
    dynamics: steps far below the data's scale are wasted (t_end = 1e−3 is λ = 35 for FVP(0.9, 3) but 9 for VP).
    For those samplers the log-SNR and EDM grids also take one step from T to λ = :data:`GRID_LOG_SNR_MIN`
    (s = e^1.5 ≈ 9 σ_data for images) and space the rest below it: exponential integrators are exact where the data
    prediction is constant, i.e. at noise levels far above the data's scale, so steps there are wasted too.
    """
    n = steps + 1 if points is None else points
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS} or a tensor of decreasing times; got {grid!r}")
    T = dynamics.horizon
    if n == 1:
        return torch.tensor([T], dtype=torch.float64, device=device)
    lam_T = dynamics.log_snr_range[0]
    if denoise:
        lam_end = min(GRID_LOG_SNR_MAX, dynamics.log_snr_range[1])
        t_last = float(dynamics.time_at_log_snr(lam_end))
    else:
        lam_end = float(dynamics.log_snr(torch.tensor(t_end, dtype=torch.float64)))
        t_last = t_end
    jump = denoise and grid != "uniform" and lam_T < GRID_LOG_SNR_MIN < lam_end and n > 2
    lam_start = GRID_LOG_SNR_MIN if jump else lam_T
    t_start = float(dynamics.time_at_log_snr(lam_start)) if jump else T
    m = n - 1 if jump else n
    if grid == "uniform":
        ts = torch.linspace(t_start, t_last, m, dtype=torch.float64)
    elif grid == "log-snr":
        ts = dynamics.time_at_log_snr(torch.linspace(lam_start, lam_end, m, dtype=torch.float64)).cpu()
    else:
        s_max, s_min = math.exp(-lam_start / 2), math.exp(-lam_end / 2)
        ramp = torch.linspace(0, 1, m, dtype=torch.float64)
        s = (s_max ** (1 / EDM_RHO) + ramp * (s_min ** (1 / EDM_RHO) - s_max ** (1 / EDM_RHO))) ** EDM_RHO
        ts = dynamics.time_at_log_snr((-2 * torch.log(s)).clamp(lam_start, lam_end)).cpu()
    ts[0], ts[-1] = t_start, t_last
    if jump:
        ts = torch.cat([torch.tensor([T], dtype=torch.float64), ts])
    return ts.to(device)


def check_grid(dynamics: LinearFractionalDynamics, grid) -> torch.Tensor:
    """A user grid: 1-D, at least 2 times, inside (0, T], strictly decreasing (float64)."""
    ts = torch.as_tensor(grid, dtype=torch.float64).detach()
    if ts.dim() != 1 or ts.numel() < 2:
        raise ValueError(f"grid must be a 1-D tensor of at least 2 times; got shape {tuple(ts.shape)}")
    if not bool(torch.isfinite(ts).all()) or not bool(((ts > 0) & (ts <= dynamics.horizon * (1 + 1e-12))).all()):
        raise ValueError(f"grid times must lie in (0, T] with T = {dynamics.horizon:g}; got values in "
                         f"[{float(ts.min())}, {float(ts.max())}]")
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError("grid times must be strictly decreasing (from the prior at T towards 0)")
    return ts


def _check_args(dynamics, shape, steps, method, t_end, coordinates):
    if not isinstance(dynamics, LinearFractionalDynamics):
        raise TypeError(f"dyn must be linear fractional dynamics (FVP, FVE, ...); got {type(dynamics).__name__}")
    shape = check_shape(shape)
    if method not in SAMPLERS:
        raise ValueError(f"method must be one of {tuple(SAMPLERS)} (models.gfdm.SAMPLERS); got {method!r}")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < SAMPLER_INFO[method].min_steps:
            raise ValueError(f"steps must be an integer >= {SAMPLER_INFO[method].min_steps} (network evaluations "
                             f"of method {method!r}); got {steps!r}")
    if coordinates not in COORDINATES:
        raise ValueError(f"coordinates must be one of {COORDINATES}; got {coordinates!r}")
    t_end = float(t_end)
    if not (0.0 < t_end < dynamics.horizon):
        raise ValueError(f"t_end must lie in (0, T) with T = {dynamics.horizon:g}; got {t_end}")
    return shape, t_end


def sampling_grid(dynamics: LinearFractionalDynamics, method: str, steps: int | None, grid, t_end: float,
                  device=None) -> torch.Tensor:
    """The decreasing times a sampler runs on: a named grid for ``steps`` network evaluations, or the user's."""
    info = SAMPLER_INFO[method]
    if isinstance(grid, str):
        if steps is None:
            raise ValueError("steps is required with a named grid")
        return time_grid(dynamics, steps, t_end, device=device, grid=grid, points=info.points(steps),
                         denoise=info.denoises)
    ts = check_grid(dynamics, grid)
    implied = info.steps_for_points(ts.numel())
    if steps is not None and steps != implied:
        raise ValueError(f"a grid of {ts.numel()} times gives {implied} network evaluations with method {method!r}; "
                         f"got steps={steps} (pass steps=None)")
    if implied < info.min_steps:
        raise ValueError(f"method {method!r} needs at least {info.min_steps} network evaluations; the grid gives "
                         f"{implied}")
    return ts.to(device)


def sample(eps_model: Callable, dyn: LinearFractionalDynamics, shape, steps: int | None = 1000,
           method: str = "sde", t_end: float = 1e-3, generator: torch.Generator | None = None, device=None,
           dtype: torch.dtype = torch.float32, model_kwargs: dict | None = None, progress=False,
           init=None, coordinates: str = "innovation", return_augmented: bool = False, grid=None,
           check_finite: bool = True):
    """Draw samples of shape ``shape`` = (batch, *data_shape) from the model defined by ``eps_model``.

    Args:
        eps_model: ``eps_model(u, t, **model_kwargs)``, u of ``shape``, t of shape (batch,).
        dyn: the forward dynamics (FVP/FVE/...); its buffers must be on ``device``.
        steps: number of network evaluations (NFE), ≥ the sampler's minimum (None with a tensor ``grid``).
        method: a name in :data:`SAMPLERS`: ``"sde"`` (Euler–Maruyama, the paper's) and ``"ode"`` (Euler on the
            probability flow) in the stable (u, ỹ) coordinates; ``"ode-heun"``; the u-space exponential
            integrators ``"ddim"``, ``"dpm++2m"``, ``"sde-dpm++2m"``, ``"ancestral"`` (their last evaluation denoises;
            see :mod:`models.gfdm.fast_samplers`).
        t_end: the last time, in (0, T).
        grid: ``"uniform"`` (in t, the paper's), ``"log-snr"``, ``"edm"`` (see :func:`time_grid`) or a tensor of
            strictly decreasing times in (0, T]; default (None): ``"uniform"`` for sde/ode/ode-heun, ``"log-snr"``
            for the denoising u-space samplers.
        init: optional ``(x_T, y_T)`` augmented state at T (y of shape (*shape, K)) instead of a prior draw.
        coordinates: ``"innovation"`` (default) or ``"augmented"`` (plain Euler on (x, y) for sde/ode, unstable for
            K ≥ 3 near t = 0, kept for comparison).
        progress: a progress bar counting network evaluations (True), or an object with ``update(n)`` to advance.
        return_augmented: also return y at the last time (standard basis; not for denoising samplers).
        check_finite: raise ``NonFiniteStateError`` if the result holds NaN/inf (one host sync at the end);
            ``False`` to inspect a diverging sampler (e.g. plain Euler on the augmented state).
    Runs under ``torch.no_grad()``. Streaming: memory independent of ``steps``; no per-step host sync.
    Returns:
        x at the last time, of ``shape`` (and y when ``return_augmented``).
    """
    with torch.no_grad():                     # a sampler never needs the autograd graph of 1000 steps
        x = _sample(eps_model, dyn, shape, steps, method, t_end, generator, device, dtype, model_kwargs,
                    progress, init, coordinates, return_augmented, grid)
    if check_finite:
        _finite(x[0] if return_augmented else x, method, t_end)
    return x


def _sample(eps_model, dyn, shape, steps, method, t_end, generator, device, dtype, model_kwargs, progress, init,
            coordinates, return_augmented, grid):
    shape, t_end = _check_args(dyn, shape, steps, method, t_end, coordinates)
    if not callable(eps_model):
        raise TypeError(f"eps_model must be callable; got {type(eps_model).__name__}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype; got {dtype}")
    info = SAMPLER_INFO[method]
    if info.denoises and (return_augmented or coordinates != "innovation"):
        raise ValueError(f"method {method!r} denoises in u-space: it has no y to return (return_augmented) and no "
                         f"augmented-coordinates form")
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
    if grid is None:
        grid = "log-snr" if info.denoises else "uniform"
    ts = sampling_grid(dyn, method, steps, grid, t_end, device=device)
    if ts[0] != dyn.horizon and init is None:
        raise ValueError(f"a grid that does not start at T = {dyn.horizon:g} needs init (the state at its first time)")
    kw = model_kwargs or {}
    bar = _progress_bar(progress, info.steps_for_points(ts.numel()), method)
    checked = _ShapeChecked(eps_model, shape, bar)
    try:
        if coordinates == "innovation":
            eta_T = dyn.coefficients(ts[0])["eta_newton"].to(dtype)
            u = x - (y_newton * eta_T).sum(-1) if K else x
            u, y_newton = SAMPLERS[method](checked, dyn, u, y_newton, ts, generator=generator, model_kwargs=kw,
                                           progress=False)
            if info.denoises:
                return u
            eta_end = dyn.coefficients(ts[-1])["eta_newton"].to(dtype)
            x = u + (y_newton * eta_end).sum(-1) if K else u
            y = dyn.from_newton(y_newton)
        else:
            if method not in ("sde", "ode"):
                raise ValueError(f"coordinates='augmented' supports method 'sde' or 'ode' only; got {method!r}")
            sde = ReverseTimeSDE(dyn, shape[1:], eps_model=checked, probability_flow=(method == "ode"),
                                 model_kwargs=kw)
            z = euler_maruyama(sde, sde.pack(x, dyn.from_newton(y_newton)), dyn.horizon - ts, generator=generator)
            x, y = sde.unpack(z)
    finally:
        if bar is not None and progress is True:
            bar.close()
    return (x, y) if return_augmented else x


def _finite(x, method, t_end):
    """One host sync at the end of sampling: a sampler that produced NaN/inf says so instead of returning it."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x.reshape(x.shape[0], -1))).any(1).sum())
        raise NonFiniteStateError(f"{method} sampler: the state is not finite at the end of sampling (towards "
                                  f"t_end = {t_end:g}); {bad} of {x.shape[0]} samples hold NaN/inf — check the "
                                  f"eps_model's output (check_finite=False returns them)")
    return x


def _progress_bar(progress, total: int, method: str):
    if progress is True:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=f"gfdm {method}", unit="step", leave=False)
    return progress or None


class _ShapeChecked:
    """Check the model's output shape on the first call only (metadata, no host sync); count evaluations."""

    def __init__(self, model, shape, bar=None):
        self.model, self.shape, self.checked, self.bar = model, tuple(shape), False, bar

    def __call__(self, u, t, **kw):
        out = self.model(u, t, **kw)
        if self.bar is not None:
            self.bar.update(1)
        if not self.checked:
            if tuple(out.shape) != tuple(u.shape):
                raise ValueError(f"eps_model must return a tensor of the input's shape {tuple(u.shape)}; "
                                 f"got {tuple(out.shape)}")
            self.checked = True
        return out
