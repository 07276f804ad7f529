"""Sampling in batches (sharded across torchrun ranks) and image grids.

Batch ``b`` of a request is always drawn with a generator seeded from ``(seed, b)``, and rank ``r`` of
``w`` draws the batches ``b ≡ r (mod w)``; so the images do not depend on how many processes made them.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

import models.gfdm as core  # the GFDM core (dynamics, loss, samplers); attribute access at call time

from .data import derive_seed
from .distributed import Context
from .metrics import quantize
from .runfiles import atomic_write
from .unet import AutocastNet

__all__ = ["derive_seed", "generate", "save_grid", "grid_image", "class_labels"]


def class_labels(num: int, num_classes: int | None) -> torch.Tensor | None:
    """Balanced labels 0, 1, …, C−1, 0, 1, … for class-conditional sampling (None when unconditional)."""
    return None if not num_classes else torch.arange(num) % num_classes


@torch.no_grad()
def generate(model, dyn, num: int, shape, *, batch_size: int = 256, steps: int = 1000, method: str = "sde",
             seed: int = 0, labels: torch.Tensor | None = None, ctx: Context | None = None,
             device=None, t_end: float = 1e-3, progress: bool = False, amp: bool = False,
             grid=None) -> torch.Tensor | None:
    """``num`` samples ``(num, *shape)`` in [−1, 1] (clipped) on rank 0 (None on other ranks).
    ``amp``: run the network (only) under bf16 autocast — CUDA only. ``grid``: the sampler's time grid
    (see :func:`models.gfdm.sample`). The progress bar counts sampler steps (network evaluations) of this rank."""
    ctx = ctx or Context(device=torch.device(device or "cpu"))
    device = ctx.device if device is None else torch.device(device)
    model.eval()
    if amp:
        model = AutocastNet(model)
    batches = [(b, s, min(batch_size, num - s)) for b, s in enumerate(range(0, num, batch_size))]
    mine = batches[ctx.rank::ctx.world_size]
    out = []
    bar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(mine) * steps, desc=f"sampling ({method})", unit="step", dynamic_ncols=True)
    for b, start, n in mine:
        g = torch.Generator(device=device).manual_seed(derive_seed(seed, b, 0x5A))
        kw = None if labels is None else {"y": labels[start:start + n].to(device)}
        x = core.sample(model, dyn, (n, *shape), steps=steps, method=method, t_end=t_end, generator=g,
                        device=device, model_kwargs=kw, grid=grid, progress=bar or False)
        out.append((b, x.clamp(-1, 1).float().cpu()))
    if bar is not None:
        bar.close()
    gathered = ctx.gather_to_main(out)
    if gathered is None:
        return None
    gathered.sort(key=lambda item: item[0])
    return torch.cat([x for _, x in gathered]) if gathered else torch.empty(0, *shape)


def grid_image(images: torch.Tensor, nrow: int | None = None, scale: int | None = None, pad: int = 1) -> np.ndarray:
    """uint8 (H, W, C) mosaic of images ``(n, C, h, w)`` in [−1, 1]; small images are enlarged."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    scale = scale or max(1, 32 // max(h, w))
    imgs = quantize(images)
    if scale > 1:
        imgs = imgs.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        h, w = h * scale, w * scale
    rows = int(math.ceil(n / nrow))
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = imgs[i]
    arr = grid.permute(1, 2, 0).numpy()
    return arr[:, :, 0] if c == 1 else arr


def save_grid(images: torch.Tensor, path, nrow: int | None = None, title: str | None = None,
              scale: int | None = None) -> Path:
    """A PNG mosaic of ``images`` (written atomically), with ``title`` on a white band above it if given."""
    from PIL import Image, ImageDraw

    grid = Image.fromarray(grid_image(images, nrow, scale))
    if title:
        band = 16
        titled = Image.new(grid.mode, (max(grid.width, 6 * len(title) + 8), grid.height + band), 255 if
                           grid.mode == "L" else (255, 255, 255))
        titled.paste(grid, (0, band))
        ImageDraw.Draw(titled).text((4, 2), title, fill=0 if grid.mode == "L" else (0, 0, 0))
        grid = titled
    return atomic_write(path, lambda f: grid.save(f, format="PNG"))
