"""What every sample-quality metric shares: the 8-bit pixels it sees, and where results are cached."""
from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["quantize", "default_cache_dir"]


def default_cache_dir() -> Path:
    return Path(os.environ.get("GFDM_CACHE", Path.home() / ".cache" / "fracsde" / "gfdm"))


def quantize(images: torch.Tensor) -> torch.Tensor:
    """[−1, 1] floats → uint8 (what a PNG of the sample holds); metrics see exactly these pixels."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
