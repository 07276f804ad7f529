"""Which diffusion times the score-matching loss trains on: a density over the log-SNR λ.

With σ̃ and c fixed by the dynamics, the ε-loss at time t is a loss at the noise level λ(t) = 2 log(c/σ̃); the
choice of t-distribution is a weighting over λ (Kingma et al. 2021; Karras et al. 2022):

* ``"uniform"`` — t ~ U(t_eps, T), the paper's: λ has the density 1/|λ′(t)| / (T − t_eps). For FVP(0.9, 3) most
  of that mass sits at λ > 4, where ε is hardest to predict and least useful (docs/gfdm.md).
* ``"log-snr"`` / ``"log-snr:LO,HI"`` — λ ~ U(LO, HI) (default: λ(T) to min(λ(t_eps), 15)): every noise level
  between pure noise and below pixel quantisation weighted alike.
* ``"edm"`` — EDM's log-normal on the noise level σ = σ̃/c = e^{−λ/2}: ln σ ~ N(−1.2, 1.2²), i.e.
  λ ~ N(2.4, 2.4²), truncated to the model's range.
* ``"like:SPEC"`` — the λ-distribution another dynamics has under uniform t (e.g. ``"like:vp"``), truncated to
  the range both models share; so with EDM preconditioning this model trains on exactly the (input,
  conditioning, target) pairs the other one does there.

Every sampler draws λ first and maps it to t = ``dynamics.time_at_log_snr(λ)`` (uniform draws t directly, so the
paper's recipe is unchanged). Truncation is exact and needs no rejection loop: the allowed λ interval is mapped
through the (monotone) inverse CDF once, at construction. λ is also capped where σ̃ falls below the
resolution of the training dtype relative to c·x₀ (:data:`LOG_SNR_CAP`): float32 cannot hold u = c x₀ + σ̃ ε
there (the noise would be rounded away), so such pairs are never trained on.
"""
from __future__ import annotations

import math

import torch
from torch.special import ndtr, ndtri

from fracsde.linear import LinearFractionalDynamics

__all__ = ["TimeSampler", "time_sampler", "TIME_SAMPLINGS", "LOG_SNR_CAP", "log_snr_cap"]

TIME_SAMPLINGS = ("uniform", "log-snr", "edm", "like:SPEC")
#: training never uses σ̃/c below 16 ulps of the dtype (4 bits of noise; float32: λ ≤ 26.3, float64: λ ≤ 66.4)
LOG_SNR_CAP_ULPS = 16.0
#: default upper end of "log-snr": σ̃/c = e^{−7.5} = 5.5e−4, below 8-bit quantisation of [−1, 1] (7.8e−3)
LOG_SNR_DEFAULT_HIGH = 15.0
#: EDM's log-normal noise levels (P_mean, P_std of ln σ)
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2


def log_snr_cap(dtype: torch.dtype) -> float:
    """Largest λ whose noise σ̃ survives rounding of u = c x₀ + σ̃ ε in ``dtype`` (unit-scale data)."""
    return -2.0 * math.log(LOG_SNR_CAP_ULPS * torch.finfo(dtype).eps)


LOG_SNR_CAP = {torch.float32: log_snr_cap(torch.float32), torch.float64: log_snr_cap(torch.float64)}


class TimeSampler:
    """Draws training times for one dynamics, one rule (see the module docstring); no host sync per draw.

    Args:
        dynamics: the model's dynamics.
        rule: ``"uniform"``, ``"log-snr"``, ``"log-snr:LO,HI"``, ``"edm"`` or ``"like:SPEC"``.
        t_eps: the smallest time (its λ(t_eps) bounds λ from above).
        dtype: the training dtype (sets the float-resolution cap on λ).
    """

    def __init__(self, dynamics: LinearFractionalDynamics, rule: str = "uniform", t_eps: float = 1e-5,
                 dtype: torch.dtype = torch.float32):
        if not isinstance(rule, str):
            raise TypeError(f"time_sampling must be a string; got {type(rule).__name__}")
        self.dynamics, self.rule, self.t_eps = dynamics, rule, float(t_eps)
        T = dynamics.horizon
        lam_T = dynamics.log_snr_range[0]
        lam_eps = float(dynamics.log_snr(torch.tensor(self.t_eps, dtype=torch.float64)))
        self.cap = LOG_SNR_CAP.get(dtype, log_snr_cap(dtype))
        #: the λ interval training may use: [λ(T), min(λ(t_eps), cap)]
        self.log_snr_bounds = (lam_T, min(lam_eps, self.cap))
        #: the times it may use (the cap raises t_eps where λ(t_eps) exceeds it)
        self.t_min = float(dynamics.time_at_log_snr(self.log_snr_bounds[1])) if lam_eps > self.cap else self.t_eps
        name, _, arg = rule.partition(":")
        if name == "uniform" and not arg:
            self._draw = self._uniform
        elif name == "log-snr":
            lo, hi = self._parse_range(arg) if arg else (lam_T, min(self.log_snr_bounds[1], LOG_SNR_DEFAULT_HIGH))
            self.interval = (lo, hi)
            self._draw = self._log_snr
        elif name == "edm" and not arg:
            mean, std = -2.0 * EDM_P_MEAN, 2.0 * EDM_P_STD             # λ = −2 ln σ
            lo, hi = self.log_snr_bounds
            self.normal = (mean, std)
            self.cdf_interval = (float(ndtr(torch.tensor((lo - mean) / std, dtype=torch.float64))),
                                 float(ndtr(torch.tensor((hi - mean) / std, dtype=torch.float64))))
            self._draw = self._edm
        elif name == "like" and arg:
            self._setup_like(arg, T)
            self._draw = self._like
        else:
            raise ValueError(f"time_sampling must be one of 'uniform', 'log-snr', 'log-snr:LO,HI', 'edm', "
                             f"'like:SPEC' (e.g. 'like:vp'); got {rule!r}")

    # ------------------------------------------------------------------ set-up
    def _parse_range(self, arg: str):
        try:
            lo, hi = (float(v) for v in arg.split(","))
        except ValueError:
            raise ValueError(f"time_sampling {self.rule!r}: expected 'log-snr:LO,HI' with two numbers") from None
        blo, bhi = self.log_snr_bounds
        if not (blo <= lo < hi <= bhi):
            raise ValueError(f"time_sampling {self.rule!r}: the λ range must lie inside the model's "
                             f"[{blo:.4g}, {bhi:.4g}] (λ(T) to λ(t_eps), capped at {self.cap:.3g} for the dtype) "
                             f"with LO < HI; got [{lo:g}, {hi:g}]")
        return lo, hi

    def _setup_like(self, text: str, T: float):
        import warnings

        from fracsde import PriorMismatchWarning

        from .spec import DynamicsSpec
        try:
            spec = DynamicsSpec.parse(text)
        except ValueError as e:
            raise ValueError(f"time_sampling {self.rule!r}: the dynamics after 'like:' does not parse: {e}") from None
        with warnings.catch_warnings():          # its prior is not used, only its λ-distribution
            warnings.simplefilter("ignore", PriorMismatchWarning)
            other = spec.build().to(self.dynamics.gammas.device)
        self.other = other
        lo, hi = self.log_snr_bounds
        # other's uniform times that map into the shared λ range: an interval, since λ_other is monotone
        other_lo, other_hi = other.log_snr_range
        other_eps = float(other.log_snr(torch.tensor(self.t_eps, dtype=torch.float64)))
        if max(lo, other_lo) >= min(hi, other_eps):
            raise ValueError(f"time_sampling {self.rule!r}: {spec.label} and this model share no log-SNR range")
        t_a = self.t_eps if other_eps <= hi else float(other.time_at_log_snr(hi))
        t_b = other.horizon if other_lo >= lo else float(other.time_at_log_snr(lo))
        self.other_times = (max(t_a, self.t_eps), min(t_b, other.horizon))

    # ------------------------------------------------------------------ draws
    def _uniform(self, n, generator, device):
        T = self.dynamics.horizon
        return self.t_min + (T - self.t_min) * torch.rand(n, generator=generator, dtype=torch.float64, device=device)

    def _to_time(self, lam):
        return self.dynamics.time_at_log_snr(lam, check=False)

    def _log_snr(self, n, generator, device):
        lo, hi = self.interval
        lam = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64, device=device)
        return self._to_time(lam)

    def _edm(self, n, generator, device):
        a, b = self.cdf_interval
        q = a + (b - a) * torch.rand(n, generator=generator, dtype=torch.float64, device=device)
        mean, std = self.normal
        lam = (mean + std * ndtri(q)).clamp(*self.log_snr_bounds)
        return self._to_time(lam)

    def _like(self, n, generator, device):
        a, b = self.other_times
        t_other = a + (b - a) * torch.rand(n, generator=generator, dtype=torch.float64, device=device)
        lam = self.other.log_snr(t_other, check=False).clamp(*self.log_snr_bounds)   # round-off at the ends
        return self._to_time(lam)

    def __call__(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """(n,) float64 training times on ``device``."""
        return self._draw(n, generator, device)

    def __repr__(self) -> str:
        lo, hi = self.log_snr_bounds
        return f"TimeSampler({self.rule!r}, log_snr_bounds=({lo:.3g}, {hi:.3g}))"


_CACHE: dict[tuple, TimeSampler] = {}


def time_sampler(dynamics: LinearFractionalDynamics, rule, t_eps: float, dtype: torch.dtype) -> TimeSampler:
    """The :class:`TimeSampler` for (dynamics, rule, t_eps, dtype), built once (a rule string is parsed and any
    ``like:`` dynamics built only the first time); a :class:`TimeSampler` is returned as is."""
    if isinstance(rule, TimeSampler):
        return rule
    key = (id(dynamics), rule, float(t_eps), dtype, str(dynamics.gammas.device))
    hit = _CACHE.get(key)
    if hit is not None and hit.dynamics is dynamics:
        return hit
    if len(_CACHE) > 64:
        _CACHE.clear()
    sampler = _CACHE[key] = TimeSampler(dynamics, rule, t_eps, dtype)
    return sampler
