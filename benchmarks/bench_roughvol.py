"""Rough Bergomi Monte Carlo: fracsde's Markov paths against the exact (Cholesky) method and the hybrid scheme.

Two tables, all in one process (the machine is shared and noisy; each timing is the min of --repeats rounds, the
methods interleaved round by round):

1. Time per smile at equal paths, Markov vs exact, at 128 / 512 / 2048 steps (McCrickerd & Pakkanen's case:
   H = 0.07, η = 1.9, ρ = −0.9, ξ = 0.235², T = 0.25), with the ratio exact / Markov.
2. At 256 steps: the smile of each method against the exact one on the same grid (difference and its combined
   standard error), and the time — so that methods are compared at equal bias. The hybrid scheme of Bennedsen,
   Lunde & Pakkanen (2017, κ = 1; written here) is the speed peer users know.
3. What the antithetic pairs and the control variate (S_T, E S_T = 1) gain: the variance of each estimator at equal
   paths relative to plain Monte Carlo (exact method, 256 steps).
4. Calibration of (H, η, ρ) on a three-maturity synthetic surface from a distant start: Adam on the pathwise
   gradient against Nelder–Mead (scipy) on the same objective — pricer calls, wall time, final vol RMSE, and the
   parameters recovered; once with the surface priced by the calibration's own random numbers (the minimum is the
   truth) and once from independent ones (2^15 paths).
5. Rough Heston (H = 0.1, V₀ = θ = 0.02, λ = ν = 0.3, ρ = −0.7, T = 1): the Markov Monte Carlo against the Fourier
   smile, with the optimal rule's uncapped rates at 64 / 256 / 1024 steps and with the default (rates capped at
   64/T) at 1024 / 2048 steps, and the share of steps where the scheme's V is negative; and the Fourier smile of the
   lifted (K-factor) model itself, which separates the kernel approximation from the scheme.
6. Memory: the peak resident memory one smile (2^14 paths) adds, in a fresh process after a warm-up smile, at
   256 / 1024 / 4096 steps, Markov (streamed in time blocks) and exact (Linux: reads /proc/self/status).
7. Where a Markov smile's time goes (torch.profiler, 512 steps, K = 16, 2^14 paths: share of the self time by op);
   the smile's time by the joint plan's steps per block (8 / 16 / 32); and what operator entries below float32's
   smallest normal number cost: the joint plan's block products at 2048 steps with the float32 operators as the
   library casts them (denormals flushed to 0) against the plain cast.

Run:
    .venv/bin/python benchmarks/bench_roughvol.py --threads 1
    .venv/bin/python benchmarks/bench_roughvol.py --threads 1 --paths 8192 --bias-paths 65536 --repeats 1   # quick
    .venv/bin/python benchmarks/bench_roughvol.py --threads 1 --sections 3 4                               # 3 and 4
    .venv/bin/python benchmarks/bench_roughvol.py --threads 1 --sections 6                                 # memory
    .venv/bin/python benchmarks/bench_roughvol.py --threads 1 --sections 7                                 # profile
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from models.roughvol import RoughBergomi

CASE = {"hurst": 0.07, "xi": 0.235 ** 2, "eta": 1.9, "rho": -0.9}
T = 0.25
K_SMILE = torch.tensor([-0.1787, 0.0, 0.1041], dtype=torch.float64)


class HybridBergomi(RoughBergomi):
    """Rough Bergomi with Y from the hybrid scheme (Bennedsen, Lunde & Pakkanen 2017), κ = 1.

    On t_i = i h, α = H − ½: Y_i = √(2H) (Z_i + Σ_{k=2}^{i} (b_k h)^α ΔW_{i−k+1}),
    Z_i = ∫_{t_{i−1}}^{t_i} (t_i − s)^α dW_s drawn exactly with ΔW_i (Var ΔW = h, Cov = h^{α+1}/(α+1),
    Var Z = h^{2α+1}/(2α+1)), b_k the optimal evaluation points ((k^{α+1} − (k−1)^{α+1})/(α+1))^{1/α};
    the sum is a convolution, done by FFT (O(N log N)).
    Var Y_t is taken as t^{2H} (the model's), as in McCrickerd & Pakkanen's code.
    """

    def _path_sampler(self, method, ts, markov):
        if method == "exact32":
            return self._exact_float32(ts)
        if method != "hybrid":
            return super()._path_sampler(method, ts, markov)
        H, xi, eta = float(self.hurst), float(self.xi), float(self.eta)
        a = H - 0.5
        N = ts.numel() - 1
        h = float(ts[1] - ts[0])
        cov = torch.tensor([[h, h ** (a + 1) / (a + 1)], [h ** (a + 1) / (a + 1), h ** (2 * a + 1) / (2 * a + 1)]],
                           dtype=torch.float64)
        L = torch.linalg.cholesky(cov)
        k = torch.arange(2, N + 1, dtype=torch.float64)
        b = ((k ** (a + 1) - (k - 1) ** (a + 1)) / (a + 1)) ** (1 / a)
        gamma = torch.cat([torch.zeros(1, dtype=torch.float64), (b * h) ** a])          # Γ_1 = 0, Γ_k, k ≥ 2
        n_fft = 2 * N
        gamma_hat = torch.fft.rfft(gamma, n=n_fft)
        var_y = ts[:-1] ** (2 * H)

        def variance(y):
            return xi * torch.exp(eta * y - 0.5 * eta * eta * var_y)

        def sample(n, g):
            z = torch.randn(n, N, 2, generator=g, dtype=torch.float64) @ L.T
            dw, zz = z[..., 0], z[..., 1]
            conv = torch.fft.irfft(torch.fft.rfft(dw, n=n_fft) * gamma_hat, n=n_fft)[:, :N]   # Σ_j Γ_{i−j+1} ΔW_j
            y = math.sqrt(2 * H) * (zz + conv)                                          # Y_1..Y_N
            y_left = torch.cat([y.new_zeros(n, 1), y[:, :-1]], dim=1)
            return [(0, variance(y_left), dw, lambda v, d: (variance(-y_left), -d))]

        return sample


    def _exact_float32(self, ts):
        """The exact method with its normals and its product in float32 (the factor itself computed in float64 and
        rounded): what the exact method costs at the Markov method's default precision. Not a shipped method."""
        from models.roughvol.exact import joint_factor
        H, xi, eta = float(self.hurst), float(self.xi), float(self.eta)
        L = joint_factor(H, ts[1:]).to(torch.float32)
        N = ts.numel() - 1
        var_y = ts[:-1] ** (2 * H)

        def variance(y):
            return xi * torch.exp(eta * y - 0.5 * eta * eta * var_y)

        def sample(n, g):
            yw = (torch.randn(n, 2 * N, generator=g, dtype=torch.float32) @ L.T).double()
            y = torch.cat([yw.new_zeros(n, 1), yw[:, :N - 1]], dim=1)
            w = torch.cat([yw.new_zeros(n, 1), yw[:, N:]], dim=1)
            return [(0, variance(y), torch.diff(w, dim=1), lambda v, dw: (variance(-y), -dw))]

        return sample


def smile(model, method, paths, steps, seed, num_processes):
    gen = torch.Generator().manual_seed(seed)
    markov = model._markov_options(num_processes, None)
    return model._smile_mc(K_SMILE, T, method, paths, steps, gen, True, True, None, False, markov)


def measure(methods: dict, repeats: int) -> dict:
    """{name: min seconds} over ``repeats`` rounds (each round runs every method once, after a warm-up)."""
    for fn in methods.values():
        fn()
    best = {name: math.inf for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--paths", type=int, default=1 << 14, help="paths per timed smile (table 1)")
    p.add_argument("--steps", type=int, nargs="+", default=[128, 512, 2048], help="time steps (table 1)")
    p.add_argument("--num-processes", type=int, nargs="+", default=[8, 16], help="Markov K values")
    p.add_argument("--bias-paths", type=int, default=1 << 17, help="paths per smile in the bias table (table 2)")
    p.add_argument("--repeats", type=int, default=2, help="timing rounds (min is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3, 4], help="which tables to print (1-7)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = HybridBergomi(**CASE)
    print(f"rough Bergomi {CASE}, T = {T}, threads = {args.threads}, {torch.__version__}")
    if 1 in args.sections:
        timing_table(model, args)
    if 2 in args.sections:
        bias_table(model, args)
    if 3 in args.sections:
        variance_reduction_table(model, args)
    if 4 in args.sections:
        calibration_table(args)
    if 5 in args.sections:
        rough_heston_table(args)
    if 6 in args.sections:
        memory_table(args)
    if 7 in args.sections:
        profile_table(model, args)


def timing_table(model, args):
    names = ["exact", "exact32"] + [f"markov K={K}" for K in args.num_processes] + ["hybrid"]
    print(f"\n1. seconds per smile, {args.paths} paths (antithetic, control variate), min of {args.repeats}; "
          f"exact32 = the exact method with float32 normals and product (not shipped)")
    others = names[2:]
    print(f"{'steps':>6} " + " ".join(f"{n:>13}" for n in names) + "  " +
          " ".join(f"{'exact/' + n.split()[-1]:>13}" for n in others) + "  " +
          " ".join(f"{'exact32/' + n.split()[-1]:>13}" for n in others))
    for n_steps in args.steps:
        methods = {"exact": lambda s=n_steps: smile(model, "exact", args.paths, s, args.seed, None),
                   "exact32": lambda s=n_steps: smile(model, "exact32", args.paths, s, args.seed, None)}
        for K in args.num_processes:
            methods[f"markov K={K}"] = lambda s=n_steps, K=K: smile(model, "markov", args.paths, s, args.seed, K)
        methods["hybrid"] = lambda s=n_steps: smile(model, "hybrid", args.paths, s, args.seed, None)
        t = measure(methods, args.repeats)
        print(f"{n_steps:>6} " + " ".join(f"{t[n]:13.3f}" for n in names) + "  " +
              " ".join(f"{t['exact'] / t[n]:13.2f}" for n in others) + "  " +
              " ".join(f"{t['exact32'] / t[n]:13.2f}" for n in others), flush=True)



def bias_table(model, args):
    names = ["exact"] + [f"markov K={K}" for K in args.num_processes] + ["hybrid"]
    steps = 256
    print(f"\n2. at {steps} steps, {args.bias_paths} paths each: vol difference to exact on the same grid "
          f"(k = {K_SMILE.tolist()}), in units of the combined standard error, and seconds")
    ref = smile(model, "exact", args.bias_paths, steps, args.seed + 1, None)
    print(f"{'exact':>13}: vols {[round(float(v), 4) for v in ref.implied_vol]}  s.e. "
          f"{[round(float(v), 4) for v in ref.std_error]}  {ref.info['seconds']:.1f} s")
    for name in names[1:]:
        method = name.split()[0]
        K = int(name.split("=")[1]) if "=" in name else None
        s = smile(model, method, args.bias_paths, steps, args.seed + 2, K)
        d = s.implied_vol - ref.implied_vol
        z = d / (s.std_error ** 2 + ref.std_error ** 2).sqrt()
        print(f"{name:>13}: diff {[f'{float(x):+.4f}' for x in d]}  z {[f'{float(x):+.1f}' for x in z]}  "
              f"{s.info['seconds']:.1f} s", flush=True)


def variance_reduction_table(model, args):
    paths, steps = 1 << 15, 256
    print(f"\n3. variance of the price estimators relative to plain Monte Carlo, {paths} paths, exact, {steps} steps")
    print(f"{'estimator':>28} " + " ".join(f"{'k=' + str(float(x)):>12}" for x in K_SMILE) + f" {'seconds':>8}")
    base = None
    for anti, cv in ((False, False), (True, False), (False, True), (True, True)):
        s = model._smile_mc(K_SMILE, T, "exact", paths, steps, torch.Generator().manual_seed(args.seed + 3), anti, cv,
                            None, False, {})
        var = s.price_std_error ** 2
        base = var if base is None else base
        label = {(False, False): "plain", (True, False): "antithetic", (False, True): "control variate S_T",
                 (True, True): "antithetic + control variate"}[(anti, cv)]
        print(f"{label:>28} " + " ".join(f"{float(r):12.3f}" for r in var / base) + f" {s.info['seconds']:8.2f}")


def calibration_table(args):
    from fracsde import markov_rates
    from models.roughvol import calibrate
    from models.roughvol.calibrate import CALIBRATION_PROCESSES

    k = torch.linspace(-0.3, 0.2, 6, dtype=torch.float64)
    mats = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64)
    truth = RoughBergomi(hurst=0.1, xi=0.04, eta=1.9, rho=-0.9)
    start = RoughBergomi(hurst=0.3, xi=0.04, eta=1.0, rho=-0.5)
    paths, steps, seed = 1 << 12, 32, 7
    rates = markov_rates(0.1, CALIBRATION_PROCESSES, rates="optimal", horizon=1.0).rates
    print(f"\n4. calibration of (H, eta, rho) from {start} to {truth}; {paths} paths x {steps} steps per "
          f"evaluation, k = {k.tolist()}, T = {mats.tolist()}")
    for label, target_seed, target_paths in (("same random numbers", seed, paths),
                                             ("independent surface", seed + 100, 1 << 15)):
        target, _ = truth.surface(k, mats, target_paths, steps, torch.Generator().manual_seed(target_seed),
                                  CALIBRATION_PROCESSES, rates)
        for optimizer in ("adam", "nelder-mead"):
            fit = calibrate(start, k, mats, target, generator=torch.Generator().manual_seed(seed), paths=paths,
                            steps=steps, iterations=300, rates=rates, optimizer=optimizer, verbose=False)
            r = fit.report
            print(f"{label:>20} {optimizer:>12}: {r.iterations:4d} iterations, {r.pricer_calls:4d} pricer calls, "
                  f"{r.seconds:6.1f} s, vol RMSE {r.rmse:.2e}, H {fit.hurst:.4f}, eta {fit.eta:.4f}, rho {fit.rho:.4f}",
                  flush=True)


def rough_heston_table(args):
    from fracsde import markov_rates
    from fracsde.rules import kernel_projection
    from models.roughvol import RoughHeston, implied_vol
    from models.roughvol.fourier import lewis_call_prices, lifted_log_char_function

    params = {"hurst": 0.1, "v0": 0.02, "theta": 0.02, "lam": 0.3, "nu": 0.3, "rho": -0.7}
    lp = {n: params[n] for n in ("v0", "theta", "lam", "nu", "rho")}
    model = RoughHeston(**params)
    k = torch.tensor([-0.5, 0.0, 0.15], dtype=torch.float64)
    ref = model.smile(k, 1.0, method="fourier", steps=128)
    paths = 1 << 13
    print(f"\n5. rough Heston {params}, T = 1, k = {k.tolist()}: Fourier vols "
          f"{[round(float(v), 5) for v in ref.implied_vol]}")
    for K in (8, 16):
        rule = markov_rates(0.1, K, rates="optimal", horizon=1.0)
        w = kernel_projection(0.1, rule.rates, 1.0)

        def log_phi(u, g=rule.rates, w=w):
            return lifted_log_char_function(u, 1.0, g, w, **lp)

        call = lewis_call_prices(k, log_phi, 100.0, 8.0)
        lifted = implied_vol(torch.where(k < 0, call - 1 + k.exp(), call), k, 1.0, option="otm")
        print(f"  lifted model (K = {K}, optimal rule) by Fourier, minus rough: "
              f"{[f'{float(x):+.1e}' for x in lifted - ref.implied_vol]}", flush=True)
    print(f"  Markov Monte Carlo, {paths} paths:")
    uncapped = markov_rates(0.1, 8, rates="optimal", horizon=1.0).rates
    for label, K, rates, steps in (("K=8 uncapped rates", 8, uncapped, 64), ("K=8 uncapped rates", 8, uncapped, 256),
                                   ("K=8 uncapped rates", 8, uncapped, 1024), ("K=8 capped 64/T", 8, None, 2048),
                                   ("K=3 capped (default)", 3, None, 1024), ("K=3 capped (default)", 3, None, 2048)):
        start = time.perf_counter()
        s = model.smile(k, 1.0, method="markov", paths=paths, steps=steps, rates=rates, num_processes=K,
                        generator=torch.Generator().manual_seed(1))
        seconds = time.perf_counter() - start
        ts = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
        sampler = model._path_sampler("markov", ts, model._markov_options(K, rates))
        v = torch.cat([block[1] for block in sampler(4096, torch.Generator().manual_seed(2))], dim=1)
        print(f"{label:>22}, {steps:>5} steps, {seconds:5.1f} s: Markov - Fourier "
              f"{[f'{float(x):+.4f}' for x in s.implied_vol - ref.implied_vol]} "
              f"(s.e. {[round(float(x), 4) for x in s.std_error]}), V ≤ 0 (truncated) on "
              f"{float((v <= 0).double().mean()):.0%} of the steps", flush=True)
    print("  Abi Jaber's implicit factor step (tried, not adopted), K = 8, uncapped rates:")
    for steps in (64, 256, 1024):
        implicit = model.replace()
        implicit._path_sampler = implicit_heston_sampler(implicit, uncapped, 1.0)
        s = implicit.smile(k, 1.0, method="markov", paths=paths, steps=steps,
                           generator=torch.Generator().manual_seed(1))
        print(f"{'implicit step':>22}, {steps:>5} steps: Markov - Fourier "
              f"{[f'{float(x):+.4f}' for x in s.implied_vol - ref.implied_vol]} "
              f"(s.e. {[round(float(x), 4) for x in s.std_error]})", flush=True)


def implicit_heston_sampler(model, rates, horizon):
    """The lifted rough Heston variance by Abi Jaber's (2019) scheme, for comparison: θ enters through the exact
    g₀(t) = V₀ + θ ∫₀ᵗ K̂, the factors take an implicit step in their mean reversion,
    U ← (U − λV h + ν√V⁺ ΔW) / (1 + γh), V = g₀ + ωᵀU — one normal per step whatever K. Weights: the L² projection.
    Returns a ``_path_sampler`` replacement yielding one block (V⁺ at the left points, ΔW, mirror None)."""
    from fracsde import kernel_projection

    g = torch.as_tensor(rates, dtype=torch.float64)
    w = kernel_projection(float(model.hurst), g, horizon).double()
    v0, theta, lam, nu = (float(getattr(model, n)) for n in ("v0", "theta", "lam", "nu"))

    def path_sampler(method, ts, markov):
        N = ts.numel() - 1
        h = float(ts[1] - ts[0])
        g0 = v0 + theta * ((-torch.expm1(-g[None, :] * ts[:, None]) / g[None, :]) @ w)
        denom = 1 + g * h

        def sample(n, gen):
            dw = torch.randn(n, N, generator=gen, dtype=torch.float64) * math.sqrt(h)
            U = torch.zeros(n, g.numel(), dtype=torch.float64)
            V = torch.full((n,), v0, dtype=torch.float64)
            vs = torch.empty(n, N, dtype=torch.float64)
            for i in range(N):
                vs[:, i] = V.clamp(min=0.0)
                U = (U + (-lam * V * h + nu * vs[:, i].sqrt() * dw[:, i])[:, None]) / denom
                V = g0[i + 1] + U @ w
            return [(0, vs, dw, None)]

        return sample

    return path_sampler


_MEMORY_CHILD = """
import sys, torch
torch.set_num_threads(1)
from models.roughvol import RoughBergomi


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])


m = RoughBergomi(hurst=0.07, xi=0.235 ** 2, eta=1.9, rho=-0.9)
k = torch.tensor([-0.1787, 0.0, 0.1041], dtype=torch.float64)
method, steps = sys.argv[1], int(sys.argv[2])
m.smile(k, 0.25, method=method, steps=8, paths=256)                       # warm: imports, first allocations
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                                                           # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
m.smile(k, 0.25, method=method, steps=steps, paths=1 << 14, generator=torch.Generator().manual_seed(0))
print(status("VmHWM") - before)
"""


def memory_table(args):
    """Linux only (/proc/self/clear_refs resets the peak resident set to the current one)."""
    import subprocess
    import sys

    def peak_mb(method, steps):
        out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, method, str(steps)], capture_output=True,
                             text=True, check=True)
        return int(out.stdout.strip().splitlines()[-1]) / 1024

    print("\n6. peak resident memory added by one smile (2^14 paths, after a warm-up smile), MB")
    print(f"{'steps':>6} {'markov':>8} {'exact':>8}")
    for steps in (256, 1024, 4096):
        print(f"{steps:>6} " + " ".join(f"{peak_mb(m, steps):8.0f}" for m in ("markov", "exact")), flush=True)


def profile_table(model, args):
    from torch.profiler import ProfilerActivity, profile

    from fracsde.noise import JOINT_INNOVATION_BLOCK, _joint_innovations_plan

    smile(model, "markov", args.paths, 512, args.seed, 16)                       # warm: plan built and cast
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        smile(model, "markov", args.paths, 512, args.seed, 16)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\n7. share of a Markov smile's self time (512 steps, K = 16, {args.paths} paths):")
    for e in events[:6]:
        print(f"  {e.key:>16} {e.self_cpu_time_total / total:6.1%}")
    import fracsde.noise as noise_module

    default = noise_module.JOINT_INNOVATION_BLOCK
    print(f"  Markov smile (K = 16, {args.paths} paths) by the joint plan's steps per block, min of {args.repeats}:")
    for n_steps in (512, 2048):
        def with_block(block, n_steps=n_steps):
            noise_module.JOINT_INNOVATION_BLOCK = block
            try:
                return smile(model, "markov", args.paths, n_steps, args.seed, 16)
            finally:
                noise_module.JOINT_INNOVATION_BLOCK = default
        t = measure({b: (lambda b=b: with_block(b)) for b in (8, 16, 32)}, args.repeats)
        print(f"  {n_steps:>5} steps: " + ", ".join(f"{b} steps {t[b]:.3f} s" for b in (8, 16, 32)), flush=True)
    steps, batch = 2048, 1 << 13
    ts = torch.linspace(0.0, T, steps + 1, dtype=torch.float64)
    noise = model._noise(16, "optimal", T)
    tiny = torch.finfo(torch.float32).tiny
    print(f"  joint plan at {steps} steps, float32 operators, {batch} paths: block products with the operator as "
          f"the library casts it (denormals flushed) and as a plain cast")
    for block in sorted({JOINT_INNOVATION_BLOCK, 32}):
        plan = _joint_innovations_plan(ts, noise.gammas.double(), noise.weights.double(), "type2", block, True)
        for name in ("apply", "rest"):
            op = plan[name]
            plain = op.to(torch.float32)
            flushed = torch.where(op.abs() < tiny, 0.0, op).to(torch.float32)
            denormal = int(((plain != 0) & (plain.abs() < tiny)).sum())
            z = torch.randn(1, op.shape[2], batch, dtype=torch.float32)
            t = measure({"flushed": lambda f=flushed, z=z: [torch.bmm(f[b:b + 1], z) for b in range(f.shape[0])],
                         "plain": lambda p=plain, z=z: [torch.bmm(p[b:b + 1], z) for b in range(p.shape[0])]},
                        args.repeats)
            print(f"  {block:>2}-step blocks, {name:>5} ({tuple(op.shape)}): {denormal:4d} denormal entries; "
                  f"flushed {t['flushed']:.3f} s, plain {t['plain']:.3f} s, plain / flushed "
                  f"{t['plain'] / t['flushed']:.2f}", flush=True)


if __name__ == "__main__":
    main()
