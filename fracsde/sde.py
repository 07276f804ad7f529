"""SDEs driven by the Markov approximation of fractional Brownian motion, solved by torchsde.

A user writes a drift and a diffusion as in torchsde,

    dX = f(t, X) dt + g(t, X) dB̂_t,

with B̂ an m-dimensional MA-fBM (m independent copies of one :class:`MarkovApproxFBM`). B̂ is a
semimartingale, dB̂ = −(Σ_k ω_k γ_k Y_k) dt + (Σ_k ω_k) dW with dY_k = −γ_k Y_k dt + dW, so on the
augmented state z = (x, y_1..y_K) the equation is an ordinary SDE in the m-dimensional Brownian
motion W (REFERENCE §3):

    dx = [f − g Σ_k ω_k γ_k y_k] dt + g (Σ_k ω_k) dW,      dy_k = −γ_k y_k dt + dW.

:func:`sdeint` builds that augmented SDE, picks torchsde's noise type and a method for it, builds
the Brownian motion with a step-size hint, solves, and hands back paths of the user's shape. The
``(batch, d + mK, m)`` diffusion matrix is only formed for methods that need it (see ``_AugmentedSDE``).
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch
import torchsde
from torch import nn

from . import _validation as V
from ._warnings import FracsdeWarning
from .kinds import get_kind
from .noise import MarkovNoise

__all__ = ["FractionalSDE", "sdeint", "NonFiniteStateError", "StiffnessWarning", "EXPONENTIAL_EULER",
           "EXPLICIT_STABILITY_LIMIT",
           "supported_methods", "default_method"]

NOISE_TYPES = ("diagonal", "scalar", "additive", "general")
SDE_TYPES = ("ito", "stratonovich")

# What torchsde 0.2.6 can integrate, by the noise type of the AUGMENTED SDE and the sde type.
# (milstein/srk need diagonal-like structure; log_ode needs Lévy area; srk is Itô only.)
_ITO = {"additive": ("euler", "milstein", "srk"),
        "scalar": ("euler", "milstein", "srk"),
        "general": ("euler",)}
_STRAT = {"additive": ("midpoint", "heun", "euler_heun", "reversible_heun", "milstein", "log_ode"),
          "scalar": ("midpoint", "heun", "euler_heun", "reversible_heun", "milstein", "log_ode"),
          "general": ("midpoint", "heun", "euler_heun", "reversible_heun", "log_ode")}
_METHOD_SDE_TYPE = {"euler": "ito", "srk": "ito", "midpoint": "stratonovich", "heun": "stratonovich",
                    "euler_heun": "stratonovich", "reversible_heun": "stratonovich", "log_ode": "stratonovich"}
# Methods torchsde's adjoint SDE can be integrated with (its noise is scalar or general; log_ode, srk
# and milstein need the diffusion itself, which the adjoint never forms).
_ADJOINT_ITO = ("euler",)
_ADJOINT_STRAT = ("midpoint", "heun", "euler_heun")
_LEVY_AREA = {"srk": "space-time", "log_ode": "foster"}  # what sdeint builds (the cheapest that works)
_LEVY_AREA_OK = {"srk": ("space-time", "davie", "foster"), "log_ode": ("davie", "foster")}
_TORCHSDE_NOISE = {"additive": "additive", "scalar": "scalar", "diagonal": "general", "general": "general"}
# reversible Heun amplifies its parasitic mode by ~exp(γ_max T); warn beyond a factor 1e3
_REVERSIBLE_HEUN_MAX_GROWTH = math.log(1e3)
# adjoint checkpoints: at most this γ_max·spacing between restarts of the backward reconstruction
_CHECKPOINT_GROWTH = 2.0
_SOLVER_OPTIONS = ("rtol", "atol", "dt_min", "options")
_ADJOINT_OPTIONS = ("adjoint_adaptive", "adjoint_rtol", "adjoint_atol", "adjoint_options", "adjoint_params")


#: fracsde's exponential integrator (see :func:`_solve_exponential_euler`).
EXPONENTIAL_EULER = "exponential_euler"
#: Explicit methods diverge on dy = −γy dt once γ·dt exceeds this (Euler, midpoint and Heun: |1 − z + …| > 1).
EXPLICIT_STABILITY_LIMIT = 2.0
#: Steps per gradient checkpoint of exponential_euler: backpropagation keeps one segment's graph at a time.
_EXPONENTIAL_SEGMENT = 64


class StiffnessWarning(FracsdeWarning):
    """The fastest OU rate times the step size is large: explicit solvers misrepresent that OU process."""


class NonFiniteStateError(FloatingPointError):
    """The solution became NaN or infinite during the solve."""


class FractionalSDE(nn.Module):
    """Base class of SDEs driven by MA-fBM: dX = f(t, X) dt + g(t, X) dB̂.

    Subclasses define ``f(t, x)`` and ``g(t, x)`` for ``x`` of shape ``(batch, *shape)``, and set
    the class attributes

    * ``noise_type`` (relative to the fractional noise B̂):
      ``"diagonal"`` — g returns ``(batch, *shape)``, every coordinate has its own independent MA-fBM;
      ``"scalar"`` — g returns ``(batch, *shape, 1)``, one MA-fBM drives everything;
      ``"additive"`` — g returns ``(batch, *shape, m)`` and does not depend on x;
      ``"general"`` — g returns ``(batch, *shape, m)``.
    * ``sde_type``: ``"stratonovich"`` (default) or ``"ito"`` — how ∫ g dB̂ is read. Stratonovich
      obeys the ordinary chain rule, as the pathwise integral against fBM does; the Itô reading adds
      a drift −½ (Σω)² Σ_jl ∂g_·j/∂x_l g_lj relative to it. For additive noise they coincide.

    Optionally a subclass defines ``control(t, x, y) -> (batch, m)``, with ``y`` the OU states
    ``(batch, m, K)``; :func:`sdeint` then solves the controlled (posterior) SDE in which W is
    shifted by ∫u dt, and can return the path KL ½∫|u|² dt (see :func:`sdeint`).

    Args:
        noise: the :class:`~fracsde.MarkovNoise` that drives the SDE — a :class:`MarkovApproxFBM` or any
            user-given rates and weights; it is a submodule, so a learnable Hurst index is a parameter of the SDE.
        noise_type: overrides the class attribute for this instance.
        sde_type: overrides the class attribute for this instance.

    Example:
        >>> class FractionalOU(FractionalSDE):
        ...     noise_type, sde_type = "additive", "ito"
        ...     def f(self, t, x): return -x
        ...     def g(self, t, x): return torch.full_like(x, 0.5).unsqueeze(-1)
        >>> sde = FractionalOU(MarkovApproxFBM(hurst=0.7, num_processes=3))
        >>> xs = sdeint(sde, torch.zeros(8, 1), torch.linspace(0, 1, 11), dt=0.01)   # (11, 8, 1)
    """

    sde_type = "stratonovich"

    def __init__(self, noise: MarkovNoise, noise_type: str | None = None, sde_type: str | None = None):
        super().__init__()
        if not isinstance(noise, MarkovNoise):
            raise TypeError(f"noise must be a fracsde.MarkovNoise (e.g. MarkovApproxFBM(hurst, num_processes)), "
                            f"got {type(noise).__name__}")
        self.noise = noise
        if noise_type is not None:
            self.noise_type = noise_type
        if sde_type is not None:
            self.sde_type = sde_type
        if getattr(self, "noise_type", None) is None:
            raise ValueError(f"{type(self).__name__} must set noise_type to one of {NOISE_TYPES}")
        V.check_choice(self.noise_type, "noise_type", NOISE_TYPES)
        V.check_choice(self.sde_type, "sde_type", SDE_TYPES)

    def f(self, t, x):
        raise NotImplementedError(f"{type(self).__name__} must define the drift f(t, x)")

    def g(self, t, x):
        raise NotImplementedError(f"{type(self).__name__} must define the diffusion g(t, x)")


# ---------------------------------------------------------------------------------------------
# method selection
# ---------------------------------------------------------------------------------------------
def supported_methods(noise_type: str, sde_type: str) -> tuple:
    """Methods :func:`sdeint` accepts for a user noise type and sde type (additive: both sde types).

    torchsde's methods, then ``"exponential_euler"`` (fracsde's own, every noise type and both sde types).

    Args:
        noise_type: ``"diagonal"``, ``"scalar"``, ``"additive"`` or ``"general"`` (of the user's SDE).
        sde_type: ``"ito"`` or ``"stratonovich"``.

    Returns:
        A tuple of method names.
    """
    V.check_choice(noise_type, "noise_type", NOISE_TYPES)
    V.check_choice(sde_type, "sde_type", SDE_TYPES)
    aug = _TORCHSDE_NOISE[noise_type]
    if aug == "additive":  # Itô = Stratonovich: every method of either type applies
        return _ITO[aug] + tuple(m for m in _STRAT[aug] if m not in _ITO[aug]) + (EXPONENTIAL_EULER,)
    return (_ITO if sde_type == "ito" else _STRAT)[aug] + (EXPONENTIAL_EULER,)


def default_method(noise_type: str, sde_type: str, adjoint: bool = False) -> str:
    """The method :func:`sdeint` uses when none is given.

    Without adjoint: srk (strong order 1.5) for additive noise and Itô scalar noise, Euler for other
    Itô SDEs, midpoint for Stratonovich. With adjoint: Euler (Itô) or midpoint (Stratonovich),
    whose adjoint is the same scheme run backwards (srk has no adjoint in torchsde). :func:`sdeint` itself
    switches to ``"exponential_euler"`` where the rates make explicit steps unstable (see there).

    Args:
        noise_type: ``"diagonal"``, ``"scalar"``, ``"additive"`` or ``"general"``.
        sde_type: ``"ito"`` or ``"stratonovich"``.
        adjoint: whether the solve uses the adjoint.

    Returns:
        The method name.
    """
    V.check_choice(noise_type, "noise_type", NOISE_TYPES)
    V.check_choice(sde_type, "sde_type", SDE_TYPES)
    aug = _TORCHSDE_NOISE[noise_type]
    if adjoint:
        return "midpoint" if sde_type == "stratonovich" or aug == "additive" else "euler"
    if aug == "additive" or (aug == "scalar" and sde_type == "ito"):
        return "srk"
    return "euler" if sde_type == "ito" else "midpoint"


def _resolve_methods(noise_type, sde_type, method, adjoint, adjoint_method):
    """Check (noise type, method) BEFORE torchsde does; return (method, torchsde sde type, adjoint method)."""
    aug = _TORCHSDE_NOISE[noise_type]
    if method is None:
        method = default_method(noise_type, sde_type, adjoint)
    ok = supported_methods(noise_type, sde_type)
    if method not in ok:
        raise ValueError(f"method {method!r} does not support noise_type={noise_type!r} with sde_type={sde_type!r} "
                         f"(torchsde noise type {aug!r} after augmentation); methods that work: {ok}")
    if method == EXPONENTIAL_EULER:
        if adjoint:
            raise ValueError("method='exponential_euler' has no adjoint (torchsde's adjoint integrates its own "
                             "explicit scheme, which the stiff OU rates would break); use adjoint=False: gradients "
                             "then flow by backpropagation with memory bounded by checkpointing")
        if adjoint_method is not None:
            raise ValueError("adjoint_method is only used with adjoint=True")
        return method, sde_type, None
    ts_sde_type = sde_type
    if aug == "additive":  # both readings agree: take the one the method is written for
        ts_sde_type = _METHOD_SDE_TYPE.get(method, sde_type)
    if not adjoint:
        if adjoint_method is not None:
            raise ValueError("adjoint_method is only used with adjoint=True")
        return method, ts_sde_type, None
    if adjoint_method is None:
        adjoint_method = "adjoint_reversible_heun" if method == "reversible_heun" else (
            "euler" if ts_sde_type == "ito" else "midpoint")
    ok_adj = _ADJOINT_ITO if ts_sde_type == "ito" else _ADJOINT_STRAT
    if method == "reversible_heun":
        ok_adj = ok_adj + ("adjoint_reversible_heun",)
    if adjoint_method not in ok_adj:
        raise ValueError(f"adjoint_method {adjoint_method!r} does not work with method {method!r} for "
                         f"noise_type={noise_type!r} ({ts_sde_type} form); adjoint methods that work: {ok_adj}")
    return method, ts_sde_type, adjoint_method


# ---------------------------------------------------------------------------------------------
# the augmented SDE handed to torchsde
# ---------------------------------------------------------------------------------------------
def _mul_diagonal(g, v):  # g (b, d), v (b, d)
    return g * v


def _mul_scalar(g, v):  # g (b, d, 1), v (b, 1)
    return g[..., 0] * v


def _mul_general(g, v):  # g (b, d, m), v (b, m)
    return torch.bmm(g, v.unsqueeze(-1)).squeeze(-1)


_MUL = {"diagonal": _mul_diagonal, "scalar": _mul_scalar, "additive": _mul_general, "general": _mul_general}


class _AugmentedSDE:
    """torchsde view of a FractionalSDE on z = (x (d), y_1 (m), ..., y_K (m), [kl (1)]).

    The OU states are stored K-major (all m channels of y_1, then of y_2, ...) so that every
    operation on them is a flat 2-D op or a concatenation of m-vectors (3-D ops with a trailing
    size-K dimension are several times slower on the CPU). ``f_and_g_prod``/``g_prod`` (euler,
    midpoint, heun, euler_heun, log_ode, srk's additive branch, the adjoint) never form the
    diffusion matrix; ``g``/``f_and_g`` form it for the methods that need it (milstein, srk for
    scalar noise, reversible_heun, log_ode's Lévy-area term, the Itô adjoint).
    """

    def __init__(self, sde: FractionalSDE, shape, m: int, omega, gammas, noise_type: str, sde_type: str,
                 control, with_kl: bool):
        self.noise_type = noise_type
        self.sde_type = sde_type
        self._sde = sde
        self._user_noise = sde.noise_type
        self._shape = tuple(shape)
        self._d = math.prod(shape)
        self._m = m
        self._K = gammas.numel()
        self._omega_sum = omega.sum()
        # elementwise over K slices, not a (K·m, m) matmul: a tiny BLAS call enters MKL's thread pool,
        # which stalls badly on a loaded machine (measured 60x slower with 2 threads)
        self._omega_gamma = list((omega * gammas).unbind(0))
        self._neg_gamma = (-gammas).repeat_interleave(m)  # (K·m,), K-major like y
        self._mul = _MUL[sde.noise_type]
        self._control = control
        self._with_kl = with_kl
        self._y_block = None  # (K·m, m) identity blocks, built on first use of g()
        self._sizes = [self._d, m * self._K] + ([1] if with_kl else [])

    # -- helpers ----------------------------------------------------------------------------
    def _split(self, z):
        # one split (a single backward node) rather than two slices (each backward fills a zero z)
        parts = z.split(self._sizes, dim=1)
        return parts[0].reshape(z.shape[0], *self._shape), parts[1]

    def _user_g(self, t, x):
        g = self._sde.g(t, x)
        b = x.shape[0]
        return g.reshape(b, self._d) if self._user_noise == "diagonal" else g.reshape(b, self._d, -1)

    def _drift(self, t, x, y, g):
        b, m = x.shape[0], self._m
        fx = self._sde.f(t, x).reshape(b, self._d)
        fy = y * self._neg_gamma
        dbhat_dt = None  # drift of dB̂: −Σ_k ω_k γ_k y_k, (b, m)
        for k, wg in enumerate(self._omega_gamma):
            yk = y[:, k * m:(k + 1) * m]
            dbhat_dt = yk * (-wg) if dbhat_dt is None else dbhat_dt - yk * wg
        extra = []
        if self._control is not None:
            u = self._control(t, x, y.reshape(b, self._K, m).transpose(1, 2))
            dbhat_dt = dbhat_dt + self._omega_sum * u
            fy = fy + torch.cat([u] * self._K, dim=1)
            if self._with_kl:
                extra.append(0.5 * (u * u).sum(dim=1, keepdim=True))
        return torch.cat([fx + self._mul(g, dbhat_dt), fy] + extra, dim=1)

    def _gprod(self, g, v):
        parts = [self._mul(g, self._omega_sum * v)] + [v] * self._K
        if self._with_kl:
            parts.append(v.new_zeros(v.shape[0], 1))
        return torch.cat(parts, dim=1)

    def _gmatrix(self, g):
        b, m = g.shape[0], self._m
        if self._y_block is None:
            self._y_block = torch.eye(m, dtype=g.dtype, device=g.device).repeat(self._K, 1)
        if self._user_noise == "diagonal":
            g = torch.diag_embed(g)
        parts = [g * self._omega_sum, self._y_block.expand(b, -1, -1)]
        if self._with_kl:
            parts.append(g.new_zeros(b, 1, m))
        return torch.cat(parts, dim=1)

    # -- torchsde interface -----------------------------------------------------------------
    def f(self, t, z):
        x, y = self._split(z)
        return self._drift(t, x, y, self._user_g(t, x))

    def g(self, t, z):
        x, _ = self._split(z)
        return self._gmatrix(self._user_g(t, x))

    def f_and_g(self, t, z):
        x, y = self._split(z)
        g = self._user_g(t, x)
        return self._drift(t, x, y, g), self._gmatrix(g)

    def g_prod(self, t, z, v):
        x, _ = self._split(z)
        return self._gprod(self._user_g(t, x), v)

    def f_and_g_prod(self, t, z, v):
        x, y = self._split(z)
        g = self._user_g(t, x)
        return self._drift(t, x, y, g), self._gprod(g, v)


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------
def _check_x0(sde, x0):
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"x0 must be a torch.Tensor of shape (batch, *shape), got {type(x0).__name__}")
    if x0.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x0 must have dtype float32 or float64, got {x0.dtype}")
    if x0.dim() < 2:
        raise ValueError(f"x0 must have shape (batch, *shape) with at least 2 dimensions, got shape {tuple(x0.shape)}"
                         f"; for a batch of scalars use x0.unsqueeze(-1)")
    if x0.shape[0] < 1 or x0[0].numel() < 1:
        raise ValueError(f"x0 must be non-empty, got shape {tuple(x0.shape)}")
    if not bool(torch.isfinite(x0).all()):
        raise ValueError("x0 contains NaN or inf")
    for name, p in sde.named_parameters():
        if p.is_floating_point() and not name.startswith("noise."):
            if p.dtype != x0.dtype:
                raise TypeError(f"x0 has dtype {x0.dtype} but parameter {name!r} of the SDE has dtype {p.dtype}; "
                                f"convert one of them (e.g. sde.to({x0.dtype}))")
    for name, t in list(sde.named_parameters()) + list(sde.named_buffers()):
        if t.device != x0.device:
            raise ValueError(f"x0 is on {x0.device} but {name!r} of the SDE is on {t.device}; move them together")


def _check_ts(ts, x0):
    if isinstance(ts, torch.Tensor) and ts.device != x0.device:
        raise ValueError(f"ts is on {ts.device} but x0 is on {x0.device}; put them on the same device")
    ts = V.as_times(ts, dtype=x0.dtype)
    if ts.numel() < 2:
        raise ValueError(f"ts must contain at least two times (start and end), got {ts.numel()}")
    ts = V.as_times(ts.to(device=x0.device, dtype=x0.dtype))  # re-check: a float32 cast can merge close times
    return ts


def _check_outputs(sde, t0, x0, control):
    """Call f, g (and control) once on x0 so that shape errors name the user's function, not torchsde."""
    b, shape = x0.shape[0], tuple(x0.shape[1:])
    with torch.no_grad():
        fx = sde.f(t0, x0)
        gx = sde.g(t0, x0)
    if tuple(fx.shape) != tuple(x0.shape):
        raise ValueError(f"f(t, x) must return the shape of x, {tuple(x0.shape)}; got {tuple(fx.shape)}")
    nt = sde.noise_type
    if nt == "diagonal":
        if tuple(gx.shape) != tuple(x0.shape):
            raise ValueError(f"diagonal noise: g(t, x) must return the shape of x, {tuple(x0.shape)}; "
                             f"got {tuple(gx.shape)}")
        m = math.prod(shape)
    else:
        if gx.dim() != x0.dim() + 1 or tuple(gx.shape[:-1]) != tuple(x0.shape):
            raise ValueError(f"{nt} noise: g(t, x) must return shape (batch, *shape, m) = "
                             f"{(b, *shape, 'm')}; got {tuple(gx.shape)}")
        m = gx.shape[-1]
        if nt == "scalar" and m != 1:
            raise ValueError(f"scalar noise: g(t, x) must have a last dimension of 1; got {tuple(gx.shape)}")
    if control is not None:
        y = x0.new_zeros(b, m, sde.noise.num_processes)
        with torch.no_grad():
            u = control(t0, x0, y)
        if tuple(u.shape) != (b, m):
            raise ValueError(f"control(t, x, y) must return (batch, m) = {(b, m)}; got {tuple(u.shape)}")
    return m


def _entropy(generator, entropy):
    if entropy is not None:
        if generator is not None:
            raise ValueError("pass either generator or entropy, not both")
        if isinstance(entropy, bool) or not isinstance(entropy, numbers.Integral):
            raise TypeError(f"entropy must be an int, got {type(entropy).__name__}")
        return int(entropy)
    # torch's RNG (not numpy's, which torchsde would use) so that torch.manual_seed reproduces a solve
    dev = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator, device=dev))


def _checkpoint_grid(ts, dt, gamma_max):
    """Output grid for the adjoint with extra checkpoints on the step grid, γ_max·spacing ≤ 2.

    torchsde's adjoint rebuilds the forward state by solving the SDE backwards between output
    times, restarting from the stored state at each. Backwards, the OU components grow like
    e^{γ t}, so the rebuilt fast states (and the gradients) are wrong unless the restarts are
    close: with γ_max·spacing ≤ 2 the amplification is ≤ e². Memory grows with the number of
    checkpoints, ½ γ_max (T − t0), never with the number of steps.
    Returns (grid, indices of ts in grid) or (ts, None) when no checkpoint is needed.
    """
    every = max(1, int(_CHECKPOINT_GROWTH / (gamma_max * dt))) * dt
    t0, t1 = float(ts[0]), float(ts[-1])
    count = int((t1 - t0) / every + 1e-9)
    if count < 1:
        return ts, None
    extra = t0 + every * torch.arange(1, count + 1, dtype=torch.float64)
    user = ts.detach().to(torch.float64).cpu()
    near = (extra[:, None] - user[None, :]).abs().min(dim=1).values < 0.5 * dt
    extra = extra[~near].to(device=ts.device, dtype=ts.dtype)
    if extra.numel() == 0:
        return ts, None
    grid, order = torch.sort(torch.cat([ts, extra]))
    keep = torch.nonzero(order < ts.numel()).squeeze(1)
    return grid, keep


def _raise_if_nonfinite(zs, ts):
    """One host sync: the first output index whose state is not finite."""
    bad = ~torch.isfinite(zs.detach().flatten(1)).all(dim=1)
    first = int(torch.where(bad.any(), bad.to(torch.int8).argmax(), torch.tensor(-1, device=bad.device)))
    if first >= 0:
        t_lo, t_hi = float(ts[first - 1]), float(ts[first])
        raise NonFiniteStateError(
            f"the solution became non-finite (NaN or inf) between t = {t_lo:g} and t = {t_hi:g} "
            f"(output index {first} of {ts.numel()}); check the drift/diffusion there, or reduce dt")


def _check_solve(sde, x0, ts, method, dt, adjoint, adjoint_method, return_kl, solver_options):
    """Every argument check of :func:`sdeint` before any work; returns (ts, dt, control, methods)."""
    if not isinstance(sde, FractionalSDE):
        raise TypeError(f"sde must be a FractionalSDE, got {type(sde).__name__}")
    _check_x0(sde, x0)
    ts = _check_ts(ts, x0)
    dt = V.check_positive_float(dt, "dt")
    allowed = _SOLVER_OPTIONS + (_ADJOINT_OPTIONS if adjoint else ())
    for key in solver_options:
        if key not in allowed:
            raise TypeError(f"sdeint got an unexpected keyword argument {key!r}; solver options allowed here: "
                            f"{allowed}")
    control = getattr(sde, "control", None)
    if return_kl and control is None:
        raise ValueError("return_kl=True needs a controlled SDE: define control(t, x, y) on the FractionalSDE")
    methods = _resolve_methods(sde.noise_type, sde.sde_type, method, adjoint, adjoint_method)
    return ts, dt, control, methods


def _warn_if_stiff(noise, ts, dt, adaptive, method, adjoint=False):
    """StiffnessWarning where the fastest OU rate (derived from the rates) makes the chosen steps unreliable;
    a ValueError where they would make reversible Heun's adjoint gradients wrong."""
    gamma_max = noise.gamma_max
    if not adaptive and gamma_max * dt > 1.0:
        warnings.warn(f"gamma_max * dt = {gamma_max * dt:.3g} > 1: explicit solvers misrepresent the fastest "
                      f"OU process (Euler oscillates, and every explicit method here diverges beyond ~2); "
                      f"use dt <= {1.0 / gamma_max:.3g} or a smaller gamma_max", StiffnessWarning, stacklevel=3)
    span = float(ts[-1] - ts[0])
    if method == "reversible_heun" and adjoint and gamma_max * span > _REVERSIBLE_HEUN_MAX_GROWTH:
        # its backward pass reconstructs the forward states through the growing parasitic mode: at γ_max = 20
        # over T = 1 the gradients were measured 39 % off backprop on the same path (float64, dt = 1e-3)
        raise ValueError(f"method='reversible_heun' with adjoint=True needs gamma_max * (T - t0) <= "
                         f"{_REVERSIBLE_HEUN_MAX_GROWTH:.3g} (its parasitic mode grows by ~exp(gamma_max * T)); "
                         f"got gamma_max = {gamma_max:g} over T - t0 = {span:g}, gamma_max * (T - t0) = "
                         f"{gamma_max * span:.3g}. Use method='midpoint', 'heun' or 'euler_heun' with adjoint=True "
                         f"(their adjoints are stable), or adjoint=False")
    if method == "reversible_heun" and gamma_max * span > _REVERSIBLE_HEUN_MAX_GROWTH:
        warnings.warn(f"reversible_heun is unstable on the OU components: its parasitic mode grows by "
                      f"|a - sqrt(1 + a^2)| > 1 per step (a = -gamma*dt), about exp(gamma_max * T) = "
                      f"{math.exp(min(gamma_max * span, 700.0)):.3g} over this solve; use midpoint/heun, "
                      f"or a smaller gamma_max * T", StiffnessWarning, stacklevel=3)


def _brownian_motion(bm, ts, size, dt, method, generator, entropy, dtype, device):
    """The Brownian motion of the solve: a BrownianInterval with a step hint, or the user's ``bm`` checked."""
    if bm is None:
        return torchsde.BrownianInterval(t0=ts[0], t1=ts[-1], size=size, dtype=dtype, device=device,
                                         entropy=_entropy(generator, entropy), dt=dt,
                                         levy_area_approximation=_LEVY_AREA.get(method, "none"))
    if entropy is not None:
        raise ValueError("entropy seeds the Brownian motion sdeint builds; it cannot be combined with bm")
    if tuple(bm.shape) != tuple(size):
        raise ValueError(f"bm must have shape (batch, m) = {tuple(size)}, got {tuple(bm.shape)}")
    have = getattr(bm, "levy_area_approximation", "none")
    if method in _LEVY_AREA_OK and have not in _LEVY_AREA_OK[method]:
        raise ValueError(f"method {method!r} needs a Brownian motion with levy_area_approximation in "
                         f"{_LEVY_AREA_OK[method]}; the bm passed has {have!r}")
    return bm


def _solve_adjoint(sde, aug, z0, ts, omega, adjoint_method, adjoint_checkpoints, common, solver_options):
    """torchsde's adjoint with ω in place of the raw Hurst parameter and checkpoints for the stiff OU states."""
    solver_options = dict(solver_options)
    params = solver_options.pop("adjoint_params", None)
    params = tuple(sde.parameters()) if params is None else tuple(params)
    # torchsde's adjoint differentiates f and g w.r.t. its parameters at every step. ω(H) is a
    # (K,)-vector computed once with a graph back to H: we hand ω itself to the adjoint in
    # place of the raw Hurst parameter, get dL/dω, and autograd chains dω/dH once — no per-step
    # recomputation of the weights, and no double counting.
    hurst_params = [p for p in sde.noise.parameters()]
    params = tuple(p for p in params if not any(p is q for q in hurst_params))
    if omega.requires_grad:
        params = params + (omega,)
    grid, keep = ts, None
    if adjoint_checkpoints and not common["adaptive"]:
        grid, keep = _checkpoint_grid(ts, common["dt"], sde.noise.gamma_max)
    zs = torchsde.sdeint_adjoint(aug, z0, grid, adjoint_method=adjoint_method, adjoint_params=params, **common,
                                 **solver_options)
    return zs if keep is None else zs[keep]


def _choose_stiff_method(noise, dt, adaptive, method, chosen, adjoint, control, bm, solver_options):
    """Where γ_max·dt exceeds the explicit stability limit: switch to exponential_euler when the user chose no
    method (and nothing needs torchsde), refuse otherwise, naming it. Check exponential_euler's own limits."""
    z = noise.gamma_max * dt
    if method != EXPONENTIAL_EULER and not adaptive and z > EXPLICIT_STABILITY_LIMIT:
        if not chosen and not adjoint and control is None and bm is None and not solver_options:
            return EXPONENTIAL_EULER
        raise ValueError(f"gamma_max * dt = {noise.gamma_max:g} * {dt:g} = {z:.3g} exceeds the stability limit "
                         f"{EXPLICIT_STABILITY_LIMIT:g} of every explicit method (method={method!r} would diverge "
                         f"to NaN): use method='exponential_euler' (exact OU steps, stable at any rate; no adjoint), "
                         f"dt <= {EXPLICIT_STABILITY_LIMIT / noise.gamma_max:.3g}, or a rule with max_rate <= "
                         f"{EXPLICIT_STABILITY_LIMIT / dt:.3g}")
    if method == EXPONENTIAL_EULER:
        for bad, why in ((adaptive, "adaptive=True (it takes fixed steps)"), (control is not None, "a control "
                         "(the KL of a controlled path needs torchsde's solvers)"), (bm is not None, "bm (it "
                         "draws the OU integrals exactly, which a Brownian motion object cannot give)"),
                         (bool(solver_options), f"solver options {sorted(solver_options)}")):
            if bad:
                raise ValueError(f"method='exponential_euler' does not take {why}")
    return method


def _solve_exponential_euler(sde, x0, ts, dt, generator, entropy, return_noise, check_finite):
    """fracsde's exponential Euler scheme on the augmented state (x, Y) (see :func:`sdeint`).

    Per step h: the OU factors take their exact Gaussian step Y' = e^{−γh}Y + ξ, drawn jointly with nothing else
    (ΔB̂ = ωᵀ(Y' − Y) is the exact increment of B̂); x takes an Euler step driven by it, x' = x + f h + g ΔB̂ (Itô),
    or a Heun step x' = x + ½(f + f̃)h + ½(g + g̃)ΔB̂ with the predictor's f̃, g̃ (Stratonovich). Stable at any
    γ·h. Backpropagation recomputes segments of :data:`_EXPONENTIAL_SEGMENT` steps (checkpointing), so memory
    holds one segment's graph plus the outputs.
    """
    from torch.utils.checkpoint import checkpoint

    from .noise import REDUCED_PRECISION_CANCELLATION, step_covariance
    from .numerics import graded_psd_factor, step_key

    noise = sde.noise
    batch, shape = x0.shape[0], tuple(x0.shape[1:])
    d = math.prod(shape)
    m = _check_outputs(sde, ts[0], x0, None)
    K = noise.num_processes
    dtype, device = x0.dtype, x0.device
    work = torch.float64 if (dtype != torch.float64 and noise.cancellation_of() > REDUCED_PRECISION_CANCELLATION) \
        else dtype
    if generator is None and entropy is not None:
        generator = torch.Generator(device=device).manual_seed(int(entropy))
    omega = noise.weights.to(device=device, dtype=work)
    gammas = noise.gammas.to(device=device, dtype=torch.float64)
    mul = _MUL[sde.noise_type]
    user_noise = sde.noise_type
    strat = sde.sde_type == "stratonovich" and user_noise != "additive"

    def user_g(t, x):
        g = sde.g(t, x)
        return g.reshape(batch, d) if user_noise == "diagonal" else g.reshape(batch, d, -1)

    def drift(t, x):
        return sde.f(t, x).reshape(batch, d)

    # the flat step list: (t, h, index of the output reached at the end of the step or −1)
    times = ts.tolist()
    steps = []
    for i in range(len(times) - 1):
        n = max(1, math.ceil((times[i + 1] - times[i]) / dt - 1e-9))
        h = (times[i + 1] - times[i]) / n
        steps += [(times[i] + j * h, h, -1) for j in range(n - 1)] + [(times[i] + (n - 1) * h, h, i + 1)]
    factors = {}                 # by the step rounded to 12 digits: equal steps of different intervals share one
    for _, h, _ in steps:        # factorisation instead of differing in the last bits and each getting their own
        key = step_key(h)
        if key not in factors:
            factors[key] = (torch.exp(-gammas * h).to(work), graded_psd_factor(step_covariance(gammas, h)).to(work))

    def segment(x, y, z, seg):
        outs = []
        for (t, h, out), zn in zip(seg, z.unbind(0), strict=True):
            decay, L = factors[step_key(h)]
            y_new = decay * y + zn @ L.T                                 # (batch, m, K), exact OU step
            db = ((y_new - y) @ omega).to(dtype)                        # (batch, m): exact increment of B̂
            xs_ = x.reshape(batch, *shape)
            fx, gx = drift(t, xs_), user_g(t, xs_)
            x_pred = x + fx * h + mul(gx, db)
            if strat:
                xp = x_pred.reshape(batch, *shape)
                x = x + 0.5 * (fx + drift(t + h, xp)) * h + mul(0.5 * (gx + user_g(t + h, xp)), db)
            else:
                x = x_pred
            y = y_new
            if out >= 0:
                outs += [x, y]
        return (x, y, *outs)

    y0 = noise.initial_state(batch * m, generator=generator, dtype=work, device=device).reshape(batch, m, K)
    x, y = x0.reshape(batch, d), y0
    xs, ys = [x], [y0]
    grad = torch.is_grad_enabled() and (x0.requires_grad or omega.requires_grad or any(
        p.requires_grad for p in sde.parameters()))
    for start in range(0, len(steps), _EXPONENTIAL_SEGMENT):
        seg = steps[start:start + _EXPONENTIAL_SEGMENT]
        z = torch.randn(len(seg), batch, m, K, generator=generator, dtype=work, device=device)
        res = checkpoint(segment, x, y, z, seg, use_reentrant=False) if grad else segment(x, y, z, seg)
        x, y = res[0], res[1]
        xs += list(res[2::2])
        ys += list(res[3::2])
        if check_finite and not bool(torch.isfinite(x).all()):
            raise NonFiniteStateError(f"the solution became NaN/inf before t = {seg[-1][0] + seg[-1][1]:g} "
                                      f"(exponential_euler: the OU part is exact, so f or g produced it)")
    out = torch.stack(xs).reshape(ts.numel(), batch, *shape)
    if not return_noise:
        return out
    yt = torch.stack(ys)                                                  # (len(ts), batch, m, K)
    yt = get_kind(noise.kind).read_out(yt, y0)
    return out, (yt @ omega).to(dtype)


# ---------------------------------------------------------------------------------------------
# the solve
# ---------------------------------------------------------------------------------------------
# sdeint is ~85 lines: ~45 of them document every option; the body delegates to the helpers above.
def sdeint(sde: FractionalSDE, x0: torch.Tensor, ts, method: str | None = None, dt: float = 1e-3,
           adaptive: bool = False, adjoint: bool = False, adjoint_method: str | None = None,
           return_noise: bool = False, return_kl: bool = False, bm=None,
           generator: torch.Generator | None = None, entropy: int | None = None,
           check_finite: bool = True, adjoint_checkpoints: bool = True, **solver_options):
    """Solve dX = f dt + g dB̂ (B̂ = MA-fBM) on the grid ``ts`` with a torchsde solver.

    Args:
        sde: a :class:`FractionalSDE`.
        x0: ``(batch, *shape)`` initial state, float32 or float64.
        ts: strictly increasing, non-negative output times; the noise starts at ``ts[0]``
            (OU states zero for type II, stationary draw for type I).
        method: a torchsde method name, or ``"exponential_euler"`` (fracsde's: the OU factors take their exact
            Gaussian step, x an Euler step (Itô) or a Heun step (Stratonovich) driven by the exact increment of
            B̂; stable at any γ_max·dt; every noise type; no adjoint — gradients by backpropagation with
            checkpointing, memory bounded). ``None`` picks :func:`default_method`, or ``"exponential_euler"``
            when γ_max·dt exceeds :data:`EXPLICIT_STABILITY_LIMIT` (and neither adjoint, control nor bm asks for
            torchsde). A chosen explicit method beyond that limit is refused, naming exponential_euler, instead
            of diverging to NaN. Unsupported (noise type, method) pairs raise ``ValueError`` listing
            :func:`supported_methods`.
        dt: fixed step (or the first step when ``adaptive``), also the Brownian motion's hint.
        adjoint: use torchsde's stochastic adjoint (memory constant in the number of steps).
        adjoint_method: method of the backward solve (default: the reversible adjoint for
            ``reversible_heun``, otherwise Euler (Itô) or midpoint (Stratonovich)).
        return_noise: also return B̂ at ``ts``, ``(len(ts), batch, m)``, from the OU states of the
            same solve (B̂ = Σω(Y_t − Y_{ts[0]}) for type I, Σω Y_t for type II).
        return_kl: with a ``control`` defined on the SDE, also return ½∫_{ts[0]}^t |u|² ds,
            ``(len(ts), batch)``, the KL between the controlled and the uncontrolled path laws.
        bm: a torchsde Brownian motion of shape ``(batch, m)`` to reuse (common random numbers,
            adjoint vs backprop); by default a ``BrownianInterval`` with the ``dt`` hint is built.
        generator: seeds the Brownian motion (and the type I initial OU states); without it or ``entropy``,
            torch's global RNG is used.
        entropy: an int seed instead of a generator.
        check_finite: raise :class:`NonFiniteStateError`, naming the time interval, if the
            solution is NaN/inf at an output time (one host sync after the solve).
        adjoint_checkpoints: with ``adjoint=True`` and fixed steps, also store the state every
            ~2/γ_max time units (on the step grid), where the adjoint restarts its backward
            reconstruction of the stiff OU states; without them gradients can be off by tens of
            percent once γ_max·(T − t0) ≳ 10 (see docs/sde.md). Memory ∝ γ_max·T, not the steps.
        **solver_options: ``rtol, atol, dt_min, options`` and, with ``adjoint=True``,
            ``adjoint_adaptive, adjoint_rtol, adjoint_atol, adjoint_options, adjoint_params``.

    Returns:
        ``xs`` of shape ``(len(ts), batch, *shape)``; a tuple ``(xs, noise?, kl?)`` in that order
        when ``return_noise`` or ``return_kl`` is set.

    With a ``control(t, x, y)`` on the SDE the solve is of the posterior
    dy_k = (−γ_k y_k + u) dt + dW, dx = f dt + g dB̂ with dB̂ = −Σωγy dt + Σω (dW + u dt): the
    driving Brownian motion is shifted by ∫u dt, so by Girsanov the path KL is ½∫|u|² dt.
    """
    chosen = method is not None
    ts, dt, control, (method, ts_sde_type, adjoint_method) = _check_solve(
        sde, x0, ts, method, dt, adjoint, adjoint_method, return_kl, solver_options)
    noise = sde.noise
    method = _choose_stiff_method(noise, dt, adaptive, method, chosen, adjoint, control, bm, solver_options)
    if method == EXPONENTIAL_EULER:
        return _solve_exponential_euler(sde, x0, ts, dt, generator, entropy, return_noise, check_finite)
    _warn_if_stiff(noise, ts, dt, adaptive, method, adjoint)
    batch, shape = x0.shape[0], tuple(x0.shape[1:])
    m = _check_outputs(sde, ts[0], x0, control)
    K = noise.num_processes
    dtype, device = x0.dtype, x0.device

    # ω once per call; differentiable in H when it is learnable (see the adjoint note below).
    omega = noise.weights.to(dtype)
    gammas = noise.gammas.to(dtype)
    aug = _AugmentedSDE(sde, shape, m, omega, gammas, _TORCHSDE_NOISE[sde.noise_type], ts_sde_type,
                        control, return_kl)

    bm = _brownian_motion(bm, ts, (batch, m), dt, method, generator, entropy, dtype, device)
    # OU states start at ts[0]: zeros (type II) or the stationary law (type I); stored K-major
    y0 = noise.initial_state(batch * m, generator=generator, dtype=dtype, device=device)
    y0 = y0.reshape(batch, m, K).transpose(1, 2).reshape(batch, K * m)
    parts = [x0.reshape(batch, -1), y0]
    if return_kl:
        parts.append(x0.new_zeros(batch, 1))
    z0 = torch.cat(parts, dim=1)

    common = dict(bm=bm, method=method, dt=dt, adaptive=adaptive)
    if adjoint:
        zs = _solve_adjoint(sde, aug, z0, ts, omega, adjoint_method, adjoint_checkpoints, common, solver_options)
    else:
        zs = torchsde.sdeint(aug, z0, ts, **common, **solver_options)

    if check_finite:
        _raise_if_nonfinite(zs, ts)
    d = math.prod(shape)
    xs = zs[:, :, :d].reshape(ts.numel(), batch, *shape)
    extras = []
    if return_noise:
        ys = zs[:, :, d:d + m * K]
        ys = get_kind(noise.kind).read_out(ys, y0)
        extras.append(torch.einsum("k,tbkm->tbm", omega, ys.reshape(ts.numel(), batch, K, m)))
    if return_kl:
        extras.append(zs[:, :, -1])
    return (xs, *extras) if extras else xs
