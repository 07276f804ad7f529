"""The fracsde demo: how good is the Markov approximation, and what do its paths look like?

Run ``fracsde-demo --help``. Prints the MA-fBM relative L2 approximation error for several H
and K (type I and type II), samples MA-fBM and exact fBM paths for H in {0.2, 0.5, 0.8}, writes
a figure of them, and solves a small fractional SDE.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

import torch

from ._warnings import ApproximationWarning
from .fbm import FractionalBrownianMotion
from .markov import MarkovApproxFBM

#: the range of --gamma-max the demo accepts: above 1 (the library's bound) and up to rates whose table still runs
GAMMA_MAX_RANGE = (1.0, 1e4)

HURSTS = (0.1, 0.3, 0.5, 0.7, 0.9)
KS = (1, 2, 3, 4, 5)


def error_table(kind: str, gamma_max: float = 20.0) -> str:
    """Markdown table of relative L2 errors, rows H, columns K. An error above the library's warning threshold
    (an :class:`~fracsde._warnings.ApproximationWarning`: expected here for K = 1 and type I at large H, which
    the table exists to show) is marked ``*`` and explained under the table instead of warned about."""
    lines = [f"| {kind}: H \\ K | " + " | ".join(str(k) for k in KS) + " |",
             "|---|" + "---|" * len(KS)]
    marked = False
    for h in HURSTS:
        cells = []
        for k in KS:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ApproximationWarning)
                err = float(MarkovApproxFBM(h, k, gamma_max=gamma_max, kind=kind).approximation_error)
            flagged = any(issubclass(w.category, ApproximationWarning) for w in caught)
            for w in caught:            # anything else is not the table's business: pass it on
                if not issubclass(w.category, ApproximationWarning):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            marked |= flagged
            cells.append(f"{err:.2e}" + ("*" if flagged else ""))
        lines.append(f"| {h} | " + " | ".join(cells) + " |")
    if marked:
        lines.append("\n* relative error above 0.5, where the library warns (ApproximationWarning): more processes, "
                     "another gamma_max or rates='optimal' are needed there (docs/markov.md)")
    return "\n".join(lines)


def rule_for(hurst: float) -> MarkovApproxFBM:
    """The Markov approximation that fits H: the optimal rule with K = 16 for rough H (strong error 0.0177 at
    H = 0.1), the default geometric K = 3 grid for H ≥ ½ (relative L2 error ≤ 1.5e−4 there)."""
    if hurst < 0.5:
        return MarkovApproxFBM(hurst, 16, rates="optimal")
    return MarkovApproxFBM(hurst, 3)


def plot_paths(path: str, seed: int = 0, n_paths: int = 3) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen = torch.Generator().manual_seed(seed)
    # 257 points: exact type II fBM is a Cholesky factorisation of its covariance (~2 s here; 1025 points took 30 s)
    ts = torch.linspace(0, 1, 257, dtype=torch.float64)
    fig, axes = plt.subplots(2, 3, figsize=(13, 6), sharex=True)
    for col, h in enumerate((0.2, 0.5, 0.8)):
        exact = FractionalBrownianMotion(h, "type2").sample(ts, n_paths, generator=gen, dtype=torch.float64)
        noise = rule_for(h)
        approx = noise.sample(ts, n_paths, generator=gen, dtype=torch.float64)
        rule = f"{noise.rate_rule}, K = {noise.num_processes}"
        for row, (paths, label) in enumerate(((exact, "exact fBM (Cholesky)"), (approx, f"MA-fBM ({rule})"))):
            ax = axes[row, col]
            for p in paths:
                ax.plot(ts.numpy(), p.numpy(), lw=0.8)
            ax.set_title(f"{label}, H = {h}", fontsize=10)
            ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("t")
    fig.suptitle("Type II fractional Brownian motion: exact vs the Markov approximation whose rule fits H "
                 "(same seed, independent draws)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:                                 # whole or not at all (a full disk leaves no half figure)
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def demo_fractional_ou(hurst: float = 0.7, n: int = 4000, seed: int = 0) -> None:
    """Fractional OU dX = −X dt + 0.5 dB̂ (MA-fBM, K = 3): Monte Carlo Var X_1 against the exact value."""
    import numpy as np
    import scipy.linalg

    from .sde import FractionalSDE, sdeint

    class FractionalOU(FractionalSDE):
        noise_type, sde_type = "additive", "ito"

        def f(self, t, x):
            return -x

        def g(self, t, x):
            return torch.full_like(x, 0.5).unsqueeze(-1)

    noise = MarkovApproxFBM(hurst, num_processes=3)
    xs = sdeint(FractionalOU(noise), torch.zeros(n, 1, dtype=torch.float64), [0.0, 1.0], dt=0.01,
                generator=torch.Generator().manual_seed(seed))
    w, g = noise.weights.numpy(), noise.gammas.numpy()   # augmented linear SDE dz = A z dt + G dW
    A = np.diag(np.concatenate([[-1.0], -g]))
    A[0, 1:] = -0.5 * w * g
    G = np.concatenate([[0.5 * w.sum()], np.ones(g.size)])[:, None]
    S = scipy.linalg.solve_continuous_lyapunov(A, -G @ G.T)
    E = scipy.linalg.expm(A)
    exact, var = (S - E @ S @ E.T)[0, 0], float(xs[-1].var())
    print(f"fractional OU dX = -X dt + 0.5 dB^, H = {hurst}, solved by fracsde.sdeint: "
          f"Var X_1 = {var:.4f} ± {exact * (2 / n) ** 0.5:.4f} (n = {n}); exact {exact:.4f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fracsde-demo", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="folder for the figure")
    parser.add_argument("--overwrite", action="store_true", help="replace the figure OUT already holds")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the sample paths")
    parser.add_argument("--gamma-max", type=float, default=20.0,
                        help=f"largest OU rate of the geometric grid, in ({GAMMA_MAX_RANGE[0]:g}, "
                             f"{GAMMA_MAX_RANGE[1]:g}]")
    args = parser.parse_args(argv)
    lo, hi = GAMMA_MAX_RANGE
    if not (math.isfinite(args.gamma_max) and lo < args.gamma_max <= hi):
        parser.error(f"--gamma-max must be finite and in ({lo:g}, {hi:g}]; got {args.gamma_max:g}")
    fig_path = os.path.join(args.out, "paths.png")
    problem = _output_problem(args.out, fig_path, args.overwrite)
    if problem:                          # before any work: nothing is printed and then lost
        print(f"fracsde-demo: error: {problem}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    try:                                 # both tables first: a grid the library refuses is one line, not half a run
        tables = [error_table(kind, args.gamma_max) for kind in ("type2", "type1")]
    except ValueError as e:
        print(f"fracsde-demo: error: --gamma-max {args.gamma_max:g}: {e}", file=sys.stderr)
        return 2
    print(f"MA-fBM relative L2 error on [0, 1] (gamma_max = {args.gamma_max:g}; weights solved in float64)\n")
    for table in tables:
        print(table)
        print()
    plot_paths(fig_path, seed=args.seed)
    print(f"wrote {fig_path}\n")
    demo_fractional_ou()
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def _output_problem(out: str, fig_path: str, overwrite: bool) -> str | None:
    """Why the figure cannot be written to ``out`` (None if it can): a file in the way, a folder that refuses new
    files (/proc, read-only), or a previous figure without --overwrite."""
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out} is an existing file; --out needs a folder"
    if os.path.exists(fig_path) and not overwrite:
        return f"--out: {fig_path} already exists; pass --overwrite to replace it or choose another --out"
    base = os.path.abspath(out)
    while not os.path.exists(base):
        base = os.path.dirname(base)
    if not os.path.isdir(base):
        return f"--out {out}: {base} is a file, not a folder"
    try:
        import tempfile

        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        return f"--out {out}: {base} does not accept new files ({e.strerror}); choose another --out"
    return None


if __name__ == "__main__":
    sys.exit(main())
