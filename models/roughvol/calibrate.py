"""Calibration of a rough volatility model to an implied-volatility surface through the Markov Monte Carlo pricer.

The objective is the root-mean-square difference of implied vols over the quotes that are not NaN, priced with
fixed random numbers (the generator's state is restored before every evaluation: common random numbers make the
objective a smooth deterministic function of the parameters). ``optimizer="adam"`` descends its pathwise gradient
(every parameter, H included: the rates of the Markov rule are held fixed while H moves, the weights ω(H) follow
it differentiably; the rates are re-derived when H has moved by more than ``rate_refresh``). ``"nelder-mead"``
(scipy) minimises the same objective without gradients, for comparison. Parameters are optimised unconstrained:
H = ½·sigmoid(x), ρ = tanh(x), the positive ones as exp(x).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from .implied import ArbitrageWarning
from .models import RoughBergomi, RoughHeston, _RoughModel

__all__ = ["calibrate", "CalibrationReport", "OPTIMIZERS"]

OPTIMIZERS = ("adam", "nelder-mead")
#: K of the Markov rule during calibration: the objective's gradient, not the last 1e-3 of bias, is what matters
CALIBRATION_PROCESSES = 8


@dataclass
class CalibrationReport:
    """What a calibration did.

    Attributes:
        optimizer: ``"adam"`` or ``"nelder-mead"``.
        iterations: optimiser iterations (Adam steps; Nelder–Mead iterations).
        pricer_calls: Monte Carlo surface evaluations (an Adam step is one call with its gradient).
        seconds: wall time.
        rmse: final root-mean-square implied-vol error over the quotes used.
        start, result: the parameters before and after, by name.
        history: (iteration, rmse) pairs.
    """

    optimizer: str
    iterations: int
    pricer_calls: int
    seconds: float
    rmse: float
    start: dict
    result: dict
    history: list = field(default_factory=list)

    def __str__(self) -> str:
        res = ", ".join(f"{k}={v:.4g}" for k, v in self.result.items())
        return (f"{self.optimizer}: {self.iterations} iterations, {self.pricer_calls} pricer calls, "
                f"{self.seconds:.1f} s, vol RMSE {self.rmse:.2e} -> {res}")


def _to_unconstrained(name: str, value: float) -> float:
    if name == "hurst":
        p = min(max(value / 0.5, 1e-9), 1 - 1e-9)
        return math.log(p / (1 - p))
    if name == "rho":
        return math.atanh(min(max(value, -1 + 1e-12), 1 - 1e-12))
    return math.log(value)


def _to_model(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "hurst":
        return 0.5 * torch.sigmoid(x)
    if name == "rho":
        return torch.tanh(x)
    return torch.exp(x)


def calibrate(model: _RoughModel, log_strikes, maturities, implied_vol, params=("hurst", "eta", "rho"),
              generator: torch.Generator | None = None, paths: int = 1 << 13, steps: int = 64,
              iterations: int = 200, lr: float = 0.1, tol: float = 1e-5, optimizer: str = "adam",
              num_processes: int | None = None, rates="optimal", rate_refresh: float = 0.02,
              verbose: bool = True, print_every: int = 10):
    """Fit some of a model's parameters to implied vols by gradient descent through the Markov pricer.

    Args:
        model: a :class:`RoughBergomi` or :class:`RoughHeston`; its values are the starting point, and the
            parameters not in ``params`` stay fixed.
        log_strikes: (S,) log-strikes.
        maturities: a number or a 1-D tensor (M,) of maturities; each must be a multiple of max(maturities)/steps.
        implied_vol: (S,) or (M, S) market implied vols; NaN quotes are skipped.
        params: names of the parameters to fit (any of the model's).
        generator: fixes the random numbers (its state is restored for every evaluation).
        paths: Monte Carlo paths per evaluation (antithetic pairs, control variate).
        steps: time steps on [0, max(maturities)].
        iterations: the most optimiser iterations.
        lr: Adam's initial learning rate (unconstrained coordinates; it decays tenfold over ``iterations``).
        tol: stop when the vol RMSE is below it.
        optimizer: ``"adam"`` (gradients) or ``"nelder-mead"`` (scipy, no gradients).
        num_processes: K of the Markov rule (default 8).
        rates: a rule name of :func:`fracsde.markov_rates` (its rates fixed at the current H and re-derived after H
            moves by ``rate_refresh``) or explicit rates, held fixed throughout.
        verbose: print progress every ``print_every`` iterations.

    Returns:
        A new model of the same class with the fitted parameters; its attribute ``report`` is a
        :class:`CalibrationReport` (iterations, pricer calls, time, final vol RMSE).

    Raises:
        ValueError: unknown parameter or optimiser, shapes that do not match, no usable quote.
    """
    if not isinstance(model, (RoughBergomi, RoughHeston)):
        raise TypeError(f"model must be a RoughBergomi or RoughHeston; got {type(model).__name__}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {optimizer!r}")
    names = tuple(params)
    unknown = [p for p in names if p not in model._names]
    if not names or unknown:
        raise ValueError(f"params must be a non-empty subset of {model._names}; got {names}")
    k = torch.as_tensor(log_strikes, dtype=torch.float64).reshape(-1)
    mats = torch.as_tensor(maturities, dtype=torch.float64).reshape(-1)
    target = torch.as_tensor(implied_vol, dtype=torch.float64)
    if target.dim() == 1:
        target = target[None, :]
    if target.shape != (mats.numel(), k.numel()):
        raise ValueError(f"implied_vol must have shape (strikes,) = ({k.numel()},) or (maturities, strikes) = "
                         f"({mats.numel()}, {k.numel()}); got {tuple(torch.as_tensor(implied_vol).shape)}")
    usable = torch.isfinite(target)
    if not bool(usable.any()):
        raise ValueError("implied_vol has no finite quote")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    state = generator.get_state()
    K = num_processes or CALIBRATION_PROCESSES
    fixed = {n: float(torch.as_tensor(v, dtype=torch.float64).detach()) for n, v in model.parameters_dict().items()}
    start = {n: fixed[n] for n in names}
    from fracsde import markov_rates

    rule: dict[str, Any] = {"hurst": fixed["hurst"], "rates": None}

    def current_rates(h: float):
        if not isinstance(rates, str):
            return torch.as_tensor(rates, dtype=torch.float64)
        if rule["rates"] is None or abs(h - rule["hurst"]) > rate_refresh:
            rule["hurst"] = h
            horizon = float(mats.max())
            cap = model._defaults().get("max_rate")                  # rough Heston's cap (docs/roughvol.md)
            rule["rates"] = markov_rates(h, K, rates=rates, max_rate=None if cap is None else cap / horizon,
                                         horizon=horizon).rates
        return rule["rates"]

    calls = [0]

    def rmse_of(values: dict) -> torch.Tensor:
        calls[0] += 1
        generator.set_state(state)
        m = type(model)(**{**fixed, **values})
        h = float(torch.as_tensor(values.get("hurst", fixed["hurst"]), dtype=torch.float64).detach())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ArbitrageWarning)        # a NaN vol is masked below
            vol, _ = m.surface(k, mats, paths, steps, generator, K, current_rates(h), torch.float64)
        ok = usable & torch.isfinite(vol)
        if not bool(ok.any()):
            return torch.tensor(math.inf, dtype=torch.float64)
        diff = torch.where(ok, vol - target, torch.zeros_like(vol))
        return torch.sqrt((diff ** 2).sum() / ok.sum())

    def say(it, rmse, values, t0):
        if verbose:
            shown = " ".join(f"{n}={float(torch.as_tensor(v).detach()):.4f}" for n, v in values.items())
            elapsed = time.perf_counter() - t0
            print(f"[calibrate {optimizer}] iter {it:4d}  vol RMSE {rmse:.3e}  {shown}  ({elapsed:.1f} s)", flush=True)

    t0 = time.perf_counter()
    history = []
    if optimizer == "adam":
        x = torch.tensor([_to_unconstrained(n, fixed[n]) for n in names], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([x], lr=lr)
        # the learning rate decays tenfold over the run: fast moves from a distant start, then the narrow valley
        # along which H and η trade off
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.1 ** (i / max(iterations, 1)))
        best: tuple[float, torch.Tensor] = (math.inf, x.detach().clone())
        it = 0
        for it in range(1, iterations + 1):
            opt.zero_grad()
            values = {n: _to_model(n, x[i]) for i, n in enumerate(names)}
            loss = rmse_of(values)
            rmse = float(loss.detach())
            history.append((it, rmse))
            if rmse < best[0]:
                best = (rmse, x.detach().clone())
            if it == 1 or it % print_every == 0:
                say(it, rmse, values, t0)
            if rmse < tol:
                break
            loss.backward()
            opt.step()
            sched.step()
        x_best = best[1]
        result = {n: float(_to_model(n, x_best[i])) for i, n in enumerate(names)}
        final = best[0]
        n_iter = it
    else:
        from scipy.optimize import minimize

        x0 = [_to_unconstrained(n, fixed[n]) for n in names]
        counter = [0]

        def fun(xs):
            with torch.no_grad():
                values = {n: _to_model(n, torch.tensor(float(xs[i]), dtype=torch.float64))
                          for i, n in enumerate(names)}
                return float(rmse_of(values))

        def callback(xk):
            counter[0] += 1
            if counter[0] == 1 or counter[0] % print_every == 0:
                rm = fun(xk)
                calls[0] -= 1                                           # progress output is not part of the cost
                history.append((counter[0], rm))
                say(counter[0], rm, {n: _to_model(n, torch.tensor(float(xk[i]))) for i, n in enumerate(names)}, t0)

        res = minimize(fun, x0, method="Nelder-Mead", callback=callback,
                       options={"maxiter": iterations, "fatol": tol / 10, "xatol": 1e-4})
        result = {n: float(_to_model(n, torch.tensor(float(res.x[i]), dtype=torch.float64)))
                  for i, n in enumerate(names)}
        final = float(res.fun)
        n_iter = int(res.nit)
    report = CalibrationReport(optimizer, n_iter, calls[0], time.perf_counter() - t0, final, start, result, history)
    if verbose:
        print(f"[calibrate] {report}", flush=True)
    fit = type(model)(**{**fixed, **result})
    fit.report = report
    return fit
