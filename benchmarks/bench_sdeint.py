"""fracsde.sdeint against plain torchsde, adjoint memory, and the reversible-Heun pitfall.

Sections (all by default):
  speed     MLP drift (width 128), d = 16, batch 512, 1000 steps: fracsde.sdeint with an MA-fBM
            (K = 3) against the same SDE driven by Brownian motion in torchsde.sdeint. Both use a
            BrownianInterval with the dt hint. Prints time ratios (fracsde / torchsde).
  memory    peak memory of adjoint (and, for contrast, backprop) gradients at several step counts,
            each in a fresh subprocess. Two measures: peak live CPU tensor bytes from the torch
            profiler's allocation events (alloc/free timeline, cumulative max), and the growth of the
            process's peak RSS over its size before the measured run.
  revheun   adjoint accuracy on the stiff OU components, for several gamma_max: reversible Heun's
            forward error against midpoint, and float32/float64 adjoint gradients (reversible Heun,
            midpoint; with and without sdeint's adjoint checkpoints) against float64 backprop.

Example:
  python benchmarks/bench_sdeint.py --section speed --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torchsde
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fracsde.markov import MarkovApproxFBM  # noqa: E402
from fracsde.sde import FractionalSDE, sdeint  # noqa: E402


def mlp(d, width):
    return nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, d))


class FractionalMLP(FractionalSDE):
    noise_type = "diagonal"

    def __init__(self, noise, net, sde_type, sigma=0.3):
        super().__init__(noise, sde_type=sde_type)
        self.net, self.sigma = net, sigma

    def f(self, t, x):
        return self.net(x)

    def g(self, t, x):
        return torch.full_like(x, self.sigma)


class PlainMLP(nn.Module):
    noise_type = "diagonal"

    def __init__(self, net, sde_type, sigma=0.3):
        super().__init__()
        self.net, self.sigma, self.sde_type = net, sigma, sde_type

    def f(self, t, x):
        return self.net(x)

    def g(self, t, x):
        return torch.full_like(x, self.sigma)


def timed(fn):
    """CPU time of this process (single-threaded torch): robust to other jobs sharing the machine,
    which inflate wall time by waiting, not by work."""
    start = time.process_time()
    fn()
    return time.process_time() - start


# ------------------------------------------------------------------------------------ speed
def bench_speed(args):
    torch.manual_seed(0)
    net = mlp(args.d, args.width)
    noise = MarkovApproxFBM(0.7, num_processes=args.K)
    x0 = torch.randn(args.batch, args.d)
    ts = torch.tensor([0.0, 1.0])
    dt = 1.0 / args.steps
    print(f"speed: MLP width {args.width}, d = {args.d}, batch {args.batch}, {args.steps} steps, K = {args.K}, "
          f"torch threads = {torch.get_num_threads()}; process CPU seconds, min of {args.repeats} interleaved runs; "
          f"ratio = fracsde / torchsde (min), and the median of the per-pair ratios")
    print(f"{'method':10s} {'mode':9s} {'fracsde s':>10s} {'torchsde s':>11s} {'ratio':>6s} {'median':>7s}")
    for method, sde_type in (("euler", "ito"), ("midpoint", "stratonovich")):
        frac, plain = FractionalMLP(noise, net, sde_type), PlainMLP(net, sde_type)
        for mode in ("forward", "backprop"):
            def run_frac(mode=mode, frac=frac, method=method):     # bound: called in this iteration
                with torch.set_grad_enabled(mode == "backprop"):
                    xs = sdeint(frac, x0, ts, method=method, dt=dt, entropy=1)
                    if mode == "backprop":
                        (xs[-1] ** 2).mean().backward()

            def run_plain(mode=mode, plain=plain, method=method):
                with torch.set_grad_enabled(mode == "backprop"):
                    bm = torchsde.BrownianInterval(0.0, 1.0, size=(args.batch, args.d), entropy=1, dt=dt)
                    xs = torchsde.sdeint(plain, x0, ts, bm=bm, method=method, dt=dt)
                    if mode == "backprop":
                        (xs[-1] ** 2).mean().backward()

            tf, tp = [], []
            for _ in range(args.repeats):  # interleaved, so load changes hit both alike
                tf.append(timed(run_frac))
                tp.append(timed(run_plain))
            pairs = sorted(a / b for a, b in zip(tf, tp, strict=True))
            print(f"{method:10s} {mode:9s} {min(tf):10.3f} {min(tp):11.3f} {min(tf) / min(tp):6.2f} "
                  f"{pairs[len(pairs) // 2]:7.2f}")
    if args.default_bm:
        plain = PlainMLP(net, "ito")
        with torch.no_grad():
            t_default = timed(lambda: torchsde.sdeint(plain, x0, ts, method="euler", dt=dt))
            bm = torchsde.BrownianInterval(0.0, 1.0, size=(args.batch, args.d), entropy=1, dt=dt)
            t_hint = timed(lambda: torchsde.sdeint(plain, x0, ts, bm=bm, method="euler", dt=dt))
        print(f"torchsde's default Brownian motion (no dt hint): {t_default:.3f} s vs {t_hint:.3f} s with the hint "
              f"({t_default / t_hint:.1f}x)")


# ------------------------------------------------------------------------------------ memory
def memory_child(args):
    """One measurement in this (fresh) process; prints a JSON line."""
    torch.manual_seed(0)
    net = mlp(args.d, args.width)
    noise = MarkovApproxFBM(0.7, num_processes=args.K)
    sde = FractionalMLP(noise, net, "stratonovich")
    x0 = torch.randn(args.batch, args.d)
    ts = torch.tensor([0.0, 1.0])
    adjoint = args.mode == "adjoint"

    def run(steps):
        xs = sdeint(sde, x0, ts, method="midpoint", dt=1.0 / steps, adjoint=adjoint, entropy=1)
        (xs[-1] ** 2).mean().backward()

    run(10)  # warm-up: lazy imports, allocator pools, kernels
    rss_before = _rss_bytes()
    run(args.steps)
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run(args.steps)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    print(json.dumps({"mode": args.mode, "steps": args.steps, "peak_tensor_bytes": peak,
                      "peak_rss_growth_bytes": max(rss_growth, 0)}))


def _rss_bytes():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_memory(args):
    print(f"memory: MLP width {args.width}, d = {args.d}, batch {args.batch}, K = {args.K}, midpoint, "
          f"each row a fresh process")
    rows = {}
    for mode, steps in (("adjoint", 100), ("adjoint", 1000), ("backprop", 100), ("backprop", 300)):
        cmd = [sys.executable, os.path.abspath(__file__), "--section", "_memory_child", "--mode", mode,
               "--steps", str(steps), "--batch", str(args.batch), "--d", str(args.d), "--width", str(args.width),
               "--K", str(args.K)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1")).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows[(mode, steps)] = row
        print(f"  {mode:8s} {steps:5d} steps: peak tensor memory {row['peak_tensor_bytes'] / 2**20:8.1f} MiB, "
              f"peak RSS growth {row['peak_rss_growth_bytes'] / 2**20:8.1f} MiB")
    for mode, (a, b) in (("adjoint", (100, 1000)), ("backprop", (100, 300))):
        ra, rb = rows[(mode, a)], rows[(mode, b)]
        print(f"{mode}: {b} vs {a} steps: tensor peak ratio "
              f"{rb['peak_tensor_bytes'] / ra['peak_tensor_bytes']:.2f}, RSS growth ratio "
              f"{rb['peak_rss_growth_bytes'] / max(ra['peak_rss_growth_bytes'], 1):.2f}")


# ------------------------------------------------------------------------------------ reversible Heun
class SmallMLP(FractionalSDE):
    noise_type = "additive"
    sde_type = "stratonovich"

    def __init__(self, noise, net):
        super().__init__(noise)
        self.net = net

    def f(self, t, x):
        return self.net(x)

    def g(self, t, x):
        return torch.full_like(x, 0.5).unsqueeze(-1)


class CastBrownian(torchsde.BrownianInterval.__mro__[1]):
    """A float64 Brownian motion seen in another dtype: one path for float32 and float64 solves."""

    def __init__(self, base, dtype):
        self.base, self._dtype = base, dtype

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        out = self.base(float(ta), None if tb is None else float(tb), return_U=return_U, return_A=return_A)
        return tuple(o.to(self._dtype) for o in out) if isinstance(out, tuple) else out.to(self._dtype)

    def __repr__(self):
        return f"CastBrownian({self.base!r}, {self._dtype})"

    dtype = property(lambda self: self._dtype)
    device = property(lambda self: self.base.device)
    shape = property(lambda self: self.base.shape)
    levy_area_approximation = property(lambda self: self.base.levy_area_approximation)


def bench_revheun(args):
    print("adjoint accuracy on the stiff OU components: T = 1, dt = 0.01, batch 64, d = 4 MLP drift (width 32),")
    print("additive noise, K = 3, H = 0.7, all on one Brownian path (a float64 BrownianInterval, cast for float32).")
    print("fwd: max |reversible Heun - midpoint| at T (float64). Gradient columns: relative L2 error of dL/dparams")
    print("against float64 backprop through the same scheme; ckpt = sdeint's adjoint checkpoints (default on).")
    cols = [("reversible_heun", torch.float32, False, False), ("reversible_heun", torch.float64, True, False),
            ("reversible_heun", torch.float32, True, False), ("reversible_heun", torch.float64, True, True),
            ("reversible_heun", torch.float32, True, True), ("midpoint", torch.float64, True, False),
            ("midpoint", torch.float32, True, False), ("midpoint", torch.float64, True, True),
            ("midpoint", torch.float32, True, True)]
    short = {"reversible_heun": "revH", "midpoint": "mid", torch.float32: "f32", torch.float64: "f64"}
    names = [f"{short[m]} {short[d]} " + ("backprop" if not a else ("adj+ckpt" if c else "adj")) for m, d, a, c in cols]
    print(f"{'gamma_max':>9s} {'fwd':>9s} " + " ".join(f"{n:>17s}" for n in names))
    import warnings
    for gamma_max in args.gamma_max:
        torch.manual_seed(0)
        net64 = mlp(4, 32).double()
        x0 = torch.randn(64, 4, dtype=torch.float64)
        ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
        noise = MarkovApproxFBM(0.7, num_processes=3, gamma_max=gamma_max)
        base = torchsde.BrownianInterval(0.0, 1.0, size=(64, 1), dtype=torch.float64, entropy=5, dt=0.01)

        def grads(method, dtype, adjoint, checkpoints, *, net64=net64, noise=noise, x0=x0, ts=ts, base=base):
            net = mlp(4, 32).to(dtype)
            net.load_state_dict({k: v.to(dtype) for k, v in net64.state_dict().items()})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                xs = sdeint(SmallMLP(noise, net), x0.to(dtype), ts.to(dtype), method=method, dt=0.01,
                            adjoint=adjoint, adjoint_checkpoints=checkpoints, bm=CastBrownian(base, dtype),
                            check_finite=False)
            (xs[-1] ** 2).mean().backward()
            return xs[-1].detach().double(), torch.cat([p.grad.flatten().double() for p in net.parameters()])

        refs = {m: grads(m, torch.float64, False, False) for m in ("reversible_heun", "midpoint")}
        fwd = float((refs["reversible_heun"][0] - refs["midpoint"][0]).abs().max())
        errs = []
        for method, dtype, adjoint, checkpoints in cols:
            g, ref = grads(method, dtype, adjoint, checkpoints)[1], refs[method][1]
            errs.append(float((g - ref).norm() / ref.norm()))
        print(f"{gamma_max:9.1f} {fwd:9.2e} " + " ".join(f"{e:17.2e}" for e in errs))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", default="all", choices=["all", "speed", "memory", "revheun", "_memory_child"])
    parser.add_argument("--batch", type=int, default=512, help="batch size (default 512)")
    parser.add_argument("--d", type=int, default=16, help="state dimension (default 16)")
    parser.add_argument("--width", type=int, default=128, help="MLP width (default 128)")
    parser.add_argument("--steps", type=int, default=1000, help="steps on [0, 1] (default 1000)")
    parser.add_argument("--K", type=int, default=3, help="number of OU processes (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats, min taken (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--default-bm", action="store_true", help="also time torchsde's default Brownian motion")
    parser.add_argument("--gamma-max", type=float, nargs="+", default=[2.0, 5.0, 10.0, 20.0],
                        help="gamma_max values for the revheun section (default 2 5 10 20)")
    parser.add_argument("--mode", default="adjoint", choices=["adjoint", "backprop"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.section == "_memory_child":
        return memory_child(args)
    if args.section in ("all", "speed"):
        bench_speed(args)
    if args.section in ("all", "memory"):
        bench_memory(args)
    if args.section in ("all", "revheun"):
        bench_revheun(args)


if __name__ == "__main__":
    main()
