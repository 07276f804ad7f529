"""Sampler quality against network evaluations (NFE) for every (sampler, grid) and dynamics.

Case 1 — the exact Gaussian ε-model of N(0.5, 0.2²): relative error of the sample std and mean. Deterministic
samplers by an exact affine computation (the sampler maps the prior affinely, so K + 2 starting points give its
output law exactly: no Monte Carlo); stochastic ones from 2^16 draws (standard error 0.28 % on the std, 0.16 %
on the mean). Empirical orders from self-convergence (errors against the 1000-NFE result, NFE 20…200).
Case 2 — the exact Gaussian-mixture ε-model of the digits training set (one N(x_i, 0.02²) per image): offline FID
of 500 samples against the data, and against 500 samples of 1000-step Euler–Maruyama (the row "sde 1000" is
another 1000-step draw against it: the FID noise floor).
Case 3 — trained digits networks (checkpoints of benchmarks/equal_budget_study.py): offline FID and VS_p.
Also the probability-flow NLL (bits/dim, Heun in u, exact divergence) of Gaussian data under its exact ε-model at
10…200 steps, against 1000 steps and against the exact value.

    python benchmarks/bench_samplers.py --threads 1 [--cases 1 2 3 nll] [--figure docs/figures/samplers.png]
"""
from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from fracsde import PriorMismatchWarning
from models.gfdm import FVE, FVP, GaussianEpsModel, sample
from models.gfdm.sampling import DETERMINISTIC, SAMPLER_INFO, SAMPLERS

F64 = torch.float64
MEAN, STD = 0.5, 0.2
NFES = (5, 10, 20, 50, 100, 200, 1000)
GRIDS = ("uniform", "log-snr", "edm")
DYNAMICS = {"VP": lambda: FVP(0.9, 0), "VE": lambda: FVE(0.9, 0), "FVP(0.9,2)": lambda: FVP(0.9, 2),
            "FVP(0.9,3)": lambda: FVP(0.9, 3), "FVE(0.9,2)": lambda: FVE(0.9, 2)}


def build(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PriorMismatchWarning)
        return DYNAMICS[name]()


# ---------------------------------------------------------------------------------------------- case 1
def exact_moments(dyn, method, steps, grid):
    """(mean, std) of a deterministic sampler's output under the prior N(0, Σ_T), from K + 2 affine probes."""
    K = dyn.num_processes
    m = dyn.marginal(torch.tensor(dyn.horizon, dtype=F64))
    cov = torch.zeros(K + 1, K + 1, dtype=F64)
    cov[0, 0], cov[0, 1:], cov[1:, 0], cov[1:, 1:] = m.cov_xx, m.cov_xy, m.cov_xy, m.cov_yy
    probes = torch.zeros(K + 2, K + 1, dtype=F64)
    probes[1:] = torch.eye(K + 1, dtype=F64)
    x, y = probes[:, :1], probes[:, 1:].reshape(K + 2, 1, K)
    out = sample(GaussianEpsModel(dyn, MEAN, STD), dyn, (K + 2, 1), steps=steps, method=method, grid=grid,
                 init=(x, y), dtype=F64)[:, 0]
    gain = out[1:] - out[0]
    return float(out[0]), float(torch.sqrt(gain @ cov @ gain))


def mc_moments(dyn, method, steps, grid, n=1 << 16, seed=0):
    x = sample(GaussianEpsModel(dyn, MEAN, STD), dyn, (n, 1), steps=steps, method=method, grid=grid, dtype=F64,
               generator=torch.Generator().manual_seed(seed))
    return float(x.mean()), float(x.std())


def case1(out_dir: Path, log):
    rows = {}
    for dname in DYNAMICS:
        dyn = build(dname)
        for method in SAMPLERS:
            for grid in GRIDS:
                errs = {}
                for nfe in NFES:
                    if nfe < SAMPLER_INFO[method].min_steps:
                        continue
                    if method in DETERMINISTIC:
                        mean, std = exact_moments(dyn, method, nfe, grid)
                    elif nfe <= 200 or method == "sde":
                        mean, std = mc_moments(dyn, method, nfe, grid)
                    else:
                        continue
                    errs[nfe] = (mean / MEAN - 1, std / STD - 1)
                rows[(dname, method, grid)] = errs
        log(f"case 1: {dname} done")
    # orders (deterministic samplers, self-convergence against their 1000-NFE result)
    orders = {}
    for (dname, method, grid), errs in rows.items():
        if method in DETERMINISTIC and 1000 in errs:
            ref = errs[1000][1]
            xs = [n for n in (20, 50, 100, 200) if n in errs]
            ys = [abs(errs[n][1] - ref) for n in xs]
            if all(y > 0 for y in ys):
                orders[(dname, method, grid)] = -float(np.polyfit(np.log(xs), np.log(ys), 1)[0])
    return rows, orders


def case1_tables(rows, orders):
    lines = ["| dynamics | sampler | grid | " + " | ".join(f"NFE {n}" for n in NFES) + " | order |",
             "|---|---|---|" + "---|" * (len(NFES) + 1)]
    for (dname, method, grid), errs in rows.items():
        cells = [f"{100 * errs[n][1]:+.2f}" if n in errs else "" for n in NFES]
        order = orders.get((dname, method, grid))
        order_cell = "" if order is None else f"{order:.2f}"
        lines.append(f"| {dname} | {method} | {grid} | " + " | ".join(cells) + f" | {order_cell} |")
    best = ["| dynamics | best at 20 NFE (sampler, grid) | std error | mean error |", "|---|---|---|---|"]
    for dname in DYNAMICS:
        cands = [(abs(e[20][1]), m, g, e[20]) for (d, m, g), e in rows.items() if d == dname and 20 in e]
        _, m, g, (em, es) = min(cands)
        best.append(f"| {dname} | {m}, {g} | {100 * es:+.2f} % | {100 * em:+.2f} % |")
    return "\n".join(lines), "\n".join(best)


def figure(rows, path: Path, dname="FVP(0.9,3)", grid="log-snr"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in SAMPLERS:
        errs = rows.get((dname, method, grid if SAMPLER_INFO[method].denoises else "uniform"), {})
        xs = sorted(errs)
        if xs:
            ax.plot(xs, [max(abs(errs[n][1]), 1e-5) for n in xs], "o-", label=method, ms=3)
    ax.axhline(0.01, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("|relative error of the sample std|")
    ax.set_title(f"{dname}, Gaussian oracle N(0.5, 0.2²); u-space samplers on the {grid} grid, sde/ode/ode-heun "
                 f"uniform", fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------- case 2
class FlatMixture:
    """The exact ε-model of an equal-weight mixture of N(x_i, s² I) on images, for (batch, 1, 8, 8) inputs.

    Same maths as :class:`models.gfdm.GaussianMixtureEpsModel` (shared component std), written with one matrix
    product: ‖u − c x_i‖² = ‖u‖² − 2c u·x_i + c²‖x_i‖², so 1500 components cost a (batch × 64) @ (64 × 1500) product.
    """

    def __init__(self, dyn, images, std):
        self.dyn, self.std = dyn, float(std)
        self.means = images.reshape(images.shape[0], -1).to(F64)              # (M, d)
        self.norms = (self.means ** 2).sum(1)                                 # (M,)

    def __call__(self, u, t, **kw):
        t64 = t.to(F64)
        c = self.dyn.mean_coefficient(t64)[:, None]                           # (batch, 1)
        s = self.dyn.conditional_std(t64)[:, None]
        var = c * c * self.std ** 2 + s * s                                   # (batch, 1), shared by components
        flat = u.reshape(u.shape[0], -1).to(F64)
        sq = (flat ** 2).sum(1, keepdim=True) - 2 * c * flat @ self.means.T + c * c * self.norms[None]
        resp = torch.softmax(-0.5 * sq / var, dim=1)                           # (batch, M)
        mean = c * (resp @ self.means)                                        # E[c x_0 | u]
        eps = s * (flat - mean) / var                                         # −σ̃ ∇ log q = σ̃ (u − E[c x₀|u]) / var
        return eps.reshape(u.shape).to(u.dtype)


def case2(log, num=500, components=1500, dnames=("VP", "FVP(0.9,2)", "FVP(0.9,3)"),
          samplers=(("dpm++2m", 10), ("dpm++2m", 20), ("ddim", 20), ("sde-dpm++2m", 20), ("ancestral", 50),
                    ("ode-heun", 19), ("sde", 20), ("sde", 200))):
    from models.gfdm.data import load_dataset
    from models.gfdm.metrics import FeatureStats, feature_extractor, fid, pixel_vendi_score, quantize, reference_stats
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    extractor = feature_extractor(train, test, log=lambda *a: None)
    data_ref = reference_stats(extractor, train)
    to_metric = lambda x: quantize(x.clamp(-1, 1)).float() / 127.5 - 1      # noqa: E731  (8-bit, as a PNG)
    images = train.all_float()[:components]            # the mixture: the first `components` training images
    out = {}
    for dname in dnames:
        dyn = build(dname)
        eps = FlatMixture(dyn, images, 0.02)
        def draw(method, nfe, seed, eps=eps, dyn=dyn):    # eps, dyn bound: called in this iteration only
            return sample(eps, dyn, (num, 1, 8, 8), steps=nfe, method=method,
                          generator=torch.Generator().manual_seed(seed))
        em = to_metric(draw("sde", 1000, 1))
        em_ref = FeatureStats.from_features(extractor(em))
        out[(dname, "sde", 1000)] = {"fid_data": fid(extractor, em, data_ref),
                                     "fid_vs_em1000": fid(extractor, to_metric(draw("sde", 1000, 3)), em_ref),
                                     "vs_p": pixel_vendi_score(quantize(em.clamp(-1, 1))), "seconds": float("nan")}
        for method, nfe in samplers:
            t0 = time.perf_counter()
            x = to_metric(draw(method, nfe, 2))
            seconds = time.perf_counter() - t0
            out[(dname, method, nfe)] = {"fid_data": fid(extractor, x, data_ref),
                                         "fid_vs_em1000": fid(extractor, x, em_ref),
                                         "vs_p": pixel_vendi_score(quantize(x)), "seconds": seconds}
            log(f"case 2: {dname} {method} {nfe}: FID {out[(dname, method, nfe)]['fid_data']:.2f}, "
                f"vs EM-1000 {out[(dname, method, nfe)]['fid_vs_em1000']:.2f}")
    return out


# ---------------------------------------------------------------------------------------------- case 3 and NLL
def case3(log, study="runs/study-digits/seed-0", num=500):
    from models.gfdm.checkpoint import load_for_sampling
    from models.gfdm.data import load_dataset
    from models.gfdm.evaluate import evaluate_samples
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    out = {}
    for row in ("vp", "fvp93-aware"):
        ckpts = sorted(Path(study, row).glob("*/checkpoint.pt"))
        if not ckpts:
            log(f"case 3: no checkpoint for {row} under {study}; run benchmarks/equal_budget_study.py first")
            continue
        model, dyn, _ = load_for_sampling(ckpts[0])
        for method, nfe in (("sde", 200), ("sde", 20), ("dpm++2m", 10), ("dpm++2m", 20), ("sde-dpm++2m", 20),
                            ("ddim", 20), ("ode-heun", 19)):
            x = sample(model, dyn, (num, 1, 8, 8), steps=nfe, method=method,
                       generator=torch.Generator().manual_seed(4)).clamp(-1, 1)
            r = evaluate_samples(x, train, test, log=lambda *a: None)
            out[(row, method, nfe)] = {"fid": r["fid"], "vs_p": r["vs_p"]}
            log(f"case 3: {row} {method} {nfe}: FID {r['fid']:.2f}, VS_p {r['vs_p']:.2f}")
    return out


def nll_case(log, dnames=("VP", "FVP(0.9,2)", "FVP(0.9,3)"), n=64, d=4):
    """Probability-flow NLL (Heun in u, exact divergence) of N(0.5, 0.2²) data under its exact ε-model, against
    1000 steps and against the exact −log₂ p per dimension (which the prior's neglect of c(T)·m shifts slightly)."""
    from models.gfdm import nll_bits_per_dim
    g = torch.Generator().manual_seed(0)
    x0 = MEAN + STD * torch.randn(n, d, generator=g, dtype=F64)
    exact = float((0.5 * ((x0 - MEAN) / STD) ** 2 + 0.5 * math.log(2 * math.pi * STD ** 2)).mean()) / math.log(2)
    res = {}
    for dname in dnames:
        dyn = build(dname)
        eps = GaussianEpsModel(dyn, MEAN, STD)
        for steps in (10, 25, 50, 100, 200, 1000):
            bpd = nll_bits_per_dim(eps, dyn, x0, steps=steps, exact_trace=True)
            res[(dname, steps)] = float(bpd.mean())
            log(f"nll: {dname} {steps} steps: {res[(dname, steps)]:.5f} bits/dim (exact {exact:.5f})")
        res[(dname, "exact")] = exact
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["1", "2", "3", "nll"], choices=("1", "2", "3", "nll"))
    p.add_argument("--out", default="runs/bench-samplers", help="folder for results.json and tables.md")
    p.add_argument("--figure", default="docs/figures/samplers.png", help="log-log figure ('' to skip)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)   # noqa: E731
    md, results = [], {}
    if "1" in args.cases:
        rows, orders = case1(out, log)
        full, best = case1_tables(rows, orders)
        md += ["## case 1: exact Gaussian oracle — std error (%)", full, "", best, ""]
        results["case1"] = {"|".join(k): v for k, v in rows.items()}
        results["orders"] = {"|".join(k): v for k, v in orders.items()}
        if args.figure:
            figure(rows, Path(args.figure))
    if "2" in args.cases:
        r = case2(log)
        md += ["## case 2: exact Gaussian-mixture ε-model of the digits (500 samples)",
               "| dynamics | sampler | NFE | offline FID vs data | FID vs 1000-step EM | VS_p | s |",
               "|---|---|---|---|---|---|---|"]
        md += [f"| {d} | {m} | {n} | {v['fid_data']:.2f} | {v['fid_vs_em1000']:.2f} | {v['vs_p']:.2f} | "
               f"{v['seconds']:.1f} |" for (d, m, n), v in r.items()]
        results["case2"] = {f"{d}|{m}|{n}": v for (d, m, n), v in r.items()}
    if "3" in args.cases:
        r = case3(log)
        md += ["", "## case 3: trained digits networks (500 samples)", "| run | sampler | NFE | offline FID | VS_p |",
               "|---|---|---|---|---|"] + [f"| {d} | {m} | {n} | {v['fid']:.2f} | {v['vs_p']:.2f} |"
                                            for (d, m, n), v in r.items()]
        results["case3"] = {f"{d}|{m}|{n}": v for (d, m, n), v in r.items()}
    if "nll" in args.cases:
        r = nll_case(log)
        md += ["", "## probability-flow NLL (Heun in u, exact divergence), Gaussian oracle N(0.5, 0.2²), "
               "64 points × 4 dims",
               "| dynamics | steps | bits/dim | minus 1000-step | minus exact |", "|---|---|---|---|---|"]
        for (dname, steps), v in r.items():
            if steps != "exact":
                md.append(f"| {dname} | {steps} | {v:.5f} | {v - r[(dname, 1000)]:+.5f} | "
                          f"{v - r[(dname, 'exact')]:+.5f} |")
        results["nll"] = {f"{d}|{s_}": v for (d, s_), v in r.items()}
    (out / "tables.md").write_text("\n".join(md) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print("\n".join(md))
    log(f"wrote {out / 'tables.md'}")


if __name__ == "__main__":
    main()
