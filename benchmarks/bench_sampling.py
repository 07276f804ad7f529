"""Sampling 1024 paths x 1024 steps: fracsde's exact Davies-Harte and MA-fBM against other packages.

Prints one table of times and ratios to torch.randn of the same size (the floor). Run:
    .venv/bin/python benchmarks/bench_sampling.py
The machine is shared and noisy: each entry is the best of --repeats runs, all in one process.
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from fracsde import FractionalBrownianMotion, MarkovApproxFBM


def best_time(fn, repeats):
    fn()  # warm-up (first-call allocations, FFT plans)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--paths", type=int, default=1024)
    p.add_argument("--steps", type=int, default=1024)
    p.add_argument("--hurst", type=float, default=0.7)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: torch's default). 1 gives stable ratios on a loaded machine, where "
                        "OpenMP threads of many small ops wait on each other")
    p.add_argument("--skip-slow", action="store_true", help="skip the `fbm` package (seconds per run)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n, b, h = args.steps, args.paths, args.hurst
    ts = torch.linspace(0, 1, n + 1)
    fbm = FractionalBrownianMotion(h)
    ma = MarkovApproxFBM(h, 3)
    rows = [
        ("torch.randn (floor)", best_time(lambda: torch.randn(b, n), args.repeats)),
        ("fracsde Davies-Harte (exact, float32)", best_time(lambda: fbm.sample(ts, b, dtype=torch.float32),
                                                            args.repeats)),
        ("fracsde MA-fBM K=3 (float32)", best_time(lambda: ma.sample(ts, b, dtype=torch.float32), args.repeats)),
    ]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from stochastic.processes.continuous import FractionalBrownianMotion as StochFBM
        proc = StochFBM(hurst=h, t=1.0, rng=np.random.default_rng(0))
        rows.append(("stochastic (Davies-Harte, per path)",
                     best_time(lambda: [proc.sample(n) for _ in range(b)], max(1, args.repeats // 2))))
    except ImportError:
        print("stochastic not installed; pip install 'fracsde[bench]'")
    if not args.skip_slow:
        try:
            import fbm as fbm_pkg
            rows.append(("fbm (Davies-Harte, per path)",
                         best_time(lambda: [fbm_pkg.FBM(n, h, 1.0, method="daviesharte").fbm() for _ in range(b)],
                                   1)))
        except ImportError:
            print("fbm not installed; pip install 'fracsde[bench]'")
    floor = rows[0][1]
    ref = dict(rows)
    print(f"{b} paths x {n} steps, H = {h}, torch threads = {torch.get_num_threads()}")
    print(f"{'method':42s} {'time [s]':>10s} {'/ randn':>9s}")
    for name, t in rows:
        print(f"{name:42s} {t:10.4f} {t / floor:9.1f}")
    stoch = ref.get("stochastic (Davies-Harte, per path)")
    if stoch:
        print(f"\nstochastic / MA-fBM       = {stoch / ref['fracsde MA-fBM K=3 (float32)']:.1f}x")
        print(f"stochastic / Davies-Harte = {stoch / ref['fracsde Davies-Harte (exact, float32)']:.1f}x")


if __name__ == "__main__":
    main()
