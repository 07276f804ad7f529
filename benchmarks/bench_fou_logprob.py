"""FractionalOU.log_prob (parallel-scan Kalman filter, O(n)) against the dense multivariate normal (O(n³)).

For each length n the script times, on a uniform grid over [0, 1]:
  * kalman      — build FractionalOU and evaluate log_prob (the transitions, the scan, the terms);
  * kalman+grad — the same plus the backward pass to the Hurst index;
  * dense build — the closed-form n×n covariance (x_covariance, O(n²));
  * dense lp    — MultivariateNormal(covariance).log_prob: Cholesky + solve, O(n³);
and prints one table with the times, the dense/kalman ratio and the growth factor from the
previous n next to the linear (n ratio) and cubic (n ratio³) predictions. Dense sizes above
--dense-max are not run; their time is extrapolated as t(n_max)·(n/n_max)³ and marked "~".

Then, for --series S series of length --length n with S different Hurst indices (hierarchical models, NUTS
over many series), log_prob + its gradient in every H, in one table with the ratios:
  * loop over series — one FractionalOU per series, log_probs summed, one backward;
  * batched — one FractionalOU over all series, all ω(H) in one solve and (uniform grid) the scan
    specialised to shared step matrices;
each also as the code before issue 13 ran it (ω solved one H at a time, the general associative scan).

Example:
    python benchmarks/bench_fou_logprob.py                       # n = 128, 1024, 8192; then 64 series x 1000
    python benchmarks/bench_fou_logprob.py --dense-max 1024      # extrapolate the dense 8192
    python benchmarks/bench_fou_logprob.py --sizes --series 64 --length 1000 --repeats 5   # only the batch table
"""
from __future__ import annotations

import argparse
import time

import torch

from fracsde.distributions import FractionalOU, x_covariance
from fracsde.markov import optimal_weights


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
    parser.add_argument("--sizes", type=int, nargs="*", default=[128, 1024, 8192],
                        help="lengths len(ts) of the Kalman-vs-dense table (none: skip it)")
    parser.add_argument("--series", type=int, default=64, help="series (and distinct H) of the batch table (0: skip)")
    parser.add_argument("--length", type=int, default=1000, help="length of each series in the batch table")
    parser.add_argument("--dense-max", type=int, default=8192, help="largest n for which the dense MVN is run")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (best of) for the fast paths")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--hurst", type=float, default=0.7)
    parser.add_argument("--num-processes", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.sizes:
        size_table(args)
    if args.series:
        batch_table(args)


def batch_table(args):
    """log_prob + gradient for S series with S different H: batched against the per-H loop."""
    f64 = torch.float64
    S, n, K = args.series, args.length, args.num_processes
    ts = torch.linspace(0, 1, n + 1, dtype=f64)[1:]
    hurst = torch.linspace(0.1, 0.9, S, dtype=f64)
    torch.manual_seed(0)
    y = FractionalOU(hurst, 2.0, 1.0, ts, 0.05, num_processes=K).sample()          # (S, n)
    out = {}

    def dist(h, before):
        d = FractionalOU(h, 2.0, 1.0, ts, 0.05, num_processes=K)
        if before:   # the code before issue 13: ω solved one H at a time, the general associative scan
            d.weights = torch.stack([optimal_weights(hi, d.gammas, d.kind, d.horizon).weights
                                     for hi in h.reshape(-1).unbind(0)]).reshape(h.shape + d.gammas.shape)
            _ = d._transitions                   # the per-step (A, Q) as before: gathered from the two distinct
            d._uniform_steps = False             # steps; then the scan takes the general route
        return d

    def loop(before):
        h = hurst.clone().requires_grad_()
        lp = sum(dist(h[i], before).log_prob(y[i]) for i in range(S))
        lp.backward()
        return lp.detach(), h.grad

    def batched(before):
        h = hurst.clone().requires_grad_()
        lp = dist(h, before).log_prob(y).sum()
        lp.backward()
        return lp.detach(), h.grad

    rows = [("loop over series, before issue 13", lambda: loop(True)),
            ("loop over series, now", lambda: loop(False)),
            ("batched, before (ω per H, general scan)", lambda: batched(True)),
            ("batched, now (one ω solve, shared scan)", lambda: batched(False))]
    times = {}
    for name, fn in rows:
        times[name] = _time(lambda name=name, fn=fn: out.__setitem__(name, fn()), args.repeats)
    print(f"\nlog_prob + d/dH for {S} series x {n} steps with {S} different H (K={K}, float64, "
          f"{args.threads} thread(s)); best of {args.repeats}")
    head = (f"{'method':42s} | {'time [ms]':>9s} | {'loop now / this':>15s} | {'loop before / this':>18s} | "
            f"{'max |Δ lp|':>10s} | {'max |Δ grad|':>12s}")
    print(head)
    print("-" * len(head))
    ref_lp, ref_grad = out[rows[-1][0]]
    for name, _ in rows:
        lp, grad = out[name]
        print(f"{name:42s} | {1e3 * times[name]:9.1f} | {times[rows[1][0]] / times[name]:15.1f} | "
              f"{times[rows[0][0]] / times[name]:18.1f} | {float((lp - ref_lp).abs()):10.1e} | "
              f"{float((grad - ref_grad).abs().max()):12.1e}")


def _size_row(args, n: int) -> dict:
    """Timings of one series length ``n`` (the dense ones only up to --dense-max)."""
    f64 = torch.float64
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
    return row


def size_table(args):
    rows = [_size_row(args, n) for n in sorted(args.sizes)]

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
