"""Pixel Vendi score (Friedman & Dieng 2023; VS_p of the GFDM paper).

Images scaled to [0, 1], flattened, each row normalised to unit length (cosine similarity = linear kernel on
normalised pixels), and VS = exp(−Σ λ_i log λ_i) over the eigenvalues λ of K/n. Computed from the d×d matrix
XᵀX/n when n > d (same non-zero eigenvalues). It is a diversity count: 1 for identical images, n for
orthogonal ones.
"""
from __future__ import annotations

import torch

__all__ = ["pixel_vendi_score"]


def pixel_vendi_score(images: torch.Tensor) -> float:
    """VS_p of images ``(n, C, H, W)`` in [−1, 1] (or uint8), cosine kernel on pixels, float64."""
    x = images.detach().cpu()
    x = x.double() / 255.0 if x.dtype == torch.uint8 else (x.double().clamp(-1, 1) + 1) / 2
    x = x.reshape(x.shape[0], -1)
    n, d = x.shape
    if n == 0:
        raise ValueError("pixel_vendi_score needs at least one image")
    norms = x.norm(dim=1, keepdim=True)
    x = torch.where(norms > 0, x / norms.clamp_min(1e-300), x)   # an all-black image stays a zero row
    gram = x @ x.T / n if n <= d else x.T @ x / n
    lam = torch.linalg.eigvalsh(gram).clamp_min(0)
    lam = lam[lam > 1e-15]
    return float(torch.exp(-(lam * lam.log()).sum()))
