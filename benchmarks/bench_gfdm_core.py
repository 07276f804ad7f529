"""GFDM core benchmarks: training-step time FVP(K=3) vs VP, and sampler peak memory vs the number of steps.

    python benchmarks/bench_gfdm_core.py                 # both, CPU, ~1 min
    python benchmarks/bench_gfdm_core.py --quick         # fewer repeats

1. One training step (score_matching_loss + backward + Adam) of the same network and batch under VP and under
   FVP(H=0.9, K=3); steps are interleaved VP/FVP and the median of the per-pair time ratios is reported (the
   machine is shared and noisy; ratios, not absolute times). Target: ≤ 1.05.
2. Peak memory of ``sample(..., steps=100)`` and ``steps=1000`` (each in a fresh subprocess: peak RSS on the
   CPU, ``torch.cuda.max_memory_allocated`` on a GPU), next to what pre-allocating all the noise would need.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.gfdm import FVP, DynamicsSpec, score_matching_loss  # noqa: E402


class SmallConvNet(nn.Module):
    """A small image ε-network (conv encoder–decoder with a time embedding), the same for every dynamics."""

    def __init__(self, channels: int = 3, width: int = 64):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, width))
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.down = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.up = nn.ConvTranspose2d(width, width, 4, stride=2, padding=1)
        self.out = nn.Conv2d(2 * width, channels, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, u, t):
        e = self.embed(torch.log(t)[:, None])[:, :, None, None]
        h0 = self.act(self.inp(u) + e)
        h = self.act(self.down(h0))
        h = self.act(self.mid(h) + e)
        h = self.act(self.up(h))
        return self.out(torch.cat([h, h0], 1))


def bench_training(batch: int, size: int, repeats: int, device: str) -> dict:
    dyns = {"VP": DynamicsSpec.parse("vp").build().to(device),
            "FVP(H=0.9,K=3)": FVP(hurst=0.9, num_processes=3).to(device)}
    torch.manual_seed(0)
    net = SmallConvNet().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    x0 = torch.randn(batch, 3, size, size, device=device)
    gen = torch.Generator(device=device).manual_seed(0)

    def step(dyn):
        loss = score_matching_loss(net, dyn, x0, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def timed(dyn):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(dyn)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for dyn in dyns.values():          # warm-up
        for _ in range(3):
            step(dyn)
    times = {k: [] for k in dyns}
    ratios = []
    for _ in range(repeats):
        a, b = timed(dyns["VP"]), timed(dyns["FVP(H=0.9,K=3)"])
        times["VP"].append(a)
        times["FVP(H=0.9,K=3)"].append(b)
        ratios.append(b / a)
    return {"batch": batch, "size": size, "median_s": {k: statistics.median(v) for k, v in times.items()},
            "ratio_median": statistics.median(ratios)}


_CHILD = r"""
import json, resource, sys, time, torch
sys.path.insert(0, {root!r})
from models.gfdm import FVP, sample
torch.set_num_threads(1)
device = {device!r}
dyn = FVP(hurst=0.9, num_processes=3).to(device)
model = lambda u, t: 0.1 * u
shape = ({batch}, 3, {size}, {size})
sample(model, dyn, shape, steps=2, device=device)          # warm-up: allocator, dynamics tables
if device.startswith("cuda"):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
x = sample(model, dyn, shape, steps={steps}, device=device, method={method!r})
if device.startswith("cuda"):
    torch.cuda.synchronize()
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {{"steps": {steps}, "seconds": dt, "peak_rss_mb": peak / 1024, "rss_growth_mb": (peak - base) / 1024}}
if device.startswith("cuda"):
    out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
print(json.dumps(out))
"""


def bench_memory(batch: int, size: int, device: str, method: str) -> list:
    rows = []
    for steps in (100, 1000):
        code = _CHILD.format(root=str(ROOT), device=device, batch=batch, size=size, steps=steps, method=method)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=32, help="training batch")
    p.add_argument("--size", type=int, default=16, help="image side (3 channels)")
    p.add_argument("--repeats", type=int, default=40, help="interleaved VP/FVP step pairs")
    p.add_argument("--sample-batch", type=int, default=256, help="batch of the memory benchmark")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="10 repeats")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    repeats = 10 if a.quick else a.repeats
    tr = bench_training(a.batch, a.size, repeats, a.device)
    print(f"training step, batch {a.batch}×3×{a.size}×{a.size}, {repeats} interleaved pairs on {a.device}:")
    for k, v in tr["median_s"].items():
        print(f"  {k:16s} median {1e3 * v:7.2f} ms")
    print(f"  FVP/VP time ratio (median of pairs): {tr['ratio_median']:.3f}   (target <= 1.05)")
    d = 3 * a.size * a.size
    print(f"sampling peak memory, batch {a.sample_batch}×3×{a.size}×{a.size}, FVP(K=3), reverse SDE:")
    mem = bench_memory(a.sample_batch, a.size, a.device, "sde")
    for r in mem:
        prealloc = r["steps"] * a.sample_batch * d * 4 / 2 ** 20
        extra = f", cuda peak {r['cuda_peak_mb']:.1f} MB" if "cuda_peak_mb" in r else ""
        print(f"  steps {r['steps']:5d}: peak RSS {r['peak_rss_mb']:8.1f} MB (growth during sampling "
              f"{r['rss_growth_mb']:6.1f} MB{extra}); pre-allocated noise would be {prealloc:8.1f} MB; "
              f"{r['seconds']:.1f} s")
    key = "cuda_peak_mb" if "cuda_peak_mb" in mem[0] else "peak_rss_mb"
    print(f"  peak memory ratio 1000/100 steps: {mem[1][key] / mem[0][key]:.3f}   (target ~1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
