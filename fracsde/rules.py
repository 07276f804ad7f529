"""Rate rules of the Markov approximation: which K rates, which weights, and how good the result is.

A Markov approximation of type II fBM replaces its kernel K(t) = t^{H−½}/Γ(H+½) by K̂(t) = Σ_k ω_k e^{−γ_k t}
(REFERENCE §7). Two error measures are in use, and both are reported everywhere, named:

* the **strong error** sup_{t≤T} E|B_t − B̂_t|² = ‖K − K̂‖²_{L²(0,T)} (Bayer & Breneis' measure), reported relative,
  ‖K − K̂‖ / ‖K‖ with ‖K‖² = T^{2H}/(2H Γ(H+½)²);
* the **approximation error** ∫_0^T E(B_t − B̂_t)² dt / ∫_0^T E B_t² dt (the time-integrated measure GFDM's weights
  minimise; :attr:`fracsde.MarkovApproxFBM.approximation_error`).

Rules (:func:`markov_rates`):

* ``"geometric"`` — γ_k = γ_max^{(2k−K−1)/(K−1)}/T, weights minimising the approximation error (GFDM's choice and
  the default; unchanged from the first release).
* ``"optimal"`` — rates and weights jointly minimising the strong error: for fixed rates the weights are the
  L²(0, T) projection of K onto span{e^{−γ_k t}}, solved by a Jacobi-scaled Cholesky factorisation (the scaled
  Gram matrix 2√(γ_iγ_j)/(γ_i+γ_j)·(…) is well conditioned however far apart the rates are, where the unscaled one
  reaches cond 1e30); the rates minimise the remaining error over log-rates with its analytic gradient
  (envelope theorem), by L-BFGS, warm-started from the K − 1 solution plus one more rate. ``max_rate`` caps the
  largest rate. Results are computed on [0, 1] and cached; by self-similarity the rule for a horizon T is the one
  for [0, 1] with rates divided by T, with the same relative errors.
* ``"quadrature"`` (H < ½) — Abi Jaber & El Euch's mean-value quadrature of the Laplace measure
  μ(dx) = x^{−H−½} dx/(Γ(H+½)Γ(½−H)) of K on a geometric partition of (0, ξ_K], with the partition's ratio and
  end chosen to minimise the strong error; weights are the quadrature masses (no projection).

Only type II has a kernel on [0, T]; the strong-error rules refuse type I (its MVN representation integrates over
the infinite past, so the strong error of a finite sum is not the same quantity).
"""
from __future__ import annotations

import math
import threading
from typing import NamedTuple

import numpy as np
import torch
from scipy import optimize, special

from . import _validation as V
from .noise import MAX_CANCELLATION, cancellation

__all__ = ["RATE_RULES", "MAX_PROCESSES", "RateRule", "markov_rates", "strong_error", "approximation_error",
           "kernel_projection", "kernel_norm", "projection_condition_number", "refuse_cancelling_weights"]

#: The rate rules :func:`markov_rates` and :class:`fracsde.MarkovApproxFBM` accept.
RATE_RULES = ("geometric", "optimal", "quadrature")

#: Largest K a rule builds (the optimal rule reaches a strong error of 2e−3 at K = 32, H = 0.1).
MAX_PROCESSES = 64

#: The smallest relative strong error float64 resolves (‖K‖² − 2ωᵀc + ωᵀGω carries ~1e−15·‖K‖² of round-off):
#: :func:`strong_error` reports this bound for anything below it.
STRONG_ERROR_FLOOR = 3.2e-8

#: The optimal rule refuses a K whose weights cancel beyond this (|ω|ᵀ|Σ||ω| / ωᵀΣω): at H > ½ the error reaches
#: float64's floor near K ≈ 10 and further rates only trade digits for nothing.
MAX_RULE_CANCELLATION = 1e8

#: Consecutive optimal rates differ by at least this factor: without it a capped search drifts to nearly equal
#: rates with huge cancelling weights (measured: ω = ±5e7 for two rates 1 % apart), which no sampler can use.
MIN_RATE_RATIO = 1.4

#: Rates below this (in units of 1/T) are not searched: e^{−γT} ≥ 0.999 is a constant on [0, T] to 1e−3, and smaller
#: rates only add cancellation (the time-integrated error of H > ½ rules lost every digit at 1e−8).
_MIN_RATE = 1e-3
#: Above this rate (in units of 1/T) nothing changes in float64 (γ^{−H−½} underflows for no H; P(·, γT) = 1).
_MAX_RATE = 1e60


class RateRule(NamedTuple):
    """Rates and weights of a Markov approximation, with both of its error measures (relative).

    Attributes:
        rates: (K,) float64 rates γ_k > 0 (units 1/time), ascending.
        weights: (K,) float64 weights ω_k.
        strong_error: ‖K − K̂‖_{L²(0,T)} / ‖K‖_{L²(0,T)} (sup_t of the root-mean-square path error, relative).
        approximation_error: ∫_0^T E(B − B̂)² dt / ∫_0^T E B² dt at these weights.
        rule: the rule's name.
    """

    rates: torch.Tensor
    weights: torch.Tensor
    strong_error: float
    approximation_error: float
    rule: str


# ------------------------------------------------------------------------------------------------ closed forms
def kernel_norm(hurst: float, horizon: float = 1.0) -> float:
    """‖K‖_{L²(0,T)} = T^H / (Γ(H+½) √(2H)) for the type II kernel K(t) = t^{H−½}/Γ(H+½)."""
    return horizon ** hurst / (math.gamma(hurst + 0.5) * math.sqrt(2 * hurst))


def _gram(g: np.ndarray, horizon: float) -> np.ndarray:
    """G_ij = ∫_0^T e^{−(γ_i+γ_j)t} dt = (1 − e^{−(γ_i+γ_j)T})/(γ_i+γ_j) (T where γ_i+γ_j = 0)."""
    s = g[:, None] + g[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = -np.expm1(-s * horizon) / s
    return np.where(s > 0, out, horizon)


def _inner(hurst: float, g: np.ndarray, horizon: float) -> np.ndarray:
    """c_k = ∫_0^T K(t) e^{−γ_k t} dt = γ_k^{−(H+½)} P(H+½, γ_k T) (T^{H+½}/((H+½)Γ(H+½)) at γ_k = 0)."""
    a = hurst + 0.5
    safe = np.where(g > 0, g, 1.0)
    out = np.exp(-a * np.log(safe)) * special.gammainc(a, safe * horizon)
    return np.where(g > 0, out, horizon ** a / (a * math.gamma(a)))


def _scaled_projection(G: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Solve G ω = c for a Gram matrix of exponentials, accurately at any spread of the rates (torch, float64;
    differentiable in c).

    With D = diag(G)^{−½}, DGD has unit diagonal and (for rates far apart) small off-diagonal entries, so its
    Cholesky factor is accurate where G's own condition number is astronomically large (rates 1e−1..1e27).
    Nearly equal rates make DGD itself singular; then the minimum-norm least-squares solution of the scaled
    system (eigenvalues below 1e−13 dropped) is the projection onto the span the rates can represent.
    """
    d = torch.rsqrt(torch.diagonal(G))
    S = G * d[:, None] * d[None, :]
    L, info = torch.linalg.cholesky_ex(S)
    if int(info) == 0 and float(torch.diagonal(L).min()) ** 2 >= 1e-13:
        z = torch.cholesky_solve((d * c)[:, None], L)[:, 0]
    else:
        evals, evecs = torch.linalg.eigh(S)
        keep = evals > 1e-13 * evals.max()
        kept = evecs[:, keep]
        z = kept @ ((kept.T @ (d * c)) / evals[keep])
    return d * z


def _projection(G: np.ndarray, c: np.ndarray) -> np.ndarray:
    """:func:`_scaled_projection` for the numpy arrays of the rate search."""
    return _scaled_projection(torch.from_numpy(G), torch.from_numpy(c)).numpy()


def _strong_error_sq(hurst: float, g: np.ndarray, w: np.ndarray, horizon: float) -> float:
    """‖K − K̂‖² = ‖K‖² − 2ωᵀc + ωᵀGω for any weights (float64)."""
    G = _gram(g, horizon)
    c = _inner(hurst, g, horizon)
    return kernel_norm(hurst, horizon) ** 2 - 2 * float(w @ c) + float(w @ G @ w)


def strong_error(hurst: float, rates, weights, horizon: float = 1.0) -> float:
    """Relative strong error ‖K − K̂‖_{L²(0,T)} / ‖K‖ of any rates and weights against type II fBM of index H.

    The quadratic form is evaluated as written (no cancellation-free shortcut), so it is the achieved error of these
    weights; at K = 32 with rates to 4e27 it agrees with a 50-digit evaluation to 1e−6 relative (tested). Values at
    or below :data:`STRONG_ERROR_FLOOR` (3.2e−8) mean "below float64's resolution".

    Args:
        hurst: H in (0, 1).
        rates: (K,) rates ≥ 0 (1/time; a zero rate is a plain Brownian component).
        weights: (K,) weights.
        horizon: T > 0.

    Returns:
        The relative strong error (a float).

    Raises:
        ValueError: H or horizon out of range, rates negative or non-finite, lengths differ.
    """
    V.check_hurst(hurst)
    horizon = V.check_positive_float(horizon, "horizon")
    g = np.asarray(torch.as_tensor(rates, dtype=torch.float64).detach().cpu(), dtype=np.float64).reshape(-1)
    w = np.asarray(torch.as_tensor(weights, dtype=torch.float64).detach().cpu(), dtype=np.float64).reshape(-1)
    if g.shape != w.shape:
        raise ValueError(f"rates and weights must have the same length; got {g.size} and {w.size}")
    if not (np.all(np.isfinite(g)) and np.all(g >= 0)):
        raise ValueError(f"rates must be finite and >= 0; got {g.tolist()}")
    e2 = _strong_error_sq(float(hurst), g, w, horizon)
    norm = kernel_norm(float(hurst), horizon)
    return max(math.sqrt(max(e2, 0.0)) / norm, STRONG_ERROR_FLOOR)


def kernel_projection(hurst, rates, horizon: float = 1.0) -> torch.Tensor:
    """Weights of the L²(0, T) projection of the type II kernel onto span{e^{−γ_k t}} (strong-error optimal).

    The Jacobi-scaled Cholesky factor is formed from the rates, so gradients in H are those of a well-conditioned
    triangular solve (the rates are held fixed: a rule's rates are not differentiable, its weights are).

    Args:
        hurst: H in (0, 1), a float or a 0-d tensor (then the result is differentiable in it).
        rates: (K,) rates > 0 (1/time).
        horizon: T > 0.

    Returns:
        (K,) float64 weights.
    """
    from .noise import check_rates
    from .special import gammainc  # torch, differentiable in its first argument

    V.check_hurst(hurst)
    horizon = V.check_positive_float(horizon, "horizon")
    g = check_rates(rates, "rates").to(torch.as_tensor(rates).device)
    G = torch.from_numpy(_gram(g.cpu().numpy(), horizon)).to(g.device)
    h = torch.as_tensor(hurst, dtype=torch.float64, device=g.device)
    a = h + 0.5
    c = torch.exp(-a * torch.log(g)) * gammainc(a, g * horizon)
    return _scaled_projection(G, c)


# ------------------------------------------------------------------------------------------------ optimisation
def _objective(theta: np.ndarray, hurst: float):
    """log ‖K − K̂‖² on [0, 1] at the projected weights, and its gradient in the log-rates (analytic).

    At the projection the weights are stationary, so (envelope theorem) with q(s) = ∫_0^1 t e^{−st} dt,
        ∂E²/∂γ_k = 2ω_k (H+½) γ_k^{−(H+3/2)} P(H+3/2, γ_k) − 2ω_k Σ_j ω_j q(γ_k + γ_j).
    """
    g = np.exp(theta)
    G = _gram(g, 1.0)
    c = _inner(hurst, g, 1.0)
    w = _projection(G, c)
    # the achieved error of the computed weights (not ‖K‖² − cᵀω, which assumes an exact projection), floored
    # where float64 cannot resolve it any more (relative strong error 3e−8)
    norm2 = kernel_norm(hurst) ** 2
    e2 = max(norm2 - 2 * float(w @ c) + float(w @ G @ w), 1e-15 * norm2)
    a = hurst + 1.5
    dc = (hurst + 0.5) * np.exp(-a * np.log(g)) * special.gammainc(a, g)
    s = g[:, None] + g[None, :]
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        q = np.where(s > 1e-4, -np.expm1(-s) / s ** 2 - np.exp(-s) / s, 0.5 - s / 3 + s * s / 8)
    grad = 2 * w * dc - 2 * w * (q @ w)
    return math.log(e2), grad * g / e2


def _optimise(theta0: np.ndarray, hurst: float, upper: float) -> np.ndarray:
    """Local minimum of :func:`_objective` from ``theta0`` (sorted log-rates), by SLSQP under the constraints
    log γ_1 ≥ log(_MIN_RATE), log γ_K ≤ log(upper) and γ_{k+1}/γ_k ≥ :data:`MIN_RATE_RATIO`."""
    K = theta0.size
    lo, hi = math.log(_MIN_RATE), math.log(upper)
    sep = math.log(MIN_RATE_RATIO)
    cons = []
    if K > 1:
        D = np.zeros((K - 1, K))
        D[np.arange(K - 1), np.arange(K - 1)] = -1.0
        D[np.arange(K - 1), np.arange(1, K)] = 1.0
        cons.append({"type": "ineq", "fun": lambda x: D @ x - sep, "jac": lambda x: D})
    res = optimize.minimize(_objective, np.clip(np.sort(theta0), lo, hi), args=(hurst,), jac=True, method="SLSQP",
                            bounds=[(lo, hi)] * K, constraints=cons, options={"maxiter": 1000, "ftol": 1e-12})
    x = np.sort(res.x)
    start = np.clip(np.sort(theta0), lo, hi)
    return x if _objective(x, hurst)[0] <= _objective(start, hurst)[0] else start


_CACHE: dict = {}
_LOCK = threading.Lock()


def _optimal_unit(hurst: float, K: int, cap: float | None) -> np.ndarray:
    """Optimal log-rates on [0, 1] for K processes (cached, with every smaller K of the same chain)."""
    key = (round(hurst, 12), None if cap is None else float(cap))
    with _LOCK:
        chain = _CACHE.setdefault(key, {})
        if K in chain:
            return chain[K]
        upper = _MAX_RATE if cap is None else cap
        k0 = max((k for k in chain if k < K), default=0)
        theta = chain.get(k0)
        if theta is None:
            theta = _optimise(np.zeros(1), hurst, upper)
            chain[1] = theta
            k0 = 1
        for k in range(k0 + 1, K + 1):
            candidates = []
            top = theta[-1] + (theta[-1] - theta[-2] if theta.size > 1 else math.log(10.0))
            if top <= math.log(upper) - 1e-9:
                candidates.append(np.append(theta, top))                       # one rate above the largest
            if not candidates or hurst >= 0.5:
                # capped, or a kernel that is not completely monotone (H ≥ ½: the K = 1 optimum is a
                # near-constant, far from where more rates help): also split every wide gap, extend below, and
                # try anchors across the scales the kernel lives on; keep the best local optimum
                sep = 2 * math.log(MIN_RATE_RATIO)
                gaps = np.flatnonzero(np.diff(theta) >= sep)
                extra = [0.5 * (theta[i] + theta[i + 1]) for i in gaps] + [theta[0] - math.log(10.0)]
                extra += [x for x in np.log([0.3, 1.0, 3.0, 10.0, 30.0, 100.0])
                          if x <= math.log(upper) and np.min(np.abs(theta - x)) >= sep]
                candidates += [np.sort(np.append(theta, x)) for x in extra]
            solutions = [_optimise(start, hurst, upper) for start in candidates]
            theta = min(solutions, key=lambda sol: _objective(sol, hurst)[0])
            chain[k] = theta
        return chain[K]


# ------------------------------------------------------------------------------------------------ quadrature
def _quadrature_unit(hurst: float, K: int, cap: float | None) -> tuple:
    """Mean-value quadrature of μ on the geometric partition 0 < ξ_0 < … < ξ_K (Abi Jaber & El Euch 2019).

    Cell 0 is (0, ξ_0], cell k is (ξ_{k−1}, ξ_k]; mass c = ∫ μ and rate γ = ∫ x μ / c over each cell, in closed
    form (μ(dx) ∝ x^{−H−½} dx). The two free numbers (log ξ_0, log ξ_K) minimise the strong error on [0, 1].
    """
    a = 0.5 - hurst                                         # ∫_0^ξ x^{−H−½} dx = ξ^a / a
    norm = 1.0 / (math.gamma(hurst + 0.5) * math.gamma(0.5 - hurst))

    def rule(params):
        lo, hi = params
        if K == 1:
            edges = np.array([0.0, math.exp(hi)])
        else:
            edges = np.concatenate([[0.0], np.exp(np.linspace(lo, hi, K))])
        upper_mass = edges[1:] ** a / a
        lower_mass = edges[:-1] ** a / a
        mass = norm * (upper_mass - lower_mass)
        first = norm * (edges[1:] ** (a + 1) - edges[:-1] ** (a + 1)) / (a + 1)
        return first / mass, mass

    hi_cap = None if cap is None else math.log(cap)

    def ends(params):
        lo, hi = params
        if hi_cap is not None:                        # the largest rate is below the partition's end ξ_K
            hi = hi_cap - math.log1p(math.exp(-hi)) if hi > -30 else hi_cap + hi
        return lo, hi

    def loss(params):
        g, w = rule(ends(params))
        return math.log(max(_strong_error_sq(hurst, g, w, 1.0), 1e-300))

    results = [optimize.minimize(loss, np.array([lo0, lo0 + 3.0 * K ** 0.5]), method="Nelder-Mead",
                                 options={"xatol": 1e-6, "fatol": 1e-10, "maxiter": 2000}) for lo0 in (-1.0, 1.0)]
    best = min(results, key=lambda res: res.fun)
    return rule(ends(best.x))


def _optimal(hurst: float, K: int, cap: float | None, horizon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rates, weights) of the optimal rule on [0, horizon] (float64 tensors)."""
    g = torch.from_numpy(np.exp(_optimal_unit(hurst, K, cap))) / horizon
    w = torch.from_numpy(_projection(_gram(g.numpy(), horizon), _inner(hurst, g.numpy(), horizon)))
    return g, w


def check_num_processes(num_processes) -> int:
    """K as an int in [1, :data:`MAX_PROCESSES`], or a ValueError naming it, the range and the value."""
    V.check_positive_int(num_processes, "num_processes", 1)
    if num_processes > MAX_PROCESSES:
        raise ValueError(f"num_processes must be in [1, {MAX_PROCESSES}]; got {num_processes} (rates='optimal' "
                         f"already reaches a strong error of 2e-3 at K = 32 for H = 0.1)")
    return int(num_processes)


def refuse_cancelling_weights(rates: torch.Tensor, weights: torch.Tensor, kind: str, horizon: float,
                              condition_number: float, relative_error: float) -> None:
    """Refuse weights of a (geometric) grid that float64 cannot use: they cancel beyond
    :data:`fracsde.noise.MAX_CANCELLATION` in Var B̂, or the solve's error came out negative.

    Raises:
        ValueError: naming num_processes, gamma_max (the largest rate × horizon) and ``rates="optimal"``.
    """
    kappa = cancellation(rates, weights, kind, horizon)
    if kappa > MAX_CANCELLATION or not relative_error >= 0:
        raise ValueError(
            f"the geometric grid with num_processes={rates.numel()} and gamma_max={float(rates.max()) * horizon:g} "
            f"(rates {float(rates.min()):.3g}..{float(rates.max()):.3g}) cannot be solved accurately in float64: "
            f"cond(A) = {condition_number:.1e}, the weights (max |ω| = {float(weights.abs().max()):.3g}) cancel so "
            f"that Var B̂ would lose {math.log10(max(kappa, 1.0)):.0f} of float64's 16 digits. Use fewer processes, "
            f"a larger gamma_max, or rates='optimal' (well-separated rates, accurate at any K)")


def projection_condition_number(rates, horizon: float = 1.0) -> float:
    """2-norm condition number of the Jacobi-scaled Gram matrix the strong-error projection solves (the
    conditioning that matters for :func:`kernel_projection`; the unscaled Gram's reaches 1e30 for rules whose
    scaled one stays below ~1e3)."""
    G = _gram(torch.as_tensor(rates, dtype=torch.float64).detach().cpu().numpy(), horizon)
    d = 1.0 / np.sqrt(np.diag(G))
    return float(np.linalg.cond(G * d[:, None] * d[None, :]))


# ------------------------------------------------------------------------------------------------ public
def check_rule(rates: str) -> str:
    """The rule name, or a ValueError listing :data:`RATE_RULES`."""
    return V.check_choice(rates, "rates", RATE_RULES)


def markov_rates(hurst: float, num_processes: int, rates: str = "geometric", max_rate: float | None = None,
                 horizon: float = 1.0, kind: str = "type2", gamma_max: float = 20.0) -> RateRule:
    """Rates, weights and both error measures of a Markov approximation of fBM, by rule.

    Args:
        hurst: Hurst index H in (0, 1) (``"quadrature"``: H < ½, where the kernel is completely monotone).
        num_processes: K, 1 ≤ K ≤ 64.
        rates: ``"geometric"`` (default, GFDM's grid), ``"optimal"`` or ``"quadrature"`` (see the module docs).
        max_rate: cap on the largest rate, in units of 1/time (the rate the noise will have on [0, horizon]);
            for ``"geometric"`` it sets gamma_max = max_rate·horizon.
        horizon: T > 0; errors are measured on [0, T].
        kind: ``"type2"``; ``"type1"`` only with ``"geometric"`` (the strong error is a type II notion).
        gamma_max: the geometric grid's largest rate in units of 1/horizon (> 1).

    Returns:
        :class:`RateRule` (rates ascending, float64).

    Raises:
        ValueError: for a parameter out of range, naming it, its range and the value.
    """
    V.check_hurst(hurst)
    hurst = float(hurst)
    check_num_processes(num_processes)
    rule = check_rule(rates)
    horizon = V.check_positive_float(horizon, "horizon")
    V.check_kind(kind)
    if max_rate is not None:
        max_rate = V.check_positive_float(max_rate, "max_rate")
    if rule != "geometric" and kind != "type2":
        raise ValueError(f"rates={rule!r} minimises the strong error against the type II (Riemann–Liouville) kernel "
                         f"t^(H-1/2)/Gamma(H+1/2) on [0, T]; type I fBM integrates over the infinite past and has no "
                         f"such kernel on [0, T]. Use kind='type2', or rates='geometric' for type I")
    K = int(num_processes)
    if rule == "geometric":
        from .markov import geometric_gammas, optimal_weights  # the first release's rule, unchanged
        if max_rate is not None:
            gamma_max = max_rate * horizon
        gamma_max = V.check_positive_float(gamma_max, "gamma_max", 1.0)
        g = geometric_gammas(K, gamma_max) / horizon
        sol = optimal_weights(hurst, g, kind, horizon)
        w = sol.weights.detach()
        refuse_cancelling_weights(g, w, kind, horizon, sol.condition_number, float(sol.relative_error))
    else:
        cap = None if max_rate is None else max_rate * horizon
        if cap is not None and cap <= _MIN_RATE * 10:
            raise ValueError(f"max_rate must be > {_MIN_RATE * 10:g}/horizon; got {max_rate:g}")
        if rule == "optimal":
            g, w = _optimal(hurst, K, cap, horizon)
            kappa = cancellation(g, w, "type2", horizon)
            if kappa > MAX_RULE_CANCELLATION:
                usable = max((k for k in range(1, K) if cancellation(*_optimal(hurst, k, cap, horizon), "type2",
                                                                     horizon) <= MAX_RULE_CANCELLATION), default=1)
                best = strong_error(hurst, *_optimal(hurst, usable, cap, horizon), horizon)
                raise ValueError(f"rates='optimal' with num_processes={K} at hurst={hurst:g}: the weights cancel by "
                                 f"{kappa:.1e} (float64 keeps 16 digits) for no gain — num_processes={usable} already "
                                 f"reaches a strong error of {best:.2e}; use num_processes <= {usable}")
        else:
            if not hurst < 0.5:
                raise ValueError(f"rates='quadrature' needs hurst < 0.5 (the kernel is a Laplace transform of a "
                                 f"positive measure only there); got hurst={hurst:g}. Use rates='optimal'")
            g1, w1 = _quadrature_unit(hurst, K, cap)
            g = torch.from_numpy(g1) / horizon
            w = torch.from_numpy(w1 * horizon ** (hurst - 0.5))
    return RateRule(g, w, strong_error(hurst, g, w, horizon), approximation_error(hurst, g, w, horizon, kind), rule)


def approximation_error(hurst: float, rates, weights, horizon: float = 1.0, kind: str = "type2") -> float:
    """∫_0^T E(B_t − B̂_t)² dt / ∫_0^T E B_t² dt of these rates and weights (the time-integrated measure)."""
    from .kinds import get_kind

    g = torch.as_tensor(rates, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64)
    rules = get_kind(kind)
    A = rules.gram(g, horizon)
    b, c = rules.moments(torch.as_tensor(float(hurst), dtype=torch.float64), g, horizon)
    return float((w @ A @ w - 2 * b @ w + c) / c)
