"""Exponential moving average of network weights, parameterised by a half-life in images.

After training on ``h`` more images, the old weights' share of the average halves: with a global batch
of ``B`` images per step the per-step decay is ``β = 0.5 ** (B / h)``. A half-life in images (not a
decay per step) keeps the average's time span fixed when the batch size or number of GPUs changes.
The paper's EMA 0.9999 per step at batch 128 is a half-life of 128·ln 2 / −ln 0.9999 ≈ 887k images.

Optional ramp-up (as in EDM): the half-life is at most ``rampup · images_seen``, so early weights from
initialisation do not linger in short runs.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA", "halflife_from_decay"]


def halflife_from_decay(decay: float, batch_size: int) -> float:
    """Half-life in images equivalent to a per-step decay at a given batch size."""
    import math

    return batch_size * math.log(0.5) / math.log(decay)


class EMA:
    def __init__(self, model: nn.Module, halflife_images: float, rampup: float | None = 0.05):
        if halflife_images < 0:
            raise ValueError(f"EMA half-life must be >= 0 images; got {halflife_images}")
        if rampup is not None and rampup <= 0:
            raise ValueError(f"EMA ramp-up ratio must be > 0 or None; got {rampup}")
        self.halflife_images = float(halflife_images)
        self.rampup = rampup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay(self, batch_size: int, images_seen: int) -> float:
        h = self.halflife_images
        if self.rampup is not None:
            h = min(h, self.rampup * images_seen)
        return 0.5 ** (batch_size / h) if h > 0 else 0.0

    @torch.no_grad()
    def update(self, model: nn.Module, batch_size: int, images_seen: int) -> None:
        """Blend in ``model`` after a step on ``batch_size`` images (``images_seen`` counts them)."""
        beta = self.decay(batch_size, images_seen)
        ema_params: list[torch.Tensor] = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - beta)     # one fused update (CUDA: few kernels)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
