"""Image-model throughput: FVP(H=0.9, K=3) against VP with the same U-Net.

Prints, side by side: training images/s (target: FVP takes at most 1.05x VP's time per image), sampling
images/s, and the peak memory of sampling at two step counts (target: independent of the number of steps,
since the sampler streams its noise). Timings interleave VP and FVP repeats and report medians, because the
machine is noisy; read the ratios, not the absolute numbers.

    python benchmarks/bench_images.py                      # ~1-2 min on 2 CPU cores
    python benchmarks/bench_images.py --preset mnist-small --batch-size 64 --device cuda
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SPECS = {"vp": "vp", "fvp": "fvp:H=0.9,K=3"}      # short name → models.gfdm.DynamicsSpec text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="digits-small", help="U-Net preset (image size follows the preset)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch")
    p.add_argument("--train-steps", type=int, default=20, help="timed training steps per repeat")
    p.add_argument("--sample-batch", type=int, default=256, help="sampling batch")
    p.add_argument("--sample-steps", type=int, default=50, help="sampler steps per timed sampling run")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats (medians are reported)")
    p.add_argument("--memory-steps", type=int, nargs=2, default=[20, 200], help="two step counts for peak memory")
    p.add_argument("--memory-batch", type=int, default=1024, help="sampling batch of the memory measurement")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="tiny settings (checks the script runs)")
    p.add_argument("--memory-child", nargs=3, metavar=("DYN", "STEPS", "DEVICE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _setup(preset: str, spec: str, device):
    from models.gfdm.spec import DynamicsSpec
    from models.gfdm.unet import PRESETS, UNet

    torch.manual_seed(0)
    net = UNet(PRESETS[preset]).to(device)
    for p in net.parameters():        # leave the zero init so that the sampler does real work
        if torch.count_nonzero(p) == 0 and p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    return net, DynamicsSpec.parse(spec).build().to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_training(preset, batch, steps, device, spec) -> float:
    """Seconds per training step (score-matching loss, backward, Adam) after two warm-up steps."""
    import models.gfdm as core

    net, dyn = _setup(preset, spec, device)
    cfg = net.config
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    amp = device.type == "cuda"
    from models.gfdm.unet import AutocastNet

    model = AutocastNet(net, amp)

    def step():
        loss = core.score_matching_loss(model, dyn, x0, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for _ in range(2):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def time_sampling(preset, batch, steps, device, spec) -> float:
    import models.gfdm as core

    net, dyn = _setup(preset, spec, device)
    cfg = net.config
    shape = (batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        core.sample(net.eval(), dyn, shape, steps=2, generator=g, device=device)
        _sync(device)
        t0 = time.perf_counter()
        core.sample(net, dyn, shape, steps=steps, generator=g, device=device)
        _sync(device)
    return time.perf_counter() - t0


def memory_child(preset, batch, name, steps, device) -> dict:
    """Peak memory growth of one sampling run over a 2-step warm-up (RSS on CPU, allocator on CUDA)."""
    import models.gfdm as core

    net, dyn = _setup(preset, SPECS[name], device)
    cfg = net.config
    shape = (batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        core.sample(net.eval(), dyn, shape, steps=2, device=device)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        core.sample(net, dyn, shape, steps=steps, device=device)
        _sync(device)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"growth_mib": (peak - base) / 2**20, "peak_mib": peak / 2**20}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.memory_child:
        name, steps, dev = args.memory_child
        print(json.dumps(memory_child(args.preset, args.memory_batch, name, int(steps), torch.device(dev))))
        return 0
    if args.quick:
        args.preset, args.batch_size, args.train_steps, args.sample_batch = "digits-tiny", 32, 3, 32
        args.sample_steps, args.repeats, args.memory_steps, args.memory_batch = 5, 1, [5, 20], 64

    print(f"bench_images: preset {args.preset}, device {device}, torch threads {torch.get_num_threads()}, "
          f"train batch {args.batch_size} x {args.train_steps} steps, sampling batch {args.sample_batch} x "
          f"{args.sample_steps} steps, {args.repeats} interleaved repeats", flush=True)
    train_t = {name: [] for name in SPECS}
    sample_t = {name: [] for name in SPECS}
    for _ in range(args.repeats):
        for name, spec in SPECS.items():
            train_t[name].append(time_training(args.preset, args.batch_size, args.train_steps, device, spec))
            sample_t[name].append(time_sampling(args.preset, args.sample_batch, args.sample_steps, device, spec))
    train_ratio = statistics.median(f / v for f, v in zip(train_t["fvp"], train_t["vp"], strict=True))
    sample_ratio = statistics.median(f / v for f, v in zip(sample_t["fvp"], sample_t["vp"], strict=True))
    res = {"preset": args.preset, "device": str(device), "threads": torch.get_num_threads()}
    for name in ("vp", "fvp"):
        res[f"train_img_per_s_{name}"] = args.batch_size / statistics.median(train_t[name])
        res[f"sample_img_per_s_{name}"] = args.sample_batch / statistics.median(sample_t[name])
    res["train_time_ratio_fvp_vp"] = train_ratio
    res["sample_time_ratio_fvp_vp"] = sample_ratio

    mem = {}
    for name in ("vp", "fvp"):
        for steps in args.memory_steps:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--preset", args.preset, "--memory-batch",
                   str(args.memory_batch), "--threads", str(torch.get_num_threads()), "--memory-child", name,
                   str(steps), str(device)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            mem[(name, steps)] = json.loads(out.stdout.strip().splitlines()[-1])
    s1, s2 = args.memory_steps
    from models.gfdm.unet import PRESETS

    pixels = PRESETS[args.preset].in_channels * PRESETS[args.preset].image_size ** 2
    res["memory"] = {f"{n}@{s}": v for (n, s), v in mem.items()}

    print("\n| | VP | FVP(H=0.9,K=3) | FVP / VP time |")
    print("|---|---|---|---|")
    print(f"| training img/s | {res['train_img_per_s_vp']:.0f} | {res['train_img_per_s_fvp']:.0f} | "
          f"{train_ratio:.3f} (target <= 1.05) |")
    print(f"| sampling img/s ({args.sample_steps} steps) | {res['sample_img_per_s_vp']:.1f} | "
          f"{res['sample_img_per_s_fvp']:.1f} | {sample_ratio:.3f} |")
    unit = "allocator peak growth" if device.type == "cuda" else "max-RSS growth"
    for steps in (s1, s2):
        print(f"| sampling memory, {steps} steps, batch {args.memory_batch} ({unit}, MiB) | "
              f"{mem[('vp', steps)]['growth_mib']:.1f} | {mem[('fvp', steps)]['growth_mib']:.1f} | |")
    print(f"\nsampling memory growth from {s1} to {s2} steps: VP "
          f"{mem[('vp', s2)]['growth_mib'] - mem[('vp', s1)]['growth_mib']:+.1f} MiB, FVP "
          f"{mem[('fvp', s2)]['growth_mib'] - mem[('fvp', s1)]['growth_mib']:+.1f} MiB (a sampler that stored its "
          f"noise would need {(s2 - s1) * args.memory_batch * pixels * 4 * 4 / 2**20:.0f} MiB more for K=3)")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
