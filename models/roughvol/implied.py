"""Black–Scholes prices and implied volatility (forward 1, zero rates), vectorised and differentiable.

All prices here are per unit forward: S₀ = 1, zero rates, strike K = e^k for a log-strike k, maturity T in years.
The inversion uses Peter Jäckel's "Let's Be Rational" (PyPI ``vollib``, module ``lets_be_rational``), which is
accurate to machine precision everywhere, including the far wings where Newton's method fails. The out-of-the-money
option is inverted (put for k < 0, call for k ≥ 0) because its price carries no intrinsic value to cancel.

Gradients of the implied volatility are those of the implicit function C_BS(k, T, σ) = p:
dσ/dp = 1/vega, dσ/dk = −(∂C_BS/∂k)/vega, dσ/dT = −(∂C_BS/∂T)/vega.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from fracsde import FracsdeWarning

__all__ = ["ArbitrageWarning", "black_price", "implied_vol", "OPTIONS"]

OPTIONS = ("call", "put", "otm")


class ArbitrageWarning(FracsdeWarning):
    """An option price lies outside the no-arbitrage bounds; its implied volatility is NaN."""


def _phi(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.erfc(-x / math.sqrt(2.0))


def _as_float64(x, like: torch.Tensor | None = None) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64)
    return t if like is None else t.to(like.device)


def black_price(log_strike, maturity, vol, option: str = "call") -> torch.Tensor:
    """Black–Scholes price of a European option on a unit forward (S₀ = 1, zero rates).

    Args:
        log_strike: k = log K (any real; tensor or number), broadcast with ``maturity`` and ``vol``.
        maturity: T > 0 in years.
        vol: Black–Scholes volatility σ ≥ 0 (annualised).
        option: ``"call"``, ``"put"`` or ``"otm"`` (the put for k < 0, the call for k ≥ 0).

    Returns:
        The price, float64 (differentiable in all three inputs).

    Raises:
        ValueError: for an unknown ``option``.
    """
    if option not in OPTIONS:
        raise ValueError(f"option must be one of {OPTIONS}; got {option!r}")
    k = _as_float64(log_strike)
    t = _as_float64(maturity)
    s = _as_float64(vol)
    total = s * torch.sqrt(t)
    strike = torch.exp(k)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    d1 = -k / safe + 0.5 * safe
    d2 = d1 - safe
    # each option from its own formula: parity (P = C − 1 + K) would cancel catastrophically in the wings
    call = torch.where(total > 0, _phi(d1) - strike * _phi(d2), (1.0 - strike).clamp(min=0.0))
    put = torch.where(total > 0, strike * _phi(-d2) - _phi(-d1), (strike - 1.0).clamp(min=0.0))
    if option == "call":
        return call
    if option == "put":
        return put
    return torch.where(k < 0, put, call)


def _bounds(k: np.ndarray, option: str):
    """(lower, upper) no-arbitrage bounds of the option's price, strictly exclusive, for unit forward."""
    strike = np.exp(k)
    if option == "call":
        return np.maximum(1.0 - strike, 0.0), np.ones_like(k)
    if option == "put":
        return np.maximum(strike - 1.0, 0.0), strike
    return np.zeros_like(k), np.where(k < 0, strike, 1.0)


def _invert(price: np.ndarray, k: np.ndarray, t: np.ndarray, option: str) -> np.ndarray:
    """Implied vols by Let's Be Rational, element by element; NaN outside the bounds (counted, not warned)."""
    from lets_be_rational import implied_volatility_from_a_transformed_rational_guess as lbr

    lower, upper = _bounds(k, option)
    out = np.full(price.shape, np.nan)
    strike = np.exp(k)
    for i in np.ndindex(price.shape):
        p, lo, hi = price[i], lower[i], upper[i]
        if not (np.isfinite(p) and lo < p < hi and t[i] > 0):
            continue
        # invert the out-of-the-money option: it has no intrinsic part to cancel in the wings
        if k[i] >= 0:
            q = 1.0
            otm = p if option in ("call", "otm") else p + 1.0 - strike[i]
        else:
            q = -1.0
            otm = p if option in ("put", "otm") else p - 1.0 + strike[i]
        if not otm > 0:
            continue
        try:
            out[i] = lbr(float(otm), 1.0, float(strike[i]), float(t[i]), q)
        except Exception:               # LBR's own range errors (above maximum / below intrinsic): no vol
            out[i] = np.nan
    return out


class _ImpliedVol(torch.autograd.Function):
    @staticmethod
    def forward(ctx, price, k, t, option):
        p, kk, tt = (x.detach().cpu().numpy() for x in (price, k, t))
        sigma = torch.from_numpy(_invert(p, kk, tt, option)).to(price.device)
        ctx.option = option
        ctx.save_for_backward(k, t, sigma)
        return sigma

    @staticmethod
    def backward(ctx, grad):
        k, t, sigma = ctx.saved_tensors
        with torch.enable_grad():
            kk = k.detach().requires_grad_(True)
            tt = t.detach().requires_grad_(True)
            ss = sigma.detach().requires_grad_(True)
            c = black_price(kk, tt, ss, ctx.option)
            dk, dt, vega = torch.autograd.grad(c.sum(), (kk, tt, ss))
        ok = torch.isfinite(sigma) & (vega > 0)
        inv_vega = torch.where(ok, 1.0 / torch.where(ok, vega, torch.ones_like(vega)), torch.zeros_like(vega))
        g = torch.where(ok, grad, torch.zeros_like(grad))
        return g * inv_vega, -g * dk * inv_vega, -g * dt * inv_vega, None


def implied_vol(price, log_strike, maturity, option: str = "call", warn: bool = True) -> torch.Tensor:
    """Black–Scholes implied volatility of option prices on a unit forward (S₀ = 1, zero rates).

    Vectorised: ``price``, ``log_strike`` and ``maturity`` broadcast together (e.g. prices (maturities, strikes)
    with log-strikes (strikes,) and maturities (maturities, 1)). Differentiable in all three through the implicit
    function theorem (dσ/dp = 1/vega); the gradient is 0 where the vol is NaN.

    Args:
        price: option prices per unit forward.
        log_strike: k = log K.
        maturity: T > 0 in years.
        option: ``"call"``, ``"put"`` or ``"otm"`` (put for k < 0, call for k ≥ 0).
        warn: issue an :class:`ArbitrageWarning` when some prices lie outside the no-arbitrage bounds.

    Returns:
        float64 implied vols, NaN where the price is not strictly inside its no-arbitrage bounds (for a call,
        max(1 − K, 0) < C < 1): such a price has no implied volatility, and a clipped one would be wrong.

    Raises:
        ValueError: unknown ``option`` or a maturity ≤ 0.
    """
    if option not in OPTIONS:
        raise ValueError(f"option must be one of {OPTIONS}; got {option!r}")
    p = _as_float64(price)
    k, t = _as_float64(log_strike, p), _as_float64(maturity, p)
    if bool((t <= 0).any()) or not bool(torch.isfinite(t).all()):
        raise ValueError(f"maturity must be finite and > 0; got {t.detach().cpu().flatten().tolist()[:8]}")
    p, k, t = torch.broadcast_tensors(p, k, t)
    sigma = _ImpliedVol.apply(p, k, t, option)
    bad = torch.isnan(sigma) & torch.isfinite(p)
    if warn and bool(bad.any()):
        n = int(bad.sum())
        warnings.warn(f"{n} of {p.numel()} {option} prices lie outside the no-arbitrage bounds (or have no "
                      f"representable vol); their implied vol is NaN", ArbitrageWarning, stacklevel=2)
    return sigma
