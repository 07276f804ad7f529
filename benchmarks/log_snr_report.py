"""The log-SNR view of GFDM dynamics, and the official code's jittered conditional: tables and a figure.

Prints (markdown) the terminal log-SNR λ(T) over family × H × K, the share of uniform training times with
|λ| < 4, the ratio σ̃(jitter 1e−4) / σ̃(exact) for the paper's settings, and the validity of the jittered σ̃² as
a noise schedule: (σ̃²)′ − 2μσ̃² ≥ 0, reported as min_t of ((σ̃²)′ − 2μσ̃²)/σ̃² · t (dimensionless; measured
by central differences of the tables, independently of the δ the model stores). Writes docs/figures/log_snr.png
(λ(t) for the paper's settings).

    python benchmarks/log_snr_report.py [--figure docs/figures/log_snr.png]
"""
from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch

from fracsde import PriorMismatchWarning
from models.gfdm import FVE, FVP

F64 = torch.float64


def build(family, hurst, K, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PriorMismatchWarning)
        return family(hurst, K, **kw)


def terminal_table():
    hs = (0.1, 0.3, 0.5, 0.7, 0.9)
    lines = ["| family | K | " + " | ".join(f"H = {h}" for h in hs) + " |", "|---|---|" + "---|" * len(hs)]
    for family in (FVP, FVE):
        base = build(family, 0.5, 0)
        lines.append(f"| {family.__name__[1:]} | 0 | " + " | ".join(f"{base.log_snr_range[0]:.2f}" for _ in hs) + " |")
        for K in range(1, 6):
            vals = [build(family, h, K).log_snr_range[0] for h in hs]
            lines.append(f"| {family.__name__} | {K} | " + " | ".join(
                f"**{v:.2f}**" if v > -5 else f"{v:.2f}" for v in vals) + " |")
    return "\n".join(lines)


def share_table(settings):
    t = torch.linspace(1e-5, 1.0, 200001, dtype=F64)
    lines = ["| dynamics | λ(T) | share of t ~ U(0, 1) with abs(λ) < 4 | λ at t = 0.1, 0.5 |", "|---|---|---|---|"]
    for name, dyn in settings:
        lam = dyn.log_snr(t)
        l1, l5 = dyn.log_snr(torch.tensor([0.1, 0.5], dtype=F64)).tolist()
        lines.append(f"| {name} | {dyn.log_snr_range[0]:.2f} | {float((lam.abs() < 4).double().mean()):.2f} | "
                     f"{l1:.1f}, {l5:.1f} |")
    return "\n".join(lines)


def growth(dyn, t):
    """((σ̃²)′ − 2μσ̃²)/σ̃² · t from the tables (log σ̃² differentiated by central differences in log t)."""
    eps = 1e-4
    ls = lambda x: 2.0 * dyn.schedule.log_c(x) - dyn.log_snr(x)          # log σ̃² # noqa: E731
    dlog = (ls(t * np.exp(eps)) - ls(t * np.exp(-eps))) / (2 * eps)    # d log σ̃² / d log t
    mu = dyn.schedule.mu(t)
    return dlog - 2 * mu * t


def jitter_table(settings):
    ts = [0.01, 0.1, 0.3, 0.5, 0.7, 1.0]
    grid = torch.logspace(-4, 0, 2001, dtype=F64)[1:-1]
    head = " | ".join(f"t = {t:g}" for t in ts)
    lines = [f"| dynamics | {head} | min_t ((σ̃²)′ − 2μσ̃²)·t/σ̃² |", "|---|" + "---|" * (len(ts) + 1)]
    for name, exact, jittered in settings:
        t = torch.tensor(ts, dtype=F64)
        ratio = (jittered.conditional_std(t) / exact.conditional_std(t)).tolist()
        gr = growth(jittered, grid)
        lines.append(f"| {name} | " + " | ".join(f"{r:.3g}" for r in ratio) + f" | {float(gr.min()):.3g} |")
    return "\n".join(lines)


def figure(path, settings):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t = torch.logspace(-3, 0, 400, dtype=F64)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, dyn in settings:
        ax.plot(t.numpy(), dyn.log_snr(t).numpy(), label=name)
    ax.axhline(-5, color="grey", ls=":", lw=1)
    ax.axhspan(-4, 4, color="grey", alpha=0.12, lw=0)
    ax.set_xscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("λ(t) = 2 log(c/σ̃)")
    ax.set_title("log-SNR of u = c x₀ + σ̃ ε (band: |λ| < 4; dotted: prior-mismatch threshold −5)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--figure", default="docs/figures/log_snr.png", help="output PNG ('' to skip)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    paper = [("VP", build(FVP, 0.9, 0)), ("VE", build(FVE, 0.9, 0)), ("FVP(0.9,1)", build(FVP, 0.9, 1)),
             ("FVP(0.9,2)", build(FVP, 0.9, 2)), ("FVP(0.7,2)", build(FVP, 0.7, 2)), ("FVP(0.9,3)", build(FVP, 0.9, 3)),
             ("FVP(0.7,3)", build(FVP, 0.7, 3)), ("FVP(0.9,4)", build(FVP, 0.9, 4))]
    print("## terminal log-SNR λ(T) (bold: > −5, PriorMismatchWarning)\n")
    print(terminal_table())
    print("\n## where the uniform training times fall\n")
    print(share_table(paper))
    jit = []
    for family, h, K in ((FVP, 0.9, 1), (FVP, 0.9, 2), (FVP, 0.7, 2), (FVP, 0.9, 3), (FVP, 0.7, 3), (FVP, 0.9, 4),
                         (FVE, 0.9, 3)):
        extra = {"sigma_min_offset": True} if family is FVE else {}
        jit.append((f"{family.__name__}({h},{K})", build(family, h, K),
                    build(family, h, K, covariance_jitter=1e-4, **extra)))
    print("\n## official jitter 1e−4: σ̃(jittered)/σ̃(exact), and the jittered σ̃² as a schedule\n")
    print(jitter_table(jit))
    if args.figure:
        figure(args.figure, paper)


if __name__ == "__main__":
    main()
