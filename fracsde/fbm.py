"""Exact fractional Brownian motion: the references every approximation is checked against.

Type I (Mandelbrot–van Ness, "standard" fBM): stationary increments,
    Cov(B_s, B_t) = ½ (s^{2H} + t^{2H} − |t − s|^{2H}).
Type II (Riemann–Liouville): B_t = 1/Γ(H+½) ∫_0^t (t − u)^{H−½} dW_u (covariance by the quadrature of
:func:`fracsde.kinds.rl_covariance`, checked against ₂F₁ and mpmath in the tests).
"""
from __future__ import annotations

import torch

from . import _validation as V
from .kinds import get_kind
from .numerics import is_uniform_grid, psd_factor

__all__ = ["FractionalBrownianMotion"]

METHODS = ("auto", "cholesky", "davies-harte")


class FractionalBrownianMotion:
    """Exact fBM of Hurst index ``hurst``, of ``kind`` "type1" (standard) or "type2" (Riemann–Liouville).

    Args:
        hurst: H in (0, 1), a number or a 0-d tensor (one process; a batch of H is refused).
        kind: ``"type1"`` (Mandelbrot–van Ness, stationary increments; Davies–Harte on uniform grids) or
            ``"type2"`` (Riemann–Liouville; Cholesky).

    Raises:
        ValueError: H outside (0, 1), a tensor of several H, or an unknown kind.

    Example:
        >>> fbm = FractionalBrownianMotion(0.7)
        >>> paths = fbm.sample(torch.linspace(0, 1, 1025), batch_size=4)   # Davies–Harte, (4, 1025)
    """

    def __init__(self, hurst, kind: str = "type1"):
        V.check_hurst(hurst, scalar=True)
        self.hurst = hurst
        self.kind = V.check_kind(kind)

    def __repr__(self) -> str:
        return f"FractionalBrownianMotion(hurst={float(self.hurst):.4g}, kind={self.kind!r})"

    # ------------------------------------------------------------------ covariance
    def variance(self, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return get_kind(self.kind).variance(torch.as_tensor(self.hurst, dtype=torch.float64), t)

    def covariance(self, s, t) -> torch.Tensor:
        """Exact Cov(B_s, B_t), broadcasting over s and t (float64), differentiable in a tensor ``hurst``.

        Type I in closed form; type II by :func:`fracsde.kinds.rl_covariance` (~5e−14 relative to 30-digit
        quadrature).
        """
        s = V.check_finite_times(s, "s")
        t = V.check_finite_times(t, "t")
        if bool((s < 0).any()) or bool((t < 0).any()):
            raise ValueError(f"covariance: times must be non-negative; got min s = {float(s.min())}, "
                             f"min t = {float(t.min())}")
        s, t = torch.broadcast_tensors(s, t)
        return get_kind(self.kind).covariance(torch.as_tensor(self.hurst, dtype=torch.float64), s, t)

    # ------------------------------------------------------------------ sampling
    def sample(self, ts, batch_size: int = 1, method: str = "auto", generator: torch.Generator | None = None,
               dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """Paths ``(batch_size, len(ts))``, exact in law.

        method: "cholesky" (any strictly increasing grid, both kinds, O(N³) once + O(N²) per path),
        "davies-harte" (type I on a grid ts_i = k_i δ with consecutive k_i, O(N log N)), or "auto"
        (Davies–Harte where it applies, else Cholesky).
        """
        V.check_batch_size(batch_size)
        V.check_choice(method, "method", METHODS)
        dtype, out_dtype = V.sampling_dtypes(dtype)          # float16/bfloat16: computed in float32
        device = V.check_device(device) if device is not None else torch.device("cpu")
        ts64 = V.as_times(ts, dtype=torch.float64).cpu()
        if method == "auto":
            stationary = get_kind(self.kind).stationary_increments
            method = "davies-harte" if stationary and _uniform_from_zero(ts64) is not None else "cholesky"
        if method == "davies-harte":
            if not get_kind(self.kind).stationary_increments:
                raise ValueError("method='davies-harte' needs stationary increments: only kind='type1'; "
                                 "use method='cholesky' for type2")
            step = _uniform_from_zero(ts64)
            if step is None:
                raise ValueError("method='davies-harte' needs a uniform grid whose points are multiples of the "
                                 "step (ts[i] = (k0 + i) * dt, e.g. torch.linspace(0, T, n)); use method='cholesky' "
                                 "for other grids")
            return self._davies_harte(ts64, step, batch_size, generator, dtype, device).to(out_dtype)
        return self._cholesky(ts64, batch_size, generator, dtype, device).to(out_dtype)

    def _cholesky(self, ts, batch_size, generator, dtype, device):
        out = torch.zeros(batch_size, ts.numel(), dtype=dtype, device=device)
        pos = ts > 0
        tp = ts[pos]
        if tp.numel() == 0:
            return out
        cov = self.covariance(tp[:, None], tp[None, :])
        L = psd_factor(cov).to(device=device, dtype=dtype)
        z = torch.randn(batch_size, tp.numel(), generator=generator, dtype=dtype, device=device)
        out[:, pos.to(device)] = z @ L.T
        return out

    def _davies_harte(self, ts, step, batch_size, generator, dtype, device):
        k0 = int(round(float(ts[0]) / step))
        n = k0 + ts.numel() - 1          # number of increments from 0 to ts[-1]
        if n == 0:
            return torch.zeros(batch_size, ts.numel(), dtype=dtype, device=device)
        H = float(self.hurst)
        # autocovariance of unit-step fractional Gaussian noise, lags 0..n
        k = torch.arange(n + 1, dtype=torch.float64)
        acov = 0.5 * ((k + 1) ** (2 * H) - 2 * k ** (2 * H) + (k - 1).abs() ** (2 * H))
        row = torch.cat([acov, acov[1:-1].flip(0)])   # circulant of size m = 2n
        m = row.numel()
        lam = torch.fft.fft(row).real
        if bool((lam < -1e-10 * lam.abs().max()).any()):   # never seen for fGn; kept as a guard
            raise RuntimeError("Davies–Harte: circulant embedding is not positive semi-definite")
        scale = torch.sqrt(torch.clamp(lam, min=0.0) / m).to(device)
        cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        # one complex FFT gives two independent real paths (real and imaginary parts)
        half = (batch_size + 1) // 2
        zr = torch.randn(half, m, generator=generator, dtype=dtype, device=device)
        zi = torch.randn(half, m, generator=generator, dtype=dtype, device=device)
        w = torch.complex(zr, zi).to(cdtype) * scale.to(cdtype)
        f = torch.fft.fft(w, dim=-1)[:, :n]
        fgn = torch.cat([f.real, f.imag], dim=0)[:batch_size].to(dtype)
        paths = torch.cumsum(fgn, dim=-1) * (step ** H)
        full = torch.cat([paths.new_zeros(batch_size, 1), paths], dim=1)
        return full[:, k0:].contiguous()


def _uniform_from_zero(ts: torch.Tensor) -> float | None:
    """Return δ if ts[i] = (k0 + i) δ for an integer k0 ≥ 0 (within round-off), else None."""
    if ts.numel() < 2:
        return float(ts[0]) if ts.numel() == 1 and float(ts[0]) > 0 else None
    if not is_uniform_grid(ts):
        return None
    step = float(torch.diff(ts).mean())
    k0 = float(ts[0]) / step
    if abs(k0 - round(k0)) > 1e-4:
        return None
    return step
