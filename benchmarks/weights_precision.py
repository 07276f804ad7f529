"""How much does solving the MA-fBM weight system in float32 (as GFDM's code does) move the weights?

    .venv/bin/python benchmarks/weights_precision.py --hurst 0.7
"""
import argparse
import warnings

import torch

from fracsde.kinds import TypeII
from fracsde.markov import geometric_gammas, optimal_weights


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hurst", type=float, default=0.7)
    p.add_argument("--gamma-max", type=float, default=20.0)
    args = p.parse_args(argv)
    print(f"type II, H = {args.hurst}, gamma_max = {args.gamma_max:g}, T = 1")
    print(f"{'K':>2} {'cond(A)':>10} {'max |w32 - w64|':>16} {'rel. L2 error (float64)':>24}")
    for k in (2, 3, 4, 5, 6, 8):
        g = geometric_gammas(k, args.gamma_max)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sol = optimal_weights(args.hurst, g)
        A = TypeII().gram(g, 1.0)
        b, _ = TypeII().moments(torch.tensor(args.hurst, dtype=torch.float64), g, 1.0)
        w32 = torch.linalg.solve(A.float(), b.float()).double()
        print(f"{k:>2} {sol.condition_number:10.2e} {float((w32 - sol.weights).abs().max()):16.3g} "
              f"{float(sol.relative_error):24.3e}")


if __name__ == "__main__":
    main()
