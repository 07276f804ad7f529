"""What every sample-quality metric shares: the 8-bit pixels it sees, and where results are cached."""
from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["quantize", "default_cache_dir", "feature_batches"]


def default_cache_dir() -> Path:
    return Path(os.environ.get("GFDM_CACHE", Path.home() / ".cache" / "fracsde" / "gfdm"))


def quantize(images: torch.Tensor) -> torch.Tensor:
    """[−1, 1] floats → uint8 (what a PNG of the sample holds); metrics see exactly these pixels."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def feature_batches(images: torch.Tensor, batch_size: int, progress: str | None = None):
    """uint8 batches of ``images`` (floats in [−1, 1] or uint8) for a feature network, quantised one batch at a
    time (so memory stays flat in the number of images), with a progress bar named ``progress`` if given."""
    from tqdm.auto import tqdm

    n = images.shape[0]
    with tqdm(total=n, desc=progress, unit="img", dynamic_ncols=True, disable=progress is None) as bar:
        for start in range(0, n, batch_size):
            chunk = images[start:start + batch_size]
            yield chunk if chunk.dtype == torch.uint8 else quantize(chunk)
            bar.update(chunk.shape[0])
