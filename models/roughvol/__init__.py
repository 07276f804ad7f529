"""Rough volatility on fracsde's noise layer: rough Bergomi and rough Heston.

    from models.roughvol import RoughBergomi, RoughHeston, calibrate
    model = RoughHeston(hurst=0.1, v0=0.02, theta=0.02, lam=0.3, nu=0.3, rho=-0.7)
    s = model.smile(log_strikes, maturity=1.0, method="fourier")               # semi-analytic
    s = model.smile(log_strikes, maturity=1.0, method="markov", paths=2**17, generator=g)   # Monte Carlo
    RoughBergomi(hurst=0.07, xi=0.235**2, eta=1.9, rho=-0.9).smile(k, 0.25, method="exact", steps=256, paths=2**16)

See docs/roughvol.md for the maths, the checks and the measured figures.
"""
from .calibrate import CalibrationReport, calibrate
from .implied import ArbitrageWarning, black_price, implied_vol
from .models import MARKOV_DEFAULTS, RoughBergomi, RoughHeston, Smile

__all__ = ["RoughBergomi", "RoughHeston", "Smile", "MARKOV_DEFAULTS", "calibrate", "CalibrationReport",
           "implied_vol", "black_price", "ArbitrageWarning"]
