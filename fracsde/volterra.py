"""Lifted Volterra SDEs: X_t = X_0 + ∫_0^t K̂(t−s) b(s, X_s) ds + ∫_0^t K̂(t−s) σ(s, X_s) dW_s.

With the kernel of a Markov noise, K̂(t) = Σ_k ω_k e^{−γ_k t} (for :class:`fracsde.MarkovApproxFBM` the Markov
approximation of t^{H−½}/Γ(H+½)), the equation lifts to K factors (Abi Jaber & El Euch 2019):

    X_t = X_0 + Σ_k ω_k U^k_t,      dU^k = (−γ_k U^k + b(t, X)) dt + σ(t, X) dW_t,   U^k_0 = 0.

:func:`volterra_sdeint` steps the factors with the exponential scheme — b and σ frozen at the left point, the
factors' decay and their Gaussian increments ∫ e^{−γ_k(t_{n+1}−s)} dW_s drawn exactly and jointly with ΔW — so it
is stable at any rate and step (the optimal rules' rates reach 1e27). With b = 0 and σ = 1, X − X_0 is exactly the
noise's B̂. The rough Heston variance (``models.roughvol``) is such an equation with a square-root diffusion.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import _validation as V
from .noise import REDUCED_PRECISION_CANCELLATION, MarkovNoise, step_covariance
from .numerics import graded_psd_factor, step_key

__all__ = ["VolterraSDE", "volterra_sdeint", "volterra_blocks"]


class VolterraSDE(nn.Module):
    """Base class of Volterra SDEs with the kernel of a Markov noise (see the module docstring).

    Subclasses define ``b(t, x)`` and ``sigma(t, x)`` for states ``x`` of shape ``(batch, d)``, each returning
    ``(batch, d)``: coordinate i is driven by its own Brownian motion W^i (diagonal noise). ``t`` is a float.
    For a diffusion that must stay real, e.g. ν√V, write it with ``x.clamp(min=0)``: the discrete scheme can step
    below 0, and the truncated coefficients are what is solved (the continuous square-root process stays ≥ 0).

    Args:
        noise: any :class:`fracsde.MarkovNoise`; its rates and weights give K̂ (type II read-out: the factors
            start at 0).

    Example:
        >>> class Additive(VolterraSDE):
        ...     def b(self, t, x): return torch.zeros_like(x)
        ...     def sigma(self, t, x): return torch.ones_like(x)
        >>> sde = Additive(MarkovApproxFBM(0.1, 8, rates="optimal"))
        >>> xs = volterra_sdeint(sde, torch.zeros(4, 1), torch.linspace(0, 1, 11))   # (11, 4, 1): xs = B̂
    """

    def __init__(self, noise: MarkovNoise):
        super().__init__()
        if not isinstance(noise, MarkovNoise):
            raise TypeError(f"noise must be a fracsde.MarkovNoise (e.g. MarkovApproxFBM); got {type(noise).__name__}")
        self.noise = noise

    def b(self, t, x):
        raise NotImplementedError(f"{type(self).__name__} must define the drift b(t, x)")

    def sigma(self, t, x):
        raise NotImplementedError(f"{type(self).__name__} must define the diffusion sigma(t, x)")


def _step_operators(gammas: torch.Tensor, h: float, dtype, device):
    """For a step h: decay e^{−γh} (K,), drift factors (1 − e^{−γh})/γ (K,), and the factor L (K+1, K+1) of the
    joint covariance of (ξ_1..ξ_K, ΔW) (float64 in, ``dtype`` out)."""
    g = gammas.to(torch.float64)
    decay = torch.exp(-g * h)
    drift = -torch.expm1(-g * h) / g
    L = graded_psd_factor(step_covariance(torch.cat([g, g.new_zeros(1)]), h))
    return tuple(v.to(dtype=dtype, device=device) for v in (decay, drift, L))


def _check_coefficients(bx, sx, x) -> None:
    """b and σ must return tensors of the state's shape (batch, d): a clear error naming the user's function."""
    for name, value in (("b(t, x)", bx), ("sigma(t, x)", sx)):
        if not isinstance(value, torch.Tensor) or value.shape != x.shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"the VolterraSDE's {name} must return a tensor of the state's shape {tuple(x.shape)} "
                             f"(batch, d); got {got}")


def _grid(ts: torch.Tensor, dt: float | None):
    """(steps per interval, step of each interval): ⌈Δt/dt⌉ equal steps per output interval (1 when dt is None)."""
    spans = torch.diff(ts).tolist()
    if dt is None:
        return [1] * len(spans), spans
    counts = [max(1, math.ceil(s / dt - 1e-9)) for s in spans]
    return counts, [s / n for s, n in zip(spans, counts, strict=True)]


def volterra_sdeint(sde: VolterraSDE, x0: torch.Tensor, ts, dt: float | None = None,
                    generator: torch.Generator | None = None, return_brownian: bool = False,
                    check_finite: bool = True):
    """Solve the lifted Volterra SDE by the exponential scheme on the grid ``ts``.

    Args:
        sde: a :class:`VolterraSDE`.
        x0: ``(batch, d)`` initial state, float32 or float64 (the solve runs in its dtype; the factors' increments
            in float64 where the weights cancel too much for float32, see :func:`fracsde.MarkovNoise.sample`).
        ts: strictly increasing output times starting at the origin of the kernel (ts[0] is time 0 of the equation).
        dt: largest step; each output interval is split into ⌈Δt/dt⌉ equal steps. ``None``: step on ``ts``.
        generator: a ``torch.Generator`` for the normals (the global RNG without one).
        return_brownian: also return the driving Brownian motions W on ``ts``, ``(len(ts), batch, d)`` (W = 0 at
            ts[0]): a model reads them to drive a correlated process, e.g. a spot price with
            dB = ρ dW + √(1 − ρ²) dW⊥.
        check_finite: raise ``FloatingPointError`` naming the output interval where the solution first became
            NaN/inf (one host sync, after the solve).

    Returns:
        ``xs`` of shape ``(len(ts), batch, d)``, or ``(xs, w)`` with ``return_brownian``.

    Gradients flow by backpropagation through b, σ and the weights (a learnable H); memory grows with the steps
    (:func:`volterra_blocks` streams the same solution in time blocks instead).
    """
    ts, outputs = _solve(sde, x0, ts, dt, generator)
    xs, ws = [x0], [x0.new_zeros(x0.shape)]
    for _, x, w in outputs:
        xs.append(x)
        ws.append(w)
    out = torch.stack(xs)
    if check_finite:                                   # one host sync for the whole solve
        _check_finite(out, ts, 0, "volterra_sdeint")
    return (out, torch.stack(ws)) if return_brownian else out


def volterra_blocks(sde: VolterraSDE, x0: torch.Tensor, ts, dt: float | None = None,
                    generator: torch.Generator | None = None, block: int | None = None, check_finite: bool = True):
    """:func:`volterra_sdeint`'s solution streamed in time blocks: memory independent of ``len(ts)``.

    The same scheme, random numbers and values as ``volterra_sdeint(sde, x0, ts, dt, generator,
    return_brownian=True)`` (bit for bit), handed out a block of output times at a time, so that a functional
    that only accumulates along the path (a payoff's running sums) never holds the whole solution.

    Args:
        sde: a :class:`VolterraSDE`.
        x0: ``(batch, d)`` initial state, float32 or float64 (as in :func:`volterra_sdeint`).
        ts: strictly increasing output times starting at the origin of the kernel.
        dt: largest step (``None``: step on ``ts``).
        generator: a ``torch.Generator`` for the normals.
        block: output times per block (default: about 2¹⁹ numbers of ``x`` per block, at least 1).
        check_finite: raise ``FloatingPointError`` naming the output interval where the solution first became
            NaN/inf (one host sync per block).

    Returns:
        An iterator of ``(start, xs, ws)``: the solution and the driving Brownian motions at
        ``ts[start:start + c]``, each ``(c, batch, d)``; the blocks cover ``ts`` in order from ``start = 0``
        (``xs[0] = x0``, ``ws[0] = 0``).

    Raises:
        ValueError / TypeError: a bad ``block`` or an input :func:`volterra_sdeint` refuses — when called, before
            any step.

    Example:
        >>> class Additive(VolterraSDE):
        ...     def b(self, t, x): return torch.zeros_like(x)
        ...     def sigma(self, t, x): return torch.ones_like(x)
        >>> sde = Additive(MarkovApproxFBM(0.1, 8, rates="optimal"))
        >>> peak = torch.zeros(4, 1)
        >>> for start, xs, ws in volterra_blocks(sde, torch.zeros(4, 1), torch.linspace(0, 1, 1001)):
        ...     peak = torch.maximum(peak, xs.amax(0))            # running maximum, no (1001, 4, 1) tensor
    """
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ValueError(f"block must be a positive int (output times per block); got {block!r}")
    ts, outputs = _solve(sde, x0, ts, dt, generator)            # validated when called, solved when iterated
    return _grouped(x0, ts, outputs, block or max(1, (1 << 19) // max(1, x0.numel())), check_finite)


def _grouped(x0: torch.Tensor, ts: torch.Tensor, outputs, size: int, check_finite: bool):
    """The solver's outputs (i, x, W) stacked ``size`` output times at a time, x0 and W = 0 first."""
    xs, ws, start = [x0], [x0.new_zeros(x0.shape)], 0
    for i, x, w in outputs:
        xs.append(x)
        ws.append(w)
        if len(xs) == size or i == ts.numel() - 1:
            out = torch.stack(xs)
            if check_finite:
                _check_finite(out, ts, start, "volterra_blocks")
            yield start, out, torch.stack(ws)
            start += len(xs)
            xs, ws = [], []


def _check_finite(out: torch.Tensor, ts: torch.Tensor, start: int, who: str) -> None:
    """FloatingPointError naming the output interval where ``out`` (values at ts[start:]) is first non-finite."""
    bad = ~torch.isfinite(out).flatten(1).all(1)
    if bool(bad.any()):
        i = start + int(bad.nonzero()[0])
        raise FloatingPointError(f"{who}: the solution became non-finite between t = "
                                 f"{float(ts[max(i - 1, 0)]):g} and {float(ts[i]):g}; check b and sigma (a "
                                 f"square-root diffusion needs x.clamp(min=0))")


def _solve(sde: VolterraSDE, x0: torch.Tensor, ts, dt: float | None, generator):
    """Validate, then (ts as float64, a generator of (i, x, W) at ts[i] for i = 1..len(ts) − 1) — the exponential
    scheme of the module docstring."""
    if not isinstance(sde, VolterraSDE):
        raise TypeError(f"sde must be a VolterraSDE, got {type(sde).__name__}")
    if not isinstance(x0, torch.Tensor) or x0.dim() != 2 or x0.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x0 must be a float32/float64 tensor of shape (batch, d); got "
                         f"{tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__}")
    ts = V.as_times(ts, dtype=torch.float64).to(torch.float64).cpu()
    if ts.numel() < 2:
        raise ValueError(f"ts must hold at least two times; got {ts.tolist()}")
    if dt is not None:
        dt = V.check_positive_float(dt, "dt")
    with torch.no_grad():                              # shapes named before any work, as sdeint does
        _check_coefficients(sde.b(float(ts[0]), x0), sde.sigma(float(ts[0]), x0), x0)
    return ts, _steps(sde, x0, ts, dt, generator)


def _steps(sde: VolterraSDE, x0: torch.Tensor, ts: torch.Tensor, dt: float | None, generator):
    noise = sde.noise
    dtype, device = x0.dtype, x0.device
    work = torch.float64 if (dtype != torch.float64 and noise.cancellation_of() > REDUCED_PRECISION_CANCELLATION) \
        else dtype
    gammas = noise.gammas.to(device)
    omega = noise.weights.to(device=device, dtype=work)
    batch, d = x0.shape
    K = gammas.numel()
    counts, steps = _grid(ts, dt)
    ops: dict = {}
    U = x0.new_zeros(batch, d, K, dtype=work)
    W = x0.new_zeros(batch, d, dtype=work)
    x = x0
    t = float(ts[0])
    for i, (n, h) in enumerate(zip(counts, steps, strict=True)):
        key = step_key(h)
        if key not in ops:
            ops[key] = _step_operators(gammas, h, work, device)
        decay, drift, L = ops[key]
        for _ in range(n):
            z = torch.randn(batch, d, K + 1, generator=generator, dtype=work, device=device)
            inc = z @ L.T                                                  # (batch, d, K+1): ξ_1..ξ_K, ΔW
            bx = sde.b(t, x).to(work)
            sx = sde.sigma(t, x).to(work)
            U = decay * U + bx[..., None] * drift + sx[..., None] * inc[..., :K]
            W = W + inc[..., K]
            x = x0 + (U @ omega).to(dtype)
            t += h
        t = float(ts[i + 1])
        yield i + 1, x, W.to(dtype)
