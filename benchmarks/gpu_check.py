"""One prepared check for a lent GPU: VP vs FVP(H=0.9, K=3) on Fashion-MNIST (or MNIST) at equal budget.

Trains VP for half of ``--minutes`` (bf16 autocast on CUDA), then FVP for exactly as many steps (equal
images seen), samples both with EMA weights, and reports training and sampling images/s, the offline FID
(project classifier features — not comparable to published FIDs) and VS_p. Results go to
``OUT/results.md`` and ``OUT/results.json``.

    python benchmarks/gpu_check.py                      # on a GPU machine, about 8 + 3 minutes
    python benchmarks/gpu_check.py --smoke              # seconds on CPU (digits, tiny net): tests the script
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def _gib(value: float) -> str:
    """A peak-memory figure; CUDA only (on CPU torch does not track it)."""
    return "n/a (CPU)" if math.isnan(value) else f"{value:.2f} GiB"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=float, default=8.0, help="total training wall time (split VP / FVP)")
    p.add_argument("--dataset", default="auto", choices=("auto", "fashion-mnist", "mnist", "digits"),
                   help="auto: MNIST if found under --data-root/$GFDM_DATA, else Fashion-MNIST")
    p.add_argument("--data-root", default=None, help="folder with MNIST/Fashion-MNIST idx files")
    p.add_argument("--preset", default="mnist", help="U-Net preset (mnist = the paper's MNIST net)")
    p.add_argument("--batch-size", type=int, default=256, help="training batch")
    p.add_argument("--lr", type=float, default=2e-4, help="learning rate")
    p.add_argument("--num-samples", type=int, default=2000, help="samples per dynamics for FID / VS_p")
    p.add_argument("--sample-steps", type=int, default=250, help="Euler–Maruyama steps when sampling")
    p.add_argument("--sample-batch", type=int, default=1000, help="images per sampler batch")
    p.add_argument("--out", default="runs/gpu_check", help="output folder")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run on digits (tests this script)")
    return p.parse_args(argv)


def main(argv=None) -> int:   # one straight script (setup, two runs, report): ~80 lines read top to bottom
    args = parse_args(argv)
    from models.gfdm.checkpoint import load_for_sampling
    from models.gfdm.compare import format_table
    from models.gfdm.config import TrainConfig
    from models.gfdm.data import DatasetNotFoundError, load_dataset
    from models.gfdm.evaluate import evaluate_samples
    from models.gfdm.generate import derive_seed, generate, save_grid
    from models.gfdm.spec import DynamicsSpec
    from models.gfdm.train import train

    cuda = torch.cuda.is_available()
    if args.smoke:
        args.dataset, args.preset, args.batch_size = "digits", "digits-tiny", 64
        args.num_samples, args.sample_steps, args.sample_batch = 64, 10, 64
        torch.set_num_threads(1)
    elif not cuda:
        print("gpu_check: no CUDA device here; run with --smoke to exercise the script on CPU", file=sys.stderr)
        return 1
    if args.dataset == "auto":
        try:
            load_dataset("mnist", args.data_root, "test")
            args.dataset = "mnist"
        except DatasetNotFoundError:
            args.dataset = "fashion-mnist"
    train_data = load_dataset(args.dataset, args.data_root, "train")
    test_data = load_dataset(args.dataset, args.data_root, "test")
    out = Path(args.out)
    device = torch.device("cuda" if cuda and not args.smoke else "cpu")
    info = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "dataset": args.dataset, "preset": args.preset,
            "batch_size": args.batch_size, "minutes": args.minutes, "smoke": args.smoke,
            "amp": "bf16" if device.type == "cuda" else "off"}
    print(json.dumps(info))

    rows, steps = [], None
    for spec in (DynamicsSpec.parse("vp"), DynamicsSpec.parse("fvp:H=0.9,K=3")):
        cfg = TrainConfig(dataset=args.dataset, data_root=args.data_root, dynamics=spec.text, preset=args.preset,
                          batch_size=args.batch_size,
                          lr=args.lr, steps=(20 if args.smoke else 10**9) if steps is None else steps,
                          time_limit=None if (args.smoke or steps is not None) else args.minutes / 2,
                          ema_halflife_kimg=50.0, log_every=10 if args.smoke else 50, ckpt_every=10**9,
                          sample_every=10**9, sample_num=16, grid_steps=10, out=str(out / spec.slug),
                          overwrite=True, device=str(device), amp="auto", progress=not args.smoke)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = train(cfg)
        steps = result["step"] if steps is None else steps
        model, dyn, _ = load_for_sampling(result["checkpoint"], device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        samples = generate(model, dyn, args.num_samples, train_data.shape, batch_size=args.sample_batch,
                           steps=args.sample_steps, seed=derive_seed(0, 0xC0FE), device=device,
                           amp=device.type == "cuda")
        if device.type == "cuda":
            torch.cuda.synchronize()
        sample_time = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        save_grid(samples[:64], out / f"grid-{spec.slug}.png")
        metrics = evaluate_samples(samples, train_data, test_data, device=device)
        result = {k: v for k, v in result.items() if k not in ("model", "ema")}
        rows.append({"label": spec.label, **result, **metrics, "sample_time_s": sample_time,
                     "sample_img_per_s": args.num_samples / sample_time, "sampling_peak_gib": peak})
        print(f"{spec.label}: steps {result['step']}, train {result['img_per_s']:.0f} img/s, "
              f"sampling {args.num_samples / sample_time:.1f} img/s, offline FID {metrics['fid']:.3f}, "
              f"VS_p {metrics['vs_p']:.2f}", flush=True)

    rows.append({"label": f"data ({args.dataset})", "reference": True, "vs_p": rows[0]["vs_p_data"]})
    vp, fvp = rows[0], rows[1]
    table = format_table(rows, "offline FID")
    text = (f"# gpu_check: VP vs FVP(H=0.9,K=3) at equal budget\n\n```\n{json.dumps(info, indent=1)}\n```\n\n"
            f"{table}\n\nSampling ({args.num_samples} images, {args.sample_steps} Euler–Maruyama steps, bf16 "
            f"autocast on CUDA): VP {vp['sample_img_per_s']:.1f} img/s, FVP {fvp['sample_img_per_s']:.1f} img/s; "
            f"peak sampling memory VP {_gib(vp['sampling_peak_gib'])}, FVP {_gib(fvp['sampling_peak_gib'])}.\n"
            f"Training time per image FVP / VP: {vp['img_per_s'] / fvp['img_per_s']:.3f}.\n\n"
            f"{vp['fid_label']}.\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
