"""FID: feature statistics (mean, covariance) of the reference data, then of the samples, then the Fréchet
distance between the two Gaussians (a reference-statistics step and a compute step, as in EDM).

The features come from :class:`~models.gfdm.metrics.inception.InceptionFeatures` when a weights file is given
(``--inception`` or ``$GFDM_INCEPTION``), else from the clearly labelled offline extractor
:class:`~models.gfdm.metrics.offline.OfflineFeatures`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..runfiles import write_npz
from .common import default_cache_dir
from .inception import InceptionFeatures
from .offline import OfflineFeatures

__all__ = ["FeatureStats", "frechet_distance", "feature_extractor", "reference_stats", "fid", "INCEPTION_ENV",
           "check_feature_args"]

INCEPTION_ENV = "GFDM_INCEPTION"


@dataclass
class FeatureStats:
    mu: np.ndarray
    sigma: np.ndarray
    n: int
    _sqrt: np.ndarray | None = field(default=None, repr=False, compare=False)   # Σ^{1/2}, once computed

    def sqrt_sigma(self) -> np.ndarray:
        """Σ^{1/2} (symmetric PSD square root by eigh), computed once per statistics object."""
        if self._sqrt is None:
            w, v = np.linalg.eigh(self.sigma)
            self._sqrt = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        return self._sqrt

    @classmethod
    def from_batches(cls, batches) -> FeatureStats:
        """From feature batches (each (m, d)), accumulated so that only the sums are held: the covariance of all
        rows (ddof 1, as :meth:`from_features`), computed about the first batch's mean against cancellation."""
        shift: np.ndarray | None = None
        total = outer = np.zeros(0)
        n = 0
        for feats in batches:
            feats = np.asarray(feats, dtype=np.float64)
            if shift is None:
                shift = feats.mean(0)
                total, outer = np.zeros_like(shift), np.zeros((shift.size, shift.size))
            centred = feats - shift
            total += centred.sum(0)
            outer += centred.T @ centred
            n += feats.shape[0]
        if n < 2 or shift is None:
            raise ValueError("FID needs at least two images")
        mean = total / n
        return cls(shift + mean, (outer - n * np.outer(mean, mean)) / (n - 1), n)

    @classmethod
    def from_features(cls, feats: np.ndarray) -> FeatureStats:
        feats = np.asarray(feats, dtype=np.float64)
        if feats.shape[0] < 2:
            raise ValueError("FID needs at least two images")
        return cls(feats.mean(0), np.cov(feats, rowvar=False), feats.shape[0])

    def save(self, path) -> None:
        write_npz(path, mu=self.mu, sigma=self.sigma, n=self.n)

    @classmethod
    def load(cls, path) -> FeatureStats:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["mu"], z["sigma"], int(z["n"]))


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """|μa − μb|² + tr(Σa + Σb − 2 (Σa Σb)^{1/2}), with tr (Σa Σb)^{1/2} from the eigenvalues of the
    symmetric PSD matrix Σa^{1/2} Σb Σa^{1/2} (no complex sqrtm). Σa^{1/2} is cached on ``a``: pass the
    statistics that stay fixed (the reference) first when computing many distances."""
    sqrt_a = a.sqrt_sigma()
    m = sqrt_a @ b.sigma @ sqrt_a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_sqrt)


def feature_extractor(train, test, inception: str | None = None, device="cpu", cache_dir=None, log=print,
                      convention: str | None = None):
    """Inception features when weights are given (argument or $GFDM_INCEPTION: ``"fid-helper"`` or a file), with
    the input ``convention`` (``"pytorch-fid"`` or ``"nvidia"``, see ``inception.CONVENTIONS``), else offline
    ones (which have no convention: asking for one without Inception weights is refused)."""
    path = inception or os.environ.get(INCEPTION_ENV)
    if path:
        return InceptionFeatures(path, device=device, convention=convention)
    check_feature_args(None, convention)
    return OfflineFeatures(train, test, device=device, cache_dir=cache_dir, log=log)


def check_feature_args(inception: str | None = None, convention: str | None = None) -> None:
    """Refuse bad FID settings before any work: load the Inception weights (argument or $GFDM_INCEPTION) with
    the convention, or refuse a convention without them. Costs a second; the offline extractor is not built."""
    path = inception or os.environ.get(INCEPTION_ENV)
    if path:
        InceptionFeatures(path, convention=convention)
    elif convention is not None:
        raise ValueError(f"--fid-convention {convention} applies to Inception features only; give --inception "
                         f"(fid-helper or a weights file) or leave the convention out")


def reference_stats(extractor, dataset, cache_dir=None, max_images: int = 50000, progress: bool = False,
                    chunk: int = 2000) -> FeatureStats:
    """Feature statistics of (at most ``max_images`` of) the training data, cached by extractor+data. The images
    go through the extractor ``chunk`` at a time and only running sums are kept, so memory stays flat in their
    number; ``progress``: a progress bar per chunk."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    n = min(len(dataset), max_images)
    path = cache_dir / f"stats-{extractor.id}-{dataset.name}-{dataset.fingerprint()}-{n}.npz"
    if path.is_file():
        try:
            return FeatureStats.load(path)
        except Exception:  # noqa: BLE001 - rebuild a damaged cache entry
            pass
    desc = f"FID features of the reference ({n} {dataset.name} images)" if progress else None
    from tqdm.auto import tqdm

    with tqdm(total=n, desc=desc, unit="img", dynamic_ncols=True, disable=desc is None) as bar:
        def batches():
            for start in range(0, n, chunk):
                images = dataset.to_float(dataset.images[start:min(start + chunk, n)])
                yield extractor(images)
                bar.update(images.shape[0])
        stats = FeatureStats.from_batches(batches())
    stats.save(path)
    return stats


def fid(extractor, samples: torch.Tensor, ref: FeatureStats, bootstrap: int = 0, seed: int = 0,
        progress: bool = False):
    """FID of ``samples`` against ``ref``; with ``bootstrap`` > 0 also the standard deviation of the FID over
    that many resamplings (with replacement) of the samples' features — a gauge of its sampling noise.
    ``progress``: a progress bar of the feature extraction."""
    feats = extractor(samples, progress=f"FID features of {samples.shape[0]} samples" if progress else None)
    # the reference first: its Σ^{1/2} is computed once for the value and every resampling (one 2048×2048
    # eigh per distance instead of two for Inception features)
    value = frechet_distance(ref, FeatureStats.from_features(feats))
    if not bootstrap:
        return value
    rng = np.random.default_rng(seed)
    boots = [frechet_distance(ref, FeatureStats.from_features(feats[rng.integers(0, len(feats), len(feats))]))
             for _ in range(bootstrap)]
    return value, float(np.std(boots, ddof=1))
