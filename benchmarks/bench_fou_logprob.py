"""FractionalOU.log_prob (parallel-scan Kalman filter, O(n)) against the dense multivariate normal (O(n³)).

For each length n the script times, on a uniform grid over [0, 1]:
  * kalman      — build FractionalOU and evaluate log_prob (the transitions, the scan, the terms);
  * kalman+grad — the same plus the backward pass to the Hurst index;
  * dense build — the closed-form n×n covariance (x_covariance, O(n²));
  * dense lp    — MultivariateNormal(covariance).log_prob: Cholesky + solve, O(n³);
and prints one table with the times, the dense/kalman ratio and the growth factor from the
previous n next to the linear (n ratio) and cubic (n ratio³) predictions. Dense sizes above
--dense-max are not run; their time is extrapolated as t(n_max)·(n/n_max)³ and marked "~".

Example:
    python benchmarks/bench_fou_logprob.py                       # n = 128, 1024, 8192
    python benchmarks/bench_fou_logprob.py --dense-max 1024      # extrapolate the dense 8192
"""
from __future__ import annotations

import argparse
import time

import torch

from fracsde.distributions import FractionalOU, x_covariance


def _time(fn, repeats: int) -> float:
    fn()                                   # warm-up (allocations, caches)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 1024, 8192], help="lengths len(ts)")
    parser.add_argument("--dense-max", type=int, default=8192, help="largest n for which the dense MVN is run")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (best of) for the fast paths")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--hurst", type=float, default=0.7)
    parser.add_argument("--num-processes", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    f64 = torch.float64

    rows = []
    for n in sorted(args.sizes):
        ts = torch.linspace(0, 1, n + 1, dtype=f64)[1:]
        hurst = torch.tensor(args.hurst, dtype=f64)
        dist = FractionalOU(hurst, 2.0, 1.0, ts, 0.05, num_processes=args.num_processes)
        torch.manual_seed(0)
        y = dist.sample()

        def kalman():
            return FractionalOU(hurst, 2.0, 1.0, ts, 0.05, num_processes=args.num_processes).log_prob(y)

        def kalman_grad():
            h = hurst.clone().requires_grad_()
            FractionalOU(h, 2.0, 1.0, ts, 0.05, num_processes=args.num_processes).log_prob(y).backward()

        t_k = _time(kalman, args.repeats)
        t_kg = _time(kalman_grad, args.repeats)
        row = dict(n=n, kalman=t_k, kalman_grad=t_kg, measured=n <= args.dense_max)
        if row["measured"]:
            reps = args.repeats if n <= 2048 else 1
            cov = {}

            def build():
                cov["C"] = x_covariance(dist) + 0.05 ** 2 * torch.eye(n, dtype=f64)

            def dense_lp():
                mvn = torch.distributions.MultivariateNormal(dist.mean, covariance_matrix=cov["C"])
                return mvn.log_prob(y)

            row["build"] = _time(build, reps)
            row["dense"] = _time(dense_lp, reps)
            row["diff"] = float((dense_lp() - kalman()).abs())
            cov.clear()
        rows.append(row)

    # extrapolate the dense times beyond --dense-max from the largest measured size (cubic / quadratic)
    ref = max((r for r in rows if r["measured"]), key=lambda r: r["n"], default=None)
    for r in rows:
        if not r["measured"] and ref is not None:
            s = r["n"] / ref["n"]
            r["dense"] = ref["dense"] * s ** 3
            r["build"] = ref["build"] * s ** 2
            r["diff"] = float("nan")

    print(f"FractionalOU log_prob vs dense MVN (H={args.hurst}, K={args.num_processes}, float64, "
          f"{args.threads} thread(s)); times in ms, best of {args.repeats}; '~' = extrapolated")
    head = (f"{'n':>6} | {'kalman':>9} | {'kalman+grad':>11} | {'dense build':>11} | {'dense lp':>11} | "
            f"{'dense/kalman':>12} | {'kalman growth (lin)':>19} | {'dense growth (cubic)':>20} | {'|Δ log p|':>9}")
    print(head)
    print("-" * len(head))
    prev = None
    for r in rows:
        mark = "" if r["measured"] else "~"
        dense_total = r.get("build", float("nan")) + r.get("dense", float("nan"))
        if prev is None:
            kg = dg = "-"
        else:
            s = r["n"] / prev["n"]
            kg = f"x{r['kalman'] / prev['kalman']:.1f} ({s:.0f})"
            dg = f"x{r['dense'] / prev['dense']:.0f} ({s ** 3:.0f})" if r["measured"] and prev["measured"] else "-"
        print(f"{r['n']:>6} | {1e3 * r['kalman']:>9.2f} | {1e3 * r['kalman_grad']:>11.2f} | "
              f"{mark + format(1e3 * r['build'], '.1f'):>11} | {mark + format(1e3 * r['dense'], '.1f'):>11} | "
              f"{mark + format(dense_total / r['kalman'], '.1f'):>12} | {kg:>19} | {dg:>20} | {r['diff']:>9.1e}")
        prev = r


if __name__ == "__main__":
    main()
