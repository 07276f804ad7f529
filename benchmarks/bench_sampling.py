"""Sampling 1024 paths x 1024 steps: fracsde's exact Davies-Harte and MA-fBM against other packages.

Prints one table, side by side for each thread count: times and ratios to torch.randn of the same size
(the floor), plus the ratios the MA-fBM sampler is judged by (against `stochastic`'s exact fBM sampler and
against the full-state sampler it replaces for paths). Run:
    .venv/bin/python benchmarks/bench_sampling.py --threads 1 2 --skip-slow
The machine is shared and noisy: every entry is the min (and the median) of --repeats runs, all in one process,
the methods interleaved round by round so that a burst of load hits all of them alike.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch

from fracsde import FractionalBrownianMotion, MarkovApproxFBM

NEW = "MA-fBM K=3, innovations (default)"
OLD = "MA-fBM K=3, full state (method='state')"
FIRST = "MA-fBM K=3, innovations, first call"
STOCH = "stochastic (Davies-Harte, per path)"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(methods: dict, repeats: int) -> dict:
    """{name: (min, median)} over `repeats` rounds; each round runs every method once (after one warm-up)."""
    for fn in methods.values():
        fn()
    times = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            times[name].append(_timed(fn))
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def methods_for(args) -> dict:
    n, b, h = args.steps, args.paths, args.hurst
    ts = torch.linspace(0, 1, n + 1)
    fbm = FractionalBrownianMotion(h)
    ma = MarkovApproxFBM(h, 3)
    methods = {
        "torch.randn (floor)": lambda: torch.randn(b, n),
        "fracsde Davies-Harte (exact)": lambda: fbm.sample(ts, b, dtype=torch.float32),
        NEW: lambda: ma.sample(ts, b, dtype=torch.float32),
        OLD: lambda: ma.sample(ts, b, dtype=torch.float32, method="state"),
        # a fresh noise each time: the float64 gain recursion and the block operators are built, not cached
        FIRST: lambda: MarkovApproxFBM(h, 3).sample(ts, b, dtype=torch.float32),
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from stochastic.processes.continuous import FractionalBrownianMotion as StochFBM
        proc = StochFBM(hurst=h, t=1.0, rng=np.random.default_rng(0))
        methods[STOCH] = lambda: [proc.sample(n) for _ in range(b)]
    except ImportError:
        print("stochastic not installed; pip install 'fracsde[bench]'")
    if not args.skip_slow:
        try:
            import fbm as fbm_pkg
            methods["fbm (Davies-Harte, per path)"] = lambda: [
                fbm_pkg.FBM(n, h, 1.0, method="daviesharte").fbm() for _ in range(b)]
        except ImportError:
            print("fbm not installed; pip install 'fracsde[bench]'")
    return methods


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--paths", type=int, default=1024)
    p.add_argument("--steps", type=int, default=1024)
    p.add_argument("--hurst", type=float, default=0.7)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="torch thread counts, measured one after the other and printed side by side (0: torch's "
                        "default). 1 gives stable ratios on a loaded machine")
    p.add_argument("--skip-slow", action="store_true", help="skip the `fbm` package (seconds per run)")
    args = p.parse_args(argv)

    default_threads = torch.get_num_threads()
    results = {}
    for threads in args.threads:
        torch.set_num_threads(threads or default_threads)
        methods = methods_for(args)
        results[torch.get_num_threads()] = measure(methods, args.repeats)
    torch.set_num_threads(default_threads)

    cols = list(results)
    names = list(next(iter(results.values())))
    print(f"{args.paths} paths x {args.steps} steps, H = {args.hurst}, float32; min (median) of {args.repeats}")
    head = f"{'method':42s}" + "".join(f" | {f'{c} thread(s): s':>22s} {'/ randn':>13s}" for c in cols)
    print(head)
    print("-" * len(head))
    for name in names:
        line = f"{name:42s}"
        for c in cols:
            (t_min, t_med), (f_min, f_med) = results[c][name], results[c]["torch.randn (floor)"]
            line += f" | {t_min:9.4f} ({t_med:9.4f}) {t_min / f_min:5.1f} ({t_med / f_med:5.1f})"
        print(line)
    print()
    for c in cols:
        r = results[c]
        new_min, new_med = r[NEW]
        parts = [f"innovations / randn = {new_min / r['torch.randn (floor)'][0]:.2f}x "
                 f"(median {new_med / r['torch.randn (floor)'][1]:.2f}x; target <= 3)",
                 f"full state / innovations = {r[OLD][0] / new_min:.1f}x (median {r[OLD][1] / new_med:.1f}x)"]
        if STOCH in r:
            parts.insert(1, f"stochastic / innovations = {r[STOCH][0] / new_min:.1f}x "
                            f"(median {r[STOCH][1] / new_med:.1f}x; target >= 6)")
        print(f"{c} thread(s): " + "; ".join(parts))


if __name__ == "__main__":
    main()
