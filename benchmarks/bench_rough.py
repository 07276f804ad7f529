"""The rough-regime noise layer, measured: rule construction, sampling at K = 16 vs K = 3, exponential Euler vs Euler.

One run prints three tables with side-by-side ratios (the machine is shared and noisy: absolute times mean little;
each entry is the min and the median of --repeats rounds, the methods interleaved round by round):

1. building a rule from a cold cache (`markov_rates`): geometric, optimal (K = 8, 16, 32: the chain 1..K), quadrature;
2. sampling B̂ (1024 paths × 1024 steps, float32): optimal K = 16 against geometric K = 3, both samplers, and
   (B̂, W) jointly (return_brownian) by the joint innovations (2 normals per step) and by the full state (K + 1);
3. one solver step of dX = −X dt + ½ dB̂ (1024 paths, 100 steps): exponential_euler with the optimal K = 16 rule
   (rates to 3e17, where every explicit method diverges) against torchsde's Euler with geometric K = 3 (rates ≤ 20),
   and exponential_euler at K = 3;
4. the measured strong order of exponential_euler on an Itô fGBM dX = 0.1X dt + 0.5X dB̂ (geometric K = 3, H = 0.7),
   whose exact solution X = exp(0.1t + 0.5B̂ − ⅛(Σω)²t) is known on the same path (2000 paths, seed 5).

    .venv/bin/python benchmarks/bench_rough.py --threads 1
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import numpy as np
import torch

import fracsde.rules as rules
from fracsde import FractionalSDE, MarkovApproxFBM, markov_rates, sdeint


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(methods: dict, repeats: int, warm: bool = True) -> dict:
    if warm:
        for fn in methods.values():
            fn()
    times = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            times[name].append(timed(fn))
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def table(title: str, results: dict, baseline: str, unit: float = 1.0, unit_name: str = "s") -> str:
    base = results[baseline][0]
    lines = [f"\n{title}", f"| method | min {unit_name} | median {unit_name} | min / baseline |", "|---|---|---|---|"]
    for name, (lo, med) in results.items():
        lines.append(f"| {name} | {lo / unit:.4g} | {med / unit:.4g} | {lo / base:.2f} |")
    return "\n".join(lines)


class AdditiveOU(FractionalSDE):
    noise_type, sde_type = "additive", "ito"

    def f(self, t, x):
        return -x

    def g(self, t, x):
        return torch.full((x.shape[0], 1, 1), 0.5, dtype=x.dtype)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a shared machine)")
    p.add_argument("--repeats", type=int, default=5, help="rounds per table (min and median reported)")
    p.add_argument("--hurst", type=float, default=0.1, help="Hurst index of the rough rules")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    h = args.hurst
    print(f"torch {torch.__version__}, {args.threads} thread(s), H = {h}, repeats = {args.repeats}")

    def cold(rule, K):
        def run():
            rules._CACHE.clear()
            markov_rates(h, K, rule)
        return run

    build = {"geometric K=8": cold("geometric", 8)}
    build.update({f"optimal K={K} (chain 1..K)": cold("optimal", K) for K in (8, 16, 32)})
    build["quadrature K=16"] = cold("quadrature", 16)
    print(table("1. rule construction, cold cache", measure(build, args.repeats, warm=False), "geometric K=8"))

    ts = torch.linspace(0, 1, 1025)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        k3 = MarkovApproxFBM(h, 3)
    k16 = MarkovApproxFBM(h, 16, rates="optimal")
    sampling = {
        "geometric K=3, innovations": lambda: k3.sample(ts, 1024, dtype=torch.float32),
        "optimal K=16, innovations": lambda: k16.sample(ts, 1024, dtype=torch.float32),
        "geometric K=3, state": lambda: k3.sample(ts, 1024, dtype=torch.float32, method="state"),
        "optimal K=16, state": lambda: k16.sample(ts, 1024, dtype=torch.float32, method="state"),
        "optimal K=16, (B̂, W) joint innovations": lambda: k16.sample(ts, 1024, dtype=torch.float32,
                                                                   return_brownian=True, method="innovations"),
        "optimal K=16, (B̂, W) state": lambda: k16.sample(ts, 1024, dtype=torch.float32, return_brownian=True,
                                                         method="state"),
    }
    print(table("2. sampling 1024 paths x 1024 steps, float32", measure(sampling, args.repeats),
                "geometric K=3, innovations"))

    x0 = torch.zeros(1024, 1)
    grid = torch.linspace(0, 1, 11)
    steps = 100
    solve = {
        "euler, geometric K=3": lambda: sdeint(AdditiveOU(k3), x0, grid, method="euler", dt=1 / steps, entropy=0),
        "exponential_euler, geometric K=3": lambda: sdeint(AdditiveOU(k3), x0, grid, method="exponential_euler",
                                                           dt=1 / steps, entropy=0),
        "exponential_euler, optimal K=16": lambda: sdeint(AdditiveOU(k16), x0, grid, method="exponential_euler",
                                                          dt=1 / steps, entropy=0),
    }
    print(table(f"3. per solver step, 1024 paths, {steps} steps (times are per step)", measure(solve, args.repeats),
                "euler, geometric K=3", unit=steps * 1e-3, unit_name="ms/step"))
    print(strong_order())


class ItoGBM(FractionalSDE):
    noise_type, sde_type = "scalar", "ito"

    def f(self, t, x):
        return 0.1 * x

    def g(self, t, x):
        return (0.5 * x).unsqueeze(-1)


def strong_order(paths: int = 2000) -> str:
    """E|X_1 − X_1^exact| against dt for exponential_euler (float64), and the fitted slope."""
    noise = MarkovApproxFBM(0.7, 3)
    qv = float(noise.weights.sum()) ** 2
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    dts = [2.0 ** -k for k in range(4, 11)]
    errs = []
    for dt in dts:
        xs, bhat = sdeint(ItoGBM(noise), torch.ones(paths, 1, dtype=torch.float64), ts, method="exponential_euler",
                          dt=dt, return_noise=True, generator=torch.Generator().manual_seed(5))
        exact = torch.exp(0.1 + 0.5 * bhat[-1] - 0.125 * qv)
        errs.append(float((xs[-1] - exact).abs().mean()))
    slope = float(np.polyfit(np.log(dts), np.log(errs), 1)[0])
    lines = ["\n4. strong error of exponential_euler on an Itô fGBM (geometric K=3, H=0.7, 2000 paths)",
             "| dt | E|X_1 - exact| |", "|---|---|"]
    lines += [f"| 2^-{int(round(-math.log2(dt)))} | {e:.3e} |" for dt, e in zip(dts, errs, strict=True)]
    lines.append(f"fitted strong order (slope of log error on log dt): {slope:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
