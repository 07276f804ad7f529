"""The Markov approximation of fractional Brownian motion (MA-fBM).

fBM is not Markov, but its kernel is a superposition of exponentials, so a weighted sum of
K Ornstein–Uhlenbeck processes driven by ONE Brownian motion W approximates it:

    dY_k = −γ_k Y_k dt + dW_t,     B̂_t = Σ_k ω_k Y_k(t)              (type II, Y(0) = 0)
                                   B̂_t = Σ_k ω_k (Y_k(t) − Y_k(0))  (type I, Y(0) stationary)

(Harms & Stefanovits 2019; Daems et al. 2024; Nobis et al. 2024). The weights ω minimise
∫_0^T E[(B_t − B̂_t)²] dt, a quadratic ωᵀAω − 2bᵀω + c with closed-form A, b, c, solved in
float64 (the kind-specific A, b, c live in :mod:`fracsde.kinds`). Everything here is a torch op, so ω is
differentiable in the Hurst index. Sampling, covariances and the initial state come from
:class:`fracsde.MarkovNoise`, which this class extends.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import nn

from . import _validation as V
from ._warnings import ApproximationWarning, IllConditionedWarning
from .kinds import get_kind
from .noise import MarkovNoise, check_rates
from .rules import (
    MAX_PROCESSES,
    RATE_RULES,
    check_num_processes,
    check_rule,
    kernel_projection,
    markov_rates,
    projection_condition_number,
    refuse_cancelling_weights,
)
from .rules import strong_error as _rule_strong_error

__all__ = ["MarkovApproxFBM", "geometric_gammas", "optimal_weights", "WeightSolution", "RATE_RULES", "MAX_PROCESSES"]

#: ApproximationWarning above this relative L2 error (half of ∫E[B²] missed), or below 0 (a broken solve)
LARGE_APPROXIMATION_ERROR = 0.5

#: Above this condition number of A the weight solve loses > 10 of float64's 16 digits.
ILL_CONDITIONED = 1e10


def geometric_gammas(num_processes: int, gamma_max: float = 20.0, dtype=torch.float64, device=None) -> torch.Tensor:
    """Geometric rate grid centred at 1: γ_k = γ_max^{(2k − K − 1)/(K − 1)}, k = 1..K (K = 1 gives [1]).

    Args:
        num_processes: K ≥ 1.
        gamma_max: the largest rate, > 1 (units: 1/horizon; the smallest is 1/gamma_max).
        dtype: of the returned tensor.
        device: of the returned tensor.

    Returns:
        (K,) ascending rates.

    Raises:
        ValueError: num_processes < 1 or gamma_max ≤ 1, naming the value.
    """
    V.check_positive_int(num_processes, "num_processes", 1)
    gamma_max = V.check_positive_float(gamma_max, "gamma_max", 1.0)
    if num_processes == 1:
        return torch.ones(1, dtype=dtype, device=device)
    k = torch.arange(1, num_processes + 1, dtype=torch.float64)
    exponents = (2 * k - num_processes - 1) / (num_processes - 1)
    return (gamma_max ** exponents).to(dtype=dtype, device=device)


class WeightSolution(NamedTuple):
    """The L2-optimal weights for one Hurst index (0-d ``hurst``) or a batch of them (``hurst`` of shape (*B,))."""

    weights: torch.Tensor          # (*B, K) float64 ((K,) for one H)
    relative_error: torch.Tensor   # (*B,): relative L2 error 1 − bᵀω / c (0-d for one H)
    condition_number: float        # cond(A), 2-norm; A does not depend on H, so one number serves the batch


def _solve_weights(h: torch.Tensor, g: torch.Tensor, kind: str, horizon: float):
    """Unchecked float64 solve (no host syncs) for H of shape (*B,): returns (ω (*B, K), relative error (*B,), A).

    A depends on the rates only, so all H share it: one solve with the (K, prod B) right-hand sides.
    """
    rules = get_kind(kind)
    A = rules.gram(g, horizon)
    b, c = rules.moments(h, g, horizon)
    K = g.numel()
    w = torch.linalg.solve(A, b.reshape(-1, K).T).T.reshape(b.shape)
    return w, 1 - (b * w).sum(-1) / c, A


def optimal_weights(hurst, gammas, kind: str = "type2", horizon: float = 1.0) -> WeightSolution:
    """L2-optimal MA-fBM weights on [0, horizon], solved in float64 (differentiable in ``hurst``).

    ``hurst`` is a number, a 0-d tensor, or a tensor of any shape (*B,): all are solved at once (one
    batched right-hand side against the shared Gram matrix), giving weights (*B, K) and errors (*B,).

    Args:
        hurst: H in (0, 1): a number or a tensor (*B,).
        gammas: (K,) distinct rates > 0 (1/time).
        kind: ``"type1"`` or ``"type2"``.
        horizon: T > 0; the weights minimise the time-integrated error on [0, T].

    Returns:
        :class:`WeightSolution` (weights, relative_error, condition_number).

    Raises:
        ValueError: an out-of-range H, kind or horizon, or repeated rates.
    """
    V.check_kind(kind)
    horizon = V.check_positive_float(horizon, "horizon")
    V.check_hurst(hurst)
    g = torch.as_tensor(gammas).to(torch.float64)
    check_rates(g)
    if g.numel() > 1 and torch.unique(g).numel() < g.numel():
        raise ValueError(f"gammas must be distinct (repeated rates make the weight system singular); "
                         f"got {g.tolist()}")
    h = torch.as_tensor(hurst, dtype=torch.float64, device=g.device)
    w, rel, A = _solve_weights(h, g, kind, horizon)
    return WeightSolution(w, rel, float(torch.linalg.cond(A.detach())))


def _integrated_error(h, g, w, kind: str, horizon: float) -> torch.Tensor:
    """Time-integrated relative error ∫E(B − B̂)² / ∫E B² of rates g and weights w (torch; differentiable in h, w)."""
    rules = get_kind(kind)
    A = rules.gram(g, horizon)
    b, c = rules.moments(h, g, horizon)
    return (w @ A @ w - 2 * b @ w + c) / c


def _integrated_error_roundoff(h, g, w, kind: str, horizon: float) -> float:
    """The round-off scale of :func:`_integrated_error`: 1e−14 × (|w|ᵀ|A||w| + 2|b|ᵀ|w| + c)/c. A value within
    it of 0 is 0 (the error is below what float64 resolves), not negative."""
    rules = get_kind(kind)
    A = rules.gram(g, horizon)
    b, c = rules.moments(h, g, horizon)
    w = w.abs()
    return float(1e-14 * (w @ A.abs() @ w + 2 * b.abs() @ w + c) / c)


class MarkovApproxFBM(MarkovNoise):
    """Markov approximation of fBM: a :class:`~fracsde.MarkovNoise` whose weights are L2-optimal for H.

    Args:
        hurst: Hurst index H in (0, 1).
        num_processes: K, 1 ≤ K ≤ 64, number of OU processes (ignored when ``gammas`` is given).
        gamma_max: > 1, the largest rate of the geometric grid in units of 1/horizon (GFDM uses 20 on [0, 1]):
            the rates are γ_max^{(2k−K−1)/(K−1)}/horizon, so by self-similarity the approximation error is the same
            at every horizon. With K = 1 the grid is [1/horizon]; :attr:`gamma_max` is always the largest rate.
        gammas: explicit positive rates; overrides the rule.
        kind: ``"type2"`` (Riemann–Liouville, Y(0) = 0) or ``"type1"`` (Mandelbrot–van Ness,
            stationary OU start, B̂_t = Σω(Y(t) − Y(0))).
        horizon: T > 0, the interval [0, T] on which ω is optimal.
        learnable_hurst: make H an ``nn.Parameter`` (stored as logit(H), so it stays in (0, 1));
            ω is then recomputed, differentiably, on every access of :attr:`weights`. The rates stay those of the
            initial H (a rule's rates are not differentiable; ω(H) for fixed rates is).
        rates: the rate rule (:data:`fracsde.rules.RATE_RULES`): ``"geometric"`` (default; GFDM's grid, weights
            minimising the time-integrated error, identical to the first release), ``"optimal"`` (rates and weights
            minimising the strong error — use it for rough H) or ``"quadrature"`` (H < ½). See
            :func:`fracsde.markov_rates` and docs/markov.md.
        max_rate: cap on the largest rate in 1/time units (for explicit solvers: keep max_rate·dt ≲ 1); with
            ``"geometric"`` it sets gamma_max = max_rate·horizon.

    Raises:
        ValueError: a parameter out of range, or a geometric grid whose weights cannot be solved accurately in
            float64 (too many processes for the grid's span: use ``rates="optimal"``).

    Example:
        >>> noise = MarkovApproxFBM(hurst=0.7, num_processes=3)
        >>> paths = noise.sample(torch.linspace(0, 1, 101), batch_size=8)   # (8, 101)
        >>> rough = MarkovApproxFBM(hurst=0.1, num_processes=8, rates="optimal")
        >>> round(float(rough.strong_error), 4)
        0.0763
    """

    _hurst: torch.Tensor
    _relative_error: torch.Tensor
    hurst_logit: nn.Parameter

    def __init__(self, hurst: float, num_processes: int = 3, gamma_max: float = 20.0,
                 gammas=None, kind: str = "type2", horizon: float = 1.0, learnable_hurst: bool = False,
                 rates: str = "geometric", max_rate: float | None = None):
        if isinstance(hurst, torch.Tensor) and hurst.numel() != 1:
            raise ValueError(f"hurst must be a single Hurst index (a noise drives one process); got a tensor of shape "
                             f"{tuple(hurst.shape)}. For many H use fracsde.optimal_weights(hurst_tensor, gammas) or "
                             f"fracsde.distributions.FractionalOU(hurst_tensor, ...)")
        V.check_hurst(hurst)
        V.check_kind(kind)
        horizon = V.check_positive_float(horizon, "horizon")
        rule = check_rule(rates)
        if gammas is None:
            check_num_processes(num_processes)
            if rule == "geometric":
                if max_rate is not None:
                    if gamma_max != 20.0:
                        raise ValueError("give gamma_max or max_rate for the geometric grid, not both "
                                         f"(gamma_max={gamma_max!r}, max_rate={max_rate!r})")
                    gamma_max = V.check_positive_float(max_rate, "max_rate") * horizon
                gamma_max = V.check_positive_float(gamma_max, "gamma_max", 1.0)
                g = geometric_gammas(num_processes, gamma_max) / horizon
            else:
                g = markov_rates(float(hurst), num_processes, rule, max_rate, horizon, kind).rates
        else:
            if rule != "geometric":
                raise ValueError(f"give gammas or rates={rule!r}, not both (gammas fixes the rates)")
            g = check_rates(gammas)
        self.rate_rule = rule if gammas is None else "given"
        #: what the weights minimise: the time-integrated error ("integrated", the first release's) or the
        #: strong error ("strong": the L²(0, T) projection of the kernel, for the strong-error rules)
        self.weight_objective = "strong" if rule != "geometric" else "integrated"
        h0 = torch.as_tensor(float(hurst), dtype=torch.float64)
        if self.weight_objective == "strong":
            w0 = kernel_projection(h0, g, horizon).detach()
            condition_number = projection_condition_number(g, horizon)
            rel = float(_integrated_error(h0, g, w0, kind, horizon))
            if -_integrated_error_roundoff(h0, g, w0, kind, horizon) <= rel < 0:
                rel = 0.0                                       # below float64's resolution, not negative
        else:
            sol = optimal_weights(h0, g, kind, horizon)
            w0 = sol.weights.detach()
            condition_number, rel = sol.condition_number, float(sol.relative_error)
            refuse_cancelling_weights(g, w0, kind, horizon, condition_number, rel)
        super().__init__(g, None if learnable_hurst else w0, kind=kind, horizon=horizon)
        self.learnable_hurst = bool(learnable_hurst)
        if self.learnable_hurst:
            self.hurst_logit = nn.Parameter(torch.logit(h0))
        else:
            self.register_buffer("_hurst", h0)
        if self.weight_objective == "integrated" and condition_number > ILL_CONDITIONED:
            warnings.warn(
                f"MA-fBM weight system is ill-conditioned (cond(A) = {condition_number:.2e} for K = {g.numel()}, "
                f"gamma_max = {self.gamma_max:g}); solved in float64 the achieved relative L2 error is "
                f"{rel:.3e}. More processes barely help at fixed gamma_max; "
                f"rates='optimal' does not have this problem.",
                IllConditionedWarning, stacklevel=2)
        #: cond(A) of the integrated-error solve (geometric, given rates), or of the Jacobi-scaled Gram matrix of the
        #: strong-error projection (the strong-error rules)
        self.condition_number = condition_number
        if not 0.0 <= rel <= LARGE_APPROXIMATION_ERROR:
            warnings.warn(
                f"the MA-fBM with K = {g.numel()} processes (rates {float(g.min()):.3g}..{float(g.max()):.3g}) "
                f"approximates {kind} fBM of H = {float(h0):g} on [0, {horizon:g}] with a relative L2 error of "
                f"{rel:.3g} (outside [0, {LARGE_APPROXIMATION_ERROR:g}]); more processes, a larger gamma_max or "
                f"rates='optimal' reduce it (docs/markov.md)", ApproximationWarning, stacklevel=2)
        if not self.learnable_hurst:
            self.register_buffer("_relative_error", torch.as_tensor(rel, dtype=torch.float64))

    # ------------------------------------------------------------------ parameters
    @property
    def hurst(self) -> torch.Tensor:
        if self.learnable_hurst:
            return torch.sigmoid(self.hurst_logit)
        return self._hurst

    def _solve(self):
        g = self.gammas.to(torch.float64)
        if self.weight_objective == "strong":
            w = kernel_projection(self.hurst, g, self.horizon)
            return w, _integrated_error(self.hurst, g, w, self.kind, self.horizon)
        w, rel, _ = _solve_weights(self.hurst, g, self.kind, self.horizon)
        return w, rel

    @property
    def weights(self) -> torch.Tensor:
        """(K,) weights ω (float64; differentiable in H when it is learnable)."""
        if self.learnable_hurst:
            return self._solve()[0]
        return self._weights

    @property
    def approximation_error(self) -> torch.Tensor:
        """Relative time-integrated L2 error ∫E[(B − B̂)²] / ∫E[B²] over [0, horizon] at the current weights."""
        if self.learnable_hurst:
            return self._solve()[1]
        return self._relative_error

    @property
    def strong_error(self) -> torch.Tensor:
        """Relative strong error ‖K − K̂‖_{L²(0,T)} / ‖K‖ (= √(sup_{t≤T} E|B_t − B̂_t|²) / ‖K‖), type II only.

        The measure of Bayer & Breneis; ``"optimal"`` minimises it. A 0-d float64 tensor (not differentiable).
        """
        if self.kind != "type2":
            raise ValueError("strong_error is defined against the type II kernel t^(H-1/2)/Gamma(H+1/2); this noise "
                             "is type1 (use approximation_error)")
        w = self.weights.detach()
        return torch.tensor(_rule_strong_error(float(self.hurst.detach()), self.gammas, w, self.horizon),
                            dtype=torch.float64)

    def extra_repr(self) -> str:
        return (f"hurst={float(self.hurst.detach()):.4g}, num_processes={self.num_processes}, "
                f"rates={self.rate_rule!r}, "
                f"kind={self.kind!r}, "
                f"gamma_max={self.gamma_max:g}, horizon={self.horizon:g}, learnable_hurst={self.learnable_hurst}")
