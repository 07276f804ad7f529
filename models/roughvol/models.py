"""Rough Bergomi and rough Heston: parameters, smiles by Monte Carlo (Markov, exact) and by Fourier.

Conventions (S₀ = 1, zero rates, k = log-strike; ../shared/REFERENCE.md §7):

- rough Bergomi: V_t = ξ exp(η Y_t − ½η² Var Y_t), Y_t = √(2H) ∫₀ᵗ (t−s)^{H−½} dW_s, d log S = −½V dt + √V dB,
  d⟨W, B⟩ = ρ dt. Under the Markov approximation Y = √(2H) Γ(H+½) B̂ with B̂ the type II MA-fBM, and Var Y is the
  approximation's own variance, so E V_t = ξ holds exactly for every rule.
- rough Heston: V_t = V₀ + ∫₀ᵗ K(t−s)(θ − λV_s) ds + ∫₀ᵗ K(t−s) ν √V_s dW_s, K(t) = t^{H−½}/Γ(H+½),
  dS = S √V dB, d⟨W, B⟩ = ρ dt (H = ½: Heston with κ = λ, long-run variance θ/λ, vol-of-vol ν).

``method="markov"`` uses only fracsde's public noise layer: the rate rule :func:`fracsde.markov_rates`, the exact
lifted Volterra solver :func:`fracsde.volterra_sdeint` (exact joint factor and Brownian increments; for rough Bergomi
with b = 0, σ = 1, which is exactly B̂; for rough Heston with b = θ − λV and the square-root diffusion written
ν√max(V, 0): the scheme can step below zero, where the truncated coefficients hold V's drift θ − λV > 0 and no
noise — see docs/roughvol.md for the bias this leaves at rough H).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from fracsde import MarkovNoise, optimal_weights

from . import fourier as F
from .exact import joint_factor
from .implied import black_price, implied_vol
from .montecarlo import PriceAccumulator, SpotSums, chunk_sizes, default_chunk, maturity_indices, otm_to_call

__all__ = ["RoughBergomi", "RoughHeston", "Smile", "MARKOV_DEFAULTS"]

#: paths per batch of the streaming Markov samplers (their memory does not depend on the steps: ~2 MB blocks).
STREAM_CHUNK = 1 << 13

#: defaults of ``method="markov"`` by model (rule, K, time steps on [0, T], cap on the rates in units of 1/T).
#: Rough Bergomi: K = 16 leaves a bias below the Monte Carlo error at 2^17 paths on McCrickerd & Pakkanen's case
#: (K = 8: -0.0008 in vol, ~1.7 s.e.). Rough Heston: the optimal rule with K = 3 and its rates capped at 64/T
#: (0.001, 3.1, 64: no cancelling weights, Σω = 8.8; the lifted model is the rough smile to 3e-5), 2048 steps
#: (rate x step = 1/32) so that the left-point square-root scheme resolves every factor: at 2^17 paths, H = 0.1,
#: within 3 s.e. + 0.001 of Fourier with a margin of 0.0009 (seeds 1 and 2), in 8 s on one thread. K = 8 under the
#: same cap packs its rates between 8.5 and 64 with weights of ±1300 (float64 factor increments, 6x slower, and a
#: larger right-wing bias); uncapped rates leave +0.01 in vol at H = 0.1 whatever the steps (docs/roughvol.md).
#: Explicit rates (a tensor) drop the cap; a rule name keeps it.
MARKOV_DEFAULTS = {"RoughBergomi": {"rates": "optimal", "num_processes": 16, "steps": 256},
                   "RoughHeston": {"rates": "optimal", "num_processes": 3, "steps": 2048, "max_rate": 64.0}}


@dataclass
class Smile:
    """An implied-volatility smile at one maturity (tensors over strikes, float64).

    Attributes:
        log_strikes: (S,) k = log K.
        maturity: T in years.
        implied_vol: (S,) Black–Scholes implied vols (NaN where the price has none).
        std_error: (S,) Monte Carlo standard error of the implied vol (delta method: price error / vega); 0 for
            the Fourier and closed-form methods.
        price: (S,) call prices E(S_T − e^k)⁺.
        price_std_error: (S,) standard error of the prices.
        method: the pricing method; info: method details (paths, steps, rule, variance-reduction factors, time).
    """

    log_strikes: torch.Tensor
    maturity: float
    implied_vol: torch.Tensor
    std_error: torch.Tensor
    price: torch.Tensor
    price_std_error: torch.Tensor
    method: str
    info: dict = field(default_factory=dict)


def _check_range(value, name: str, lo: float, hi: float, lo_open: bool = True, hi_open: bool = True):
    """A number or 0-d tensor inside (lo, hi) (brackets per flags); returns it (a tensor keeps its graph)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise TypeError(f"{name} must be a real number or a 0-d floating tensor; got shape {tuple(value.shape)}, "
                            f"dtype {value.dtype}")
        v = float(value.detach())
    else:
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a real number; got {type(value).__name__}") from None
    ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok or math.isnan(v):
        left, right = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ValueError(f"{name} must lie in {left}{lo:g}, {hi:g}{right}; got {v!r}")
    return value.to(torch.float64).reshape(()) if isinstance(value, torch.Tensor) else v


def _value(x) -> float:
    """The float value of a number or a 0-d tensor (detached)."""
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def _as_log_strikes(log_strikes) -> torch.Tensor:
    k = torch.as_tensor(log_strikes, dtype=torch.float64).detach().reshape(-1)
    if k.numel() == 0 or not bool(torch.isfinite(k).all()):
        raise ValueError(f"log_strikes must be a non-empty 1-D array of finite numbers; got {k.tolist()[:8]}")
    return k


def _as_maturity(maturity) -> float:
    try:
        value = _value(maturity)
    except (TypeError, ValueError):
        raise TypeError(f"maturity must be a positive number of years; got {maturity!r}") from None
    return _check_range(value, "maturity", 0.0, math.inf)


def _check_count(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


class _ProjectedNoise(MarkovNoise):
    """Type II Markov noise with fixed rates whose weights are the L²(0, T) kernel projection at ``hurst``
    (recomputed on access, so a tensor ``hurst`` gives weights differentiable in H)."""

    def __init__(self, rates, hurst, horizon: float):
        super().__init__(rates, None, kind="type2", horizon=horizon)
        self.hurst = hurst

    @property
    def weights(self) -> torch.Tensor:
        from fracsde import kernel_projection
        return kernel_projection(self.hurst, self.gammas, self.horizon)


class _RoughModel:
    """Shared parameter handling and the Monte Carlo driver of both models."""

    _names: tuple = ()
    hurst: Any
    rho: Any
    #: set on the model :func:`models.roughvol.calibrate` returns: its :class:`CalibrationReport`
    report: Any = None

    def parameters_dict(self) -> dict:
        """The model's parameters by name (floats, or tensors as given)."""
        return {n: getattr(self, n) for n in self._names}

    def replace(self, **changes):
        """A new model of the same class with some parameters changed."""
        params = self.parameters_dict()
        params.update(changes)
        return type(self)(**params)

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={_value(getattr(self, n)):.6g}" for n in self._names)
        return f"{type(self).__name__}({inner})"

    # -- Markov rule --------------------------------------------------------------------------------------------
    def _noise(self, num_processes: int, rates, horizon: float, max_rate: float | None = None) -> MarkovNoise:
        """The Markov noise for H on [0, horizon]: the rule's rates (at float(H); ``max_rate`` caps them, in units
        of 1/horizon), weights ω(H) by projection."""
        from fracsde import markov_rates
        if isinstance(rates, str):
            cap = None if max_rate is None else max_rate / horizon
            g = markov_rates(_value(self.hurst), num_processes, rates=rates, max_rate=cap, horizon=horizon).rates
        else:
            g = torch.as_tensor(rates, dtype=torch.float64)
        if isinstance(rates, str) and rates == "geometric":
            # the geometric rule's weights minimise the time-integrated error; keep that objective
            h = self.hurst

            class _Geometric(MarkovNoise):
                @property
                def weights(self_):
                    return optimal_weights(h, self_.gammas, "type2", self_.horizon).weights

            return _Geometric(g, None, kind="type2", horizon=horizon)
        return _ProjectedNoise(g, self.hurst, horizon)

    # -- Monte Carlo driver -------------------------------------------------------------------------------------
    def _log_spot_chunks(self, maturities, method, paths, steps, generator, antithetic, chunk, progress, markov):
        """Yield log S at the maturities, (M, n) per chunk — (M, 2, n) with ``antithetic`` (path, partner)."""
        idx, h = maturity_indices(maturities, steps)
        T = float(maturities.max())
        ts = torch.linspace(0.0, T, steps + 1, dtype=torch.float64)
        sampler = self._path_sampler(method, ts, markov)
        n_draw = paths // 2 if antithetic else paths
        width = (markov.get("num_processes", 8) + 3) if method == "markov" else 2 * steps
        sizes = chunk_sizes(n_draw, chunk or getattr(sampler, "chunk", None) or default_chunk(steps, width))
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=paths, desc=f"{type(self).__name__} {method}", unit="path", leave=False)
        try:
            for n in sizes:
                sums = SpotSums(idx, h, self.rho)
                partner = SpotSums(idx, h, self.rho) if antithetic else None
                for first, v_left, dw, mirror in sampler(n, generator):
                    sums.add(first, v_left, dw)
                    if partner is not None and mirror is not None:
                        partner.add(first, *mirror(v_left, dw))
                z = torch.randn(idx.numel(), n, generator=generator, dtype=torch.float64)   # the W⊥ parts
                log_s = sums.log_spot(z)                                                     # (M, n)
                if partner is not None:
                    partner = partner if partner.sum_v is not None else sums   # mirror None: the same V and ΔW
                    log_s = torch.stack([log_s, partner.log_spot(-z)], dim=1)
                if bar is not None:
                    bar.update(2 * n if antithetic else n)
                yield log_s
        finally:
            if bar is not None:
                bar.close()

    def sample_log_spot(self, maturities, paths: int, method: str = "markov", steps: int | None = None,
                        generator: torch.Generator | None = None, antithetic: bool = False,
                        num_processes: int | None = None, rates=None) -> torch.Tensor:
        """Samples of log S_T at each maturity, for payoffs of your own.

        Args:
            maturities: a number or 1-D tensor of maturities (each a multiple of max(maturities)/steps).
            paths: number of paths (even with ``antithetic``: the second half mirrors the first).
            method, steps, generator, num_processes, rates: as in :meth:`smile`.
            antithetic: return antithetic pairs (path i and path i + paths/2 are partners).

        Returns:
            (M, paths) float64 log S_T (M = number of maturities).
        """
        mats = torch.as_tensor(maturities, dtype=torch.float64).reshape(-1)
        paths = _check_count(paths, "paths", 2 if antithetic else 1)
        steps = _check_count(self._defaults()["steps"] if steps is None else steps, "steps")
        chunks = list(self._log_spot_chunks(mats, method, paths, steps, generator, antithetic, None, False,
                                            self._markov_options(num_processes, rates)))
        if antithetic:
            return torch.cat([torch.cat([c[:, 0] for c in chunks], 1), torch.cat([c[:, 1] for c in chunks], 1)], 1)
        return torch.cat(chunks, dim=1)

    def surface(self, log_strikes, maturities, paths: int = 1 << 13, steps: int = 64,
                generator: torch.Generator | None = None, num_processes: int | None = None, rates=None,
                dtype: torch.dtype | None = torch.float64, antithetic: bool = True, control_variate: bool = True):
        """Markov Monte Carlo implied vols on a grid of maturities and strikes, from one set of paths.

        Args:
            log_strikes: (S,) log-strikes.
            maturities: a number or (M,) maturities, each a multiple of max(maturities)/steps.
            paths, steps, generator, num_processes, rates, antithetic, control_variate: as in :meth:`smile`.
            dtype: of the factor paths (default float64 here: the surface is what :func:`calibrate` fits, and the
                same dtype draws the same random numbers).

        Returns:
            (implied_vol, std_error), each (M, S) float64; differentiable in tensor parameters.
        """
        k = _as_log_strikes(log_strikes)
        mats = torch.as_tensor(maturities, dtype=torch.float64).reshape(-1)
        paths = _check_count(paths, "paths", 2 if antithetic else 1)
        steps = _check_count(steps, "steps")
        otm, se, _ = self._mc_prices(k, mats, "markov", paths, steps, generator, antithetic, control_variate, None,
                                     False, self._markov_options(num_processes, rates, dtype))
        _, _, vol, vol_se = self._prices_and_vols(k[None, :].expand(mats.numel(), -1), mats, otm, se)
        return vol, vol_se

    @classmethod
    def _defaults(cls) -> dict:
        return next(MARKOV_DEFAULTS[c.__name__] for c in cls.__mro__ if c.__name__ in MARKOV_DEFAULTS)

    def _markov_options(self, num_processes, rates, dtype=None, max_rate=None) -> dict:
        """The Markov rule's settings; ``max_rate`` (units of 1/T) caps a rule's rates — default the model's cap
        (rough Heston 64, rough Bergomi none); explicit rates are used as given."""
        if num_processes is not None:
            _check_count(num_processes, "num_processes")
        if max_rate is not None:
            _check_range(max_rate, "max_rate", 0.0, math.inf)
        rule = self._defaults()["rates"] if rates is None else rates
        cap = (max_rate if max_rate is not None else self._defaults().get("max_rate")) if isinstance(rule, str) \
            else None
        return {"num_processes": num_processes or self._defaults()["num_processes"], "rates": rule, "dtype": dtype,
                "max_rate": cap}

    def _factor_dtype(self, markov) -> torch.dtype:
        """dtype of the Markov factor paths: as asked, else float64 when a parameter requires a gradient (accurate
        pathwise derivatives) and float32 otherwise (its normals cost a quarter: 2.7x faster paths, measured; the
        library computes in float64 by itself where the weights cancel). Spot and payoffs are always float64."""
        if markov.get("dtype") is not None:
            return markov["dtype"]
        graded = any(isinstance(v, torch.Tensor) and v.requires_grad for v in self.parameters_dict().values())
        return torch.float64 if graded else torch.float32

    def _mc_prices(self, log_strikes, maturities, method, paths, steps, generator, antithetic, control_variate,
                   chunk, progress, markov):
        """OTM prices (M, S) and their standard errors at maturities (M,); ``log_strikes`` (S,) or (M, S)."""
        maturities = torch.as_tensor(maturities, dtype=torch.float64).reshape(-1)
        k = log_strikes if log_strikes.dim() == 2 else log_strikes.expand(maturities.numel(), -1)
        acc = PriceAccumulator(k, antithetic, control_variate)
        for log_s in self._log_spot_chunks(maturities, method, paths, steps, generator, antithetic, chunk, progress,
                                           markov):
            acc.add(log_s)
        otm, se, info = acc.result()
        info.update({"paths": acc.n * (2 if antithetic else 1), "steps": steps, "antithetic": antithetic,
                     "control_variate": control_variate})
        return otm, se, info

    def _prices_and_vols(self, k2, maturities, otm, se):
        """(call price, price s.e., vol, vol s.e.) from OTM prices and errors (M, S)."""
        T = maturities.reshape(-1, 1)
        iv = implied_vol(otm, k2, T, option="otm")
        with torch.enable_grad():
            s = iv.detach().nan_to_num(0.2).requires_grad_(True)
            vega = torch.autograd.grad(black_price(k2, T, s, "otm").sum(), s)[0]
        iv_se = torch.where(vega > 0, se.detach() / vega.clamp(min=1e-300), torch.full_like(vega, math.inf))
        return otm_to_call(otm, k2), se, iv, iv_se

    def _smile_mc(self, log_strikes, maturity, method, paths, steps, generator, antithetic, control_variate,
                  chunk, progress, markov):
        import time
        k = _as_log_strikes(log_strikes)
        T = _as_maturity(maturity)
        paths = _check_count(paths, "paths", 2 if antithetic else 1)
        steps = _check_count(steps, "steps")
        t0 = time.perf_counter()
        otm, se, info = self._mc_prices(k, torch.tensor([T], dtype=torch.float64), method, paths, steps, generator,
                                        antithetic, control_variate, chunk, progress, markov)
        price, pse, iv, ivse = self._prices_and_vols(k[None, :], torch.tensor([T], dtype=torch.float64), otm, se)
        info["seconds"] = time.perf_counter() - t0
        info["control_variance_ratio"] = info["control_variance_ratio"][0]
        info.update(markov if method == "markov" else {})
        return Smile(k, T, iv[0], ivse[0], price[0], pse[0], method, info)


class RoughBergomi(_RoughModel):
    """The rough Bergomi model (Bayer, Friz & Gatheral 2016) with S₀ = 1 and zero rates.

    V_t = ξ exp(η Y_t − ½η² Var Y_t), Y_t = √(2H) ∫₀ᵗ (t−s)^{H−½} dW_s, d log S = −½V dt + √V dB, d⟨W, B⟩ = ρ dt.

    Args:
        hurst: H in (0, ½] (rough: about 0.05–0.15).
        xi: flat forward variance ξ > 0 (e.g. 0.235² for a 23.5 % level).
        eta: vol-of-vol η > 0.
        rho: correlation ρ in [−1, 1].

    Every parameter may be a 0-d float tensor with ``requires_grad``: Monte Carlo prices and vols are then
    differentiable in it (pathwise, common random numbers).

    Raises:
        ValueError / TypeError: a parameter out of range, naming it, the range and the value.
    """

    _names = ("hurst", "xi", "eta", "rho")

    def __init__(self, hurst=0.1, xi=0.04, eta=1.9, rho=-0.9):
        self.hurst = _check_range(hurst, "hurst", 0.0, 0.5, hi_open=False)
        self.xi = _check_range(xi, "xi", 0.0, math.inf)
        self.eta = _check_range(eta, "eta", 0.0, math.inf)
        self.rho = _check_range(rho, "rho", -1.0, 1.0, False, False)

    def _scale(self):
        """√(2H) Γ(H+½): Y = scale · (type II fBM)."""
        H = torch.as_tensor(self.hurst, dtype=torch.float64)
        return torch.sqrt(2 * H) * torch.exp(torch.lgamma(H + 0.5))

    def _path_sampler(self, method, ts, markov):
        """``sample(n, generator)`` → the paths as time blocks ``(first step, V at the left points (n, c), ΔW (n, c),
        mirror)``, ``mirror(V, ΔW)`` the antithetic partner's (V, ΔW) (W → −W; None: the partner has the same V and
        ΔW and mirrors only W⊥). The sampler's ``chunk`` attribute, when set, is the number of paths per call it
        streams best with."""
        xi, eta = self.xi, self.eta
        if method == "exact":
            L = joint_factor(_value(self.hurst), ts[1:])
            N = ts.numel() - 1
            var_y = ts[:-1] ** (2 * torch.as_tensor(self.hurst, dtype=torch.float64))

            def variance(y):
                return xi * torch.exp(eta * y - 0.5 * eta * eta * var_y)

            def sample(n, g):
                z = torch.randn(n, 2 * N, generator=g, dtype=torch.float64)
                yw = z @ L.T
                y = torch.cat([yw.new_zeros(n, 1), yw[:, :N - 1]], dim=1)            # Y at the left points
                w = torch.cat([yw.new_zeros(n, 1), yw[:, N:]], dim=1)
                return [(0, variance(y), torch.diff(w, dim=1), lambda v, dw: (variance(-y), -dw))]

            return sample
        from fracsde import volterra_sdeint
        noise = self._noise(markov["num_processes"], markov["rates"], float(ts[-1]), markov.get("max_rate"))
        omega = noise.weights                                                         # (K,), maybe with grad
        scale = self._scale()
        sigma_t = noise.ou_covariance(ts)                                             # (N + 1, K, K): factors' Cov
        var_y = scale ** 2 * torch.einsum("i,nij,j->n", omega, sigma_t, omega)       # the approximation's own
        factor_dtype = self._factor_dtype(markov)

        # Without a gradient and without an explicit dtype, (B̂, W) stream from their joint innovations
        # (MarkovNoise.sample_blocks): two normals per step whatever K, instead of the K + 1 of the factor recursion
        # (whose weights, unlike the innovations plan, carry a graph to H), and a time block at a time, so memory
        # does not grow with the steps. An explicit dtype keeps the factor recursion either way, so that runs with
        # and without a gradient share their random numbers (as the pathwise-gradient checks need).
        factors = markov.get("dtype") is not None or omega.requires_grad or any(
            isinstance(v, torch.Tensor) and v.requires_grad for v in self.parameters_dict().values())
        if factors:
            unit = _unit_volterra(noise)                                              # b = 0, σ = 1: X = B̂
            var_left = var_y[:-1]

            def variance(y):
                return xi * torch.exp(eta * y - 0.5 * eta * eta * var_left)

            def sample(n, g):
                xs, w = volterra_sdeint(unit, torch.zeros(n, 1, dtype=factor_dtype), ts, generator=g,
                                        return_brownian=True)
                bhat, w = xs[:, :, 0].T.to(torch.float64), w[:, :, 0].T.to(torch.float64)        # (n, N + 1)
                y = scale * bhat[:, :-1]                                              # (n, N) at the left points
                return [(0, variance(y), torch.diff(w, dim=1), lambda v, dw: (variance(-y), -dw))]

            return sample

        # V = exp(η·scale·B̂ + log ξ − ½η² Var Y) in the factor dtype; the partner's V is ξ² e^{−η² Var Y} / V
        level = (math.log(_value(xi)) - 0.5 * _value(eta) ** 2 * var_y).to(factor_dtype)
        level_sq = torch.exp(2 * level.to(torch.float64)).to(factor_dtype)
        slope = _value(eta) * float(scale)

        def stream(n, g):
            for start, bhat, dw in noise.sample_blocks(ts, n, generator=g, dtype=factor_dtype, return_brownian=True,
                                                       left_points=True):
                sq = level_sq[start:start + bhat.shape[1]]
                v = torch.add(level[start:start + bhat.shape[1]], bhat, alpha=slope).exp_()    # V at the left points
                yield start, v, dw, lambda v_, dw_, sq=sq: (sq / v_, -dw_)

        stream.chunk = STREAM_CHUNK
        return stream

    def smile(self, log_strikes, maturity: float, method: str = "markov", paths: int = 1 << 17,
              steps: int | None = None, generator: torch.Generator | None = None, antithetic: bool = True,
              control_variate: bool = True, num_processes: int | None = None, rates=None,
              chunk: int | None = None, progress: bool = False, dtype: torch.dtype | None = None,
              max_rate: float | None = None) -> Smile:
        """The implied-volatility smile at one maturity by Monte Carlo.

        Args:
            log_strikes: (S,) log-strikes k.
            maturity: T > 0 in years.
            method: ``"markov"`` (Markov approximation of Y, sampled exactly on the grid: without a gradient,
                (B̂, W) stream from their joint innovations, O(N) per path and memory flat in N; with one, the factor
                recursion, O(N K²)) or ``"exact"`` (Cholesky of the joint law of (Y, W) on the grid; O(N²) per path).
                Both use the same spot scheme, so on the same grid they differ only by the approximation of Y.
            paths: number of paths (pairs count twice with ``antithetic``).
            steps: equal time steps on [0, T] (default: 256 for markov, 256 for exact).
            generator: a ``torch.Generator`` (fixed seed = common random numbers).
            antithetic: pair every path with its mirror (W, W⊥) → (−W, −W⊥).
            control_variate: use S_T (E S_T = 1) as a control variate.
            num_processes: K of the Markov rule (default :data:`MARKOV_DEFAULTS`).
            rates: the Markov rule's rates: a rule name of :func:`fracsde.markov_rates` or explicit rates (default
                :data:`MARKOV_DEFAULTS`).
            chunk: paths per batch (default: :data:`STREAM_CHUNK` when the paths stream, else about 64 MB of work
                space; memory is bounded by it, not by paths).
            progress: show a tqdm progress bar.
            dtype: of the Markov factor paths (default: float64 when a parameter requires a gradient, else float32,
                whose normals are 4x cheaper; the spot and the payoffs are float64 either way). Without a gradient
                and without ``dtype``, (Y, W) stream from their joint innovations (``MarkovNoise.sample_blocks(...,
                return_brownian=True, left_points=True)``: 2 normals per step instead of K + 1); an explicit
                ``dtype`` keeps the factor recursion, so runs with and without a gradient share random numbers.
            max_rate: cap on a rule's rates in units of 1/T (default: the model's, :data:`MARKOV_DEFAULTS`; rough
                Heston needs one, see docs/roughvol.md); ignored for explicit rates.

        Returns:
            :class:`Smile`.

        Raises:
            ValueError: unknown method, bad counts, maturity ≤ 0.
        """
        if method not in ("markov", "exact"):
            raise ValueError(f"method must be 'markov' or 'exact' for RoughBergomi; got {method!r}")
        steps = self._defaults()["steps"] if steps is None else steps
        markov = self._markov_options(num_processes, rates, dtype, max_rate)
        return self._smile_mc(log_strikes, maturity, method, paths, steps, generator, antithetic, control_variate,
                              chunk, progress, markov)

    def variance_paths(self, ts, paths: int, method: str = "markov", generator=None, num_processes=None, rates=None):
        """(paths, len(ts) − 1) variances V at the left points of the uniform grid ``ts`` (ts[0] = 0), for checks."""
        ts = torch.as_tensor(ts, dtype=torch.float64)
        markov = self._markov_options(num_processes, rates)
        blocks = self._path_sampler(method, ts, markov)(paths, generator)
        return torch.cat([block[1].to(torch.float64) for block in blocks], dim=1)


def _unit_volterra(noise):
    """B̂ itself as a :class:`fracsde.VolterraSDE` (b = 0, σ = 1): stepped exactly, streaming in time."""
    from fracsde import VolterraSDE

    class Unit(VolterraSDE):
        def b(self, t, x):
            return torch.zeros_like(x)

        def sigma(self, t, x):
            return torch.ones_like(x)

    return Unit(noise)


def _heston_variance(noise, theta, lam, nu):
    """The rough Heston variance as a :class:`fracsde.VolterraSDE`: b = θ − λV, σ = ν √max(V, 0)."""
    from fracsde import VolterraSDE

    class HestonVariance(VolterraSDE):
        def b(self, t, x):
            return theta - lam * x

        def sigma(self, t, x):
            return nu * x.clamp(min=0.0).sqrt()

    return HestonVariance(noise)


class RoughHeston(_RoughModel):
    """The rough Heston model (El Euch & Rosenbaum 2019) with S₀ = 1 and zero rates.

    V_t = V₀ + ∫₀ᵗ K(t−s)(θ − λV_s) ds + ∫₀ᵗ K(t−s) ν √V_s dW_s, K(t) = t^{H−½}/Γ(H+½), dS = S √V dB,
    d⟨W, B⟩ = ρ dt. At H = ½ it is Heston with κ = λ, long-run variance θ/λ and vol-of-vol ν.

    Args:
        hurst: H in (0, ½].
        v0: initial variance V₀ > 0.
        theta: drift level θ ≥ 0 (long-run variance θ/λ).
        lam: mean reversion λ ≥ 0.
        nu: vol-of-vol ν > 0.
        rho: correlation ρ in [−1, 1].

    Raises:
        ValueError / TypeError: a parameter out of range, naming it, the range and the value.
    """

    _names = ("hurst", "v0", "theta", "lam", "nu", "rho")

    def __init__(self, hurst=0.1, v0=0.02, theta=0.02, lam=0.3, nu=0.3, rho=-0.7):
        self.hurst = _check_range(hurst, "hurst", 0.0, 0.5, hi_open=False)
        self.v0 = _check_range(v0, "v0", 0.0, math.inf)
        self.theta = _check_range(theta, "theta", 0.0, math.inf, lo_open=False)
        self.lam = _check_range(lam, "lam", 0.0, math.inf, lo_open=False)
        self.nu = _check_range(nu, "nu", 0.0, math.inf)
        self.rho = _check_range(rho, "rho", -1.0, 1.0, False, False)

    def _path_sampler(self, method, ts, markov):
        if method != "markov":
            raise ValueError(f"RoughHeston Monte Carlo supports method='markov' only; got {method!r}")
        from fracsde import volterra_blocks
        noise = self._noise(markov["num_processes"], markov["rates"], float(ts[-1]), markov.get("max_rate"))
        sde = _heston_variance(noise, self.theta, self.lam, self.nu)
        v0 = self.v0
        factor_dtype = self._factor_dtype(markov)

        def sample(n, g):
            # the solution streams in time blocks (fracsde.volterra_blocks): V⁺ at the left points and ΔW of each
            # step are handed to the spot sums block by block, the step across two blocks carried over
            x0 = torch.as_tensor(v0, dtype=factor_dtype).reshape(1, 1).expand(n, 1)
            prev_x = prev_w = None
            for start, xs, ws in volterra_blocks(sde, x0, ts, generator=g):
                x, w, first = xs[:, :, 0].T, ws[:, :, 0].T, start                   # (n, c) at ts[start:start + c]
                if prev_x is not None:
                    x, w, first = torch.cat([prev_x, x], 1), torch.cat([prev_w, w], 1), start - 1
                prev_x, prev_w = x[:, -1:], w[:, -1:]
                if x.shape[1] > 1:
                    # mirror None: V is not odd in W, so the antithetic partner mirrors only W⊥
                    yield first, x[:, :-1].clamp(min=0.0), torch.diff(w, dim=1), None

        graded = any(isinstance(v, torch.Tensor) and v.requires_grad for v in self.parameters_dict().values())
        if not graded:              # memory is flat in the steps without a graph to keep: large path batches
            sample.chunk = STREAM_CHUNK
        return sample

    def smile(self, log_strikes, maturity: float, method: str = "fourier", paths: int = 1 << 17,
              steps: int | None = None, generator: torch.Generator | None = None, antithetic: bool = True,
              control_variate: bool = True, num_processes: int | None = None, rates=None,
              chunk: int | None = None, progress: bool = False, dtype: torch.dtype | None = None,
              max_rate: float | None = None, u_max: float | None = None,
              panel_width: float = 8.0, richardson: bool = True) -> Smile:
        """The implied-volatility smile at one maturity.

        Args:
            log_strikes: (S,) log-strikes k.
            maturity: T > 0 in years.
            method: ``"fourier"`` (fractional Riccati by the Adams scheme + Lewis' formula; ``steps`` defaults to 256,
                Richardson-extrapolated with 512) or ``"markov"`` (Monte Carlo through
                :func:`fracsde.volterra_blocks`; defaults: K = 3, rates capped at 64/T, 2048 steps — uncapped rates
                leave a bias of +0.01 in vol at H = 0.1, see docs/roughvol.md).
            paths: as in :meth:`RoughBergomi.smile`.
            generator: as in :meth:`RoughBergomi.smile`.
            antithetic: as in :meth:`RoughBergomi.smile` (the partner here mirrors W⊥ only: V is not odd in W).
            control_variate: as in :meth:`RoughBergomi.smile`.
            num_processes: as in :meth:`RoughBergomi.smile`.
            rates: as in :meth:`RoughBergomi.smile`.
            chunk: as in :meth:`RoughBergomi.smile`.
            progress: as in :meth:`RoughBergomi.smile`.
            dtype: as in :meth:`RoughBergomi.smile`.
            max_rate: as in :meth:`RoughBergomi.smile`.
            u_max: truncation of the Fourier integral (default: where the tail is below 1e-11 in price).
            panel_width: widest Gauss–Legendre panel of the Fourier integral (16 nodes each).
            richardson: extrapolate the Riccati solutions from grids n and 2n.

        Returns:
            :class:`Smile`.
        """
        if method == "fourier":
            return self._smile_fourier(log_strikes, maturity, steps or 256, u_max, panel_width, richardson)
        if method != "markov":
            raise ValueError(f"method must be 'fourier' or 'markov' for RoughHeston; got {method!r}")
        steps = self._defaults()["steps"] if steps is None else steps
        markov = self._markov_options(num_processes, rates, dtype, max_rate)
        return self._smile_mc(log_strikes, maturity, method, paths, steps, generator, antithetic, control_variate,
                              chunk, progress, markov)

    def log_char_function(self, u, maturity: float, steps: int = 256, richardson: bool = True) -> torch.Tensor:
        """log E e^{iu log S_T} at complex ``u`` (1-D), by the fractional Adams scheme (see ``fourier``)."""
        u = torch.as_tensor(u, dtype=torch.complex128).reshape(-1)
        return F.log_char_function(u, float(maturity), self.hurst, self.v0, self.theta, self.lam, self.nu, self.rho,
                                   steps=steps, richardson=richardson)

    def _smile_fourier(self, log_strikes, maturity, steps, u_max, panel_width, richardson):
        import time
        k = _as_log_strikes(log_strikes)
        T = _as_maturity(maturity)
        steps = _check_count(steps, "steps")
        t0 = time.perf_counter()

        def log_phi(u):
            return self.log_char_function(u, T, steps, richardson)

        if u_max is None:
            u_max = F.truncation(lambda u: self.log_char_function(u, T, steps, False), float(k.abs().max()))
        call = F.lewis_call_prices(k, log_phi, float(u_max), float(panel_width))
        otm = torch.where(k < 0, call - 1.0 + torch.exp(k), call)
        iv = implied_vol(otm, k, T, option="otm")
        zero = torch.zeros_like(call.detach())
        return Smile(k, T, iv, zero, call, zero, "fourier",
                     {"steps": steps, "richardson": richardson, "u_max": float(u_max), "panel_width": panel_width,
                      "seconds": time.perf_counter() - t0})
