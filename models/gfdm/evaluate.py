"""Evaluation of generated images: FID (standard or offline, always labelled), pixel Vendi score and NLL."""
from __future__ import annotations

import math

import torch

import models.gfdm as core  # the GFDM core (nll_bits_per_dim); attribute access at call time

from .data import ImageDataset
from .distributed import Context
from .generate import derive_seed
from .metrics import feature_extractor, fid, pixel_vendi_score, quantize, reference_stats

__all__ = ["evaluate_samples", "nll_bits_per_dim", "data_vendi_score"]


def data_vendi_score(data: ImageDataset, n: int, seed: int = 0) -> float:
    """VS_p of ``n`` random training images: the value a perfect sampler would reach at this n
    (VS_p grows with n, so samples and data are compared at equal n)."""
    n = min(n, len(data))
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    return pixel_vendi_score(data.to_float(data.images[idx]))


def evaluate_samples(samples: torch.Tensor, train: ImageDataset, test: ImageDataset, *, inception=None,
                     cache_dir=None, device="cpu", ref_max: int = 50000, log=print,
                     fid_convention: str | None = None, progress: bool = False) -> dict:
    """FID against the training data and VS_p of ``samples`` (n, C, H, W) in [−1, 1]; ``progress``: progress bars
    of the feature extraction (minutes with Inception weights on a CPU)."""
    if tuple(samples.shape[1:]) != train.shape:
        raise ValueError(f"samples have shape {tuple(samples.shape[1:])}, {train.name} images {train.shape}")
    finite = torch.isfinite(samples.reshape(samples.shape[0], -1)).all(1)
    if not bool(finite.all()):        # quantize would turn NaN into pixels and the FID into a number
        raise ValueError(f"samples must be finite; {int((~finite).sum())} of {samples.shape[0]} images hold NaN or "
                         f"infinity (the sampler diverged); nothing was evaluated")
    samples = quantize(samples)        # metrics see the 8-bit pixels a PNG of the samples holds
    extractor = feature_extractor(train, test, inception=inception, device=device, cache_dir=cache_dir,
                                  log=log, convention=fid_convention)
    ref = reference_stats(extractor, train, cache_dir=cache_dir, max_images=ref_max, progress=progress)
    samples_f = samples.float() / 127.5 - 1
    value, spread = fid(extractor, samples_f, ref, bootstrap=10, progress=progress)
    return {"fid": value, "fid_bootstrap_std": spread, "fid_kind": "inception" if extractor.comparable_to_published
            else "offline", "fid_label": extractor.label, "comparable_to_published": extractor.comparable_to_published,
            "vs_p": pixel_vendi_score(samples), "vs_p_data": data_vendi_score(train, samples.shape[0]),
            "num_samples": int(samples.shape[0]), "num_reference": int(ref.n),
            "fid_convention": getattr(extractor, "convention", None)}


def nll_bits_per_dim(model, dyn, data: ImageDataset, num: int, *, steps: int = 100, batch_size: int = 64,
                     hutchinson_samples: int = 1, seed: int = 0, ctx: Context | None = None,
                     class_cond: bool = False) -> dict | None:
    """Mean NLL in bits/dim of the discrete images (the first ``num`` of ``data``), with its standard error;
    None on ranks other than 0. Batches are sharded across ranks.

    Uniform dequantisation (as score_sde): pixel k of L levels becomes ((k + U)/L)·2 − 1, U ~ U(0, 1), and
    log₂(L/2) bits/dim are added for the scaling to [−1, 1] — an upper bound on the discrete NLL
    (L = 256 for 8-bit images, 17 for the digits)."""
    ctx = ctx or Context()
    num = min(num, len(data))
    batches = [(b, s, min(batch_size, num - s)) for b, s in enumerate(range(0, num, batch_size))]
    out = []
    for b, start, n in batches[ctx.rank::ctx.world_size]:
        levels = data.max_value + 1
        k, y = data.images[start:start + n].float(), data.labels[start:start + n]
        u = torch.rand(k.shape, generator=torch.Generator().manual_seed(derive_seed(seed, b, 0xDE0)))
        x = (k + u) / levels * 2 - 1
        g = torch.Generator(device=ctx.device).manual_seed(derive_seed(seed, b, 0xB9D))
        kw = {"y": y.to(ctx.device)} if class_cond else None
        bpd = core.nll_bits_per_dim(model, dyn, x.to(ctx.device), steps=steps,
                                    hutchinson_samples=hutchinson_samples, generator=g, model_kwargs=kw,
                                    bits_offset=math.log2(levels / 2))
        out.append((b, bpd.detach().double().cpu()))
    gathered = ctx.gather_to_main(out)
    if gathered is None:
        return None
    vals = torch.cat([v for _, v in sorted(gathered, key=lambda item: item[0])])
    sem = float(vals.std() / math.sqrt(len(vals))) if len(vals) > 1 else float("nan")
    return {"nll_bpd": float(vals.mean()), "nll_bpd_sem": sem, "nll_num": int(len(vals)), "nll_steps": steps,
            "nll_levels": data.max_value + 1}
