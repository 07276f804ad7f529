"""The ``roughvol`` command: implied-volatility smiles of rough Bergomi and rough Heston.

    roughvol smile --model rbergomi --hurst 0.07 --xi 0.055225 --eta 1.9 --rho -0.9 --maturity 0.25 --method exact
    roughvol smile --model rheston --hurst 0.1 --maturity 1 --method fourier --out rheston.png
    roughvol smile --model rbergomi --method markov --paths 131072 --compare exact      # Markov against exact

Prints the smile as a table (log-strike, implied vol, standard error, call price) and writes a PNG (matplotlib) of
the smile with ±2 standard-error bands. Errors in the input are reported in one line (exit status 2).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from models.cli_types import positive_int

__all__ = ["main", "build_parser"]

MODELS = {"rbergomi": "RoughBergomi", "rheston": "RoughHeston"}
METHODS = {"rbergomi": ("markov", "exact"), "rheston": ("fourier", "markov")}
DEFAULT_METHOD = {"rbergomi": "exact", "rheston": "fourier"}
#: per-model defaults of --hurst, --rho, --maturity (McCrickerd & Pakkanen's case; El Euch & Rosenbaum's example)
MODEL_DEFAULTS = {"rbergomi": {"hurst": 0.07, "rho": -0.9, "maturity": 0.25},
                  "rheston": {"hurst": 0.1, "rho": -0.7, "maturity": 1.0}}


class _FMT(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults, except where there is none (None)."""

    def _get_help_string(self, action):
        if action.default is None or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _strikes(text: str) -> list[float]:
    """``a:b:n`` (n equally spaced log-strikes from a to b) or a comma-separated list."""
    try:
        if ":" in text:
            a, b, count = text.split(":")
            n = int(count)
            if n < 1:
                raise ValueError
            return [float(a) + (float(b) - float(a)) * i / max(n - 1, 1) for i in range(n)]
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FROM:TO:COUNT or a comma-separated list of numbers; got {text!r}") \
            from None


class _ErrorParser(argparse.ArgumentParser):
    """argparse's usage errors in one line (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``roughvol`` (sub-command ``smile``)."""
    p = _ErrorParser(prog="roughvol", description=__doc__, formatter_class=_FMT)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_ErrorParser)
    s = sub.add_parser("smile", help="print a smile and write its figure", formatter_class=_FMT,
                       description="Price a smile and print it; write a PNG with the Monte Carlo bands.")
    s.add_argument("--model", choices=tuple(MODELS), default="rbergomi",
                   help="rbergomi: rough Bergomi (xi, eta, rho); rheston: rough Heston (v0, theta, lam, nu, rho)")
    s.add_argument("--method", default=None,
                   help="rbergomi: exact (Cholesky, the reference) or markov; rheston: fourier (semi-analytic) or "
                        "markov (default: exact / fourier)")
    s.add_argument("--compare", default=None, help="a second method priced alongside (a column and a curve)")
    s.add_argument("--hurst", type=float, default=None,
                   help="Hurst index H in (0, 0.5] (default: 0.07 rbergomi, 0.1 rheston)")
    s.add_argument("--rho", type=float, default=None,
                   help="spot-vol correlation in [-1, 1] (default: -0.9 rbergomi, -0.7 rheston)")
    s.add_argument("--xi", type=float, default=0.235 ** 2, help="rbergomi: forward variance")
    s.add_argument("--eta", type=float, default=1.9, help="rbergomi: vol-of-vol")
    s.add_argument("--v0", type=float, default=0.02, help="rheston: initial variance")
    s.add_argument("--theta", type=float, default=0.02, help="rheston: drift level (long-run variance theta/lam)")
    s.add_argument("--lam", type=float, default=0.3, help="rheston: mean reversion")
    s.add_argument("--nu", type=float, default=0.3, help="rheston: vol-of-vol")
    s.add_argument("--maturity", type=float, default=None,
                   help="maturity T in years (default: 0.25 rbergomi, 1 rheston)")
    s.add_argument("--strikes", type=_strikes, default=_strikes("-0.3:0.2:11"),
                   help="log-strikes: FROM:TO:COUNT or a comma-separated list; write --strikes=-0.3:0.2:11 "
                        "when it starts with a minus (default: -0.3:0.2:11)")
    s.add_argument("--paths", type=positive_int, default=1 << 16, help="Monte Carlo paths")
    s.add_argument("--steps", type=positive_int, default=None,
                   help="time steps (Monte Carlo; default: 256, but 2048 for rheston markov, whose square-root "
                        "scheme needs them) or Adams grid (fourier; default 256)")
    s.add_argument("--num-processes", type=positive_int, default=None,
                   help="markov: K, the number of OU factors (default: the model's, see MARKOV_DEFAULTS)")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    s.add_argument("--out", type=Path, default=Path("smile.png"), help="the PNG to write")
    s.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _model(args):
    from . import RoughBergomi, RoughHeston

    if args.model == "rbergomi":
        return RoughBergomi(hurst=args.hurst, xi=args.xi, eta=args.eta, rho=args.rho)
    return RoughHeston(hurst=args.hurst, v0=args.v0, theta=args.theta, lam=args.lam, nu=args.nu, rho=args.rho)


def _price(model, args, method, k):
    kwargs = {"steps": args.steps}
    if method != "fourier":
        kwargs.update(paths=args.paths, generator=torch.Generator().manual_seed(args.seed),
                      num_processes=args.num_processes, progress=not args.no_progress)
    return model.smile(k, args.maturity, method=method, **kwargs)


def _plot(smiles, args, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in smiles:
        k, iv, se = s.log_strikes.numpy(), s.implied_vol.detach().numpy(), s.std_error.detach().numpy()
        ax.plot(k, iv, marker="o", ms=3, label=s.method)
        if float(se.max()) > 0:
            ax.fill_between(k, iv - 2 * se, iv + 2 * se, alpha=0.25)
    ax.set_xlabel("log-strike k")
    ax.set_ylabel("implied volatility")
    ax.set_title(f"{MODELS[args.model]} H={args.hurst:g}, T={args.maturity:g}")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(path)


def _cmd_smile(args) -> int:
    for name, value in MODEL_DEFAULTS[args.model].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    methods = [args.method or DEFAULT_METHOD[args.model]] + ([args.compare] if args.compare else [])
    for m in methods:
        if m not in METHODS[args.model]:
            raise ValueError(f"--method/--compare for --model {args.model} must be one of "
                             f"{', '.join(METHODS[args.model])}; got {m!r}")
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {args.out} exists; pass --overwrite to replace it")
    if not args.out.parent.is_dir():
        raise FileNotFoundError(f"--out: the folder {args.out.parent} does not exist")
    if not (math.isfinite(args.maturity) and args.maturity > 0):
        raise ValueError(f"--maturity must be finite and > 0; got {args.maturity}")
    if not args.strikes:
        raise ValueError("--strikes is empty")
    model = _model(args)
    k = torch.tensor(args.strikes, dtype=torch.float64)
    smiles = [_price(model, args, m, k) for m in methods]
    print(f"{model}  T={args.maturity:g}")
    head = f"{'k':>8} " + " ".join(f"{s.method + ' vol':>13} {'s.e.':>9} {'call':>10}" for s in smiles)
    print(head)
    for i, x in enumerate(args.strikes):
        cells = " ".join(f"{float(s.implied_vol[i]):13.6f} {float(s.std_error[i]):9.2e} {float(s.price[i]):10.6f}"
                         for s in smiles)
        print(f"{x:8.4f} {cells}")
    for s in smiles:
        extra = f", {s.info['paths']} paths x {s.info['steps']} steps" if "paths" in s.info else ""
        print(f"{s.method}: {s.info['seconds']:.2f} s{extra}")
    _plot(smiles, args, args.out)
    print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    """Entry point of the ``roughvol`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _cmd_smile(args)
    except (ValueError, TypeError, FileExistsError, FileNotFoundError, PermissionError) as e:
        print(f"roughvol {args.command}: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
