"""Sample-quality metrics: FID (standard Inception or a clearly labelled offline extractor) and the pixel
Vendi score VS_p.

FID is a two-step computation (as in EDM): feature statistics (mean, covariance) of the reference data,
then of the samples, then the Fréchet distance between the two Gaussians. Two feature extractors:

- ``InceptionFeatures``: the FID Inception-v3 (the network written here, architecture of pytorch-fid's
  ``FIDInceptionA/C/E_1/E_2`` variant) loading the standard TF-ported weights file
  ``pt_inception-2015-12-05-6726825d.pth`` that the user supplies (``--inception PATH`` or
  ``$GFDM_INCEPTION``), or a TorchScript detector (``inception-2015-12-05.pt`` of StyleGAN2-ADA/EDM, called
  as ``net(uint8_images, return_features=True)``). Only with these weights is the number an FID in the
  published sense — and even then only with 50k samples against the published reference statistics.
- ``OfflineFeatures``: a small CNN classifier trained by this project on the same dataset's training split
  (deterministic seed, cached on disk). Its 64-d penultimate features give an "offline FID" that ranks runs
  made here against each other. It is NOT comparable to published FIDs and is always labelled so.

Pixel Vendi score (Friedman & Dieng 2023; VS_p of the GFDM paper): images scaled to [0, 1], flattened,
each row normalised to unit length (cosine similarity = linear kernel on normalised pixels), and
VS = exp(−Σ λ_i log λ_i) over the eigenvalues λ of K/n. Computed from the d×d matrix XᵀX/n when n > d
(same non-zero eigenvalues). It is a diversity count: 1 for identical images, n for orthogonal ones.
"""
from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import atomic_save

__all__ = ["pixel_vendi_score", "frechet_distance", "FeatureStats", "InceptionV3", "InceptionFeatures",
           "OfflineFeatureNet", "OfflineFeatures", "feature_extractor", "reference_stats", "fid", "quantize",
           "default_cache_dir", "INCEPTION_ENV"]

INCEPTION_ENV = "GFDM_INCEPTION"


def default_cache_dir() -> Path:
    return Path(os.environ.get("GFDM_CACHE", Path.home() / ".cache" / "fracsde" / "gfdm"))


def quantize(images: torch.Tensor) -> torch.Tensor:
    """[−1, 1] floats → uint8 (what a PNG of the sample holds); metrics see exactly these pixels."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# -------------------------------------------------------------------------------------------- Vendi
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


# ---------------------------------------------------------------------------------------------- FID
@dataclass
class FeatureStats:
    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @classmethod
    def from_features(cls, feats: np.ndarray) -> "FeatureStats":
        feats = np.asarray(feats, dtype=np.float64)
        if feats.shape[0] < 2:
            raise ValueError("FID needs at least two images")
        return cls(feats.mean(0), np.cov(feats, rowvar=False), feats.shape[0])

    def save(self, path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, mu=self.mu, sigma=self.sigma, n=self.n)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "FeatureStats":
        with np.load(path, allow_pickle=False) as z:
            return cls(z["mu"], z["sigma"], int(z["n"]))


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """|μa − μb|² + tr(Σa + Σb − 2 (Σa Σb)^{1/2}), with tr (Σa Σb)^{1/2} from the eigenvalues of the
    symmetric PSD matrix Σa^{1/2} Σb Σa^{1/2} (no complex sqrtm)."""
    w, v = np.linalg.eigh(a.sigma)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sqrt_a @ b.sigma @ sqrt_a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_sqrt)


# --------------------------------------------------------------------------------- FID Inception-v3
class _Conv(nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):  # the TF graph's average pool ignores padded zeros
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, kernel_size=1)
        self.branch5x5_1 = _Conv(cin, 48, kernel_size=1)
        self.branch5x5_2 = _Conv(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = _Conv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, kernel_size=3, padding=1)
        self.branch_pool = _Conv(cin, pool, kernel_size=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class _BlockB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = _Conv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class _BlockC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = _Conv(cin, 192, kernel_size=1)
        self.branch7x7_1 = _Conv(cin, c7, kernel_size=1)
        self.branch7x7_2 = _Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = _Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = _Conv(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class _BlockD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = _Conv(cin, 192, kernel_size=1)
        self.branch3x3_2 = _Conv(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = _Conv(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockE(nn.Module):
    def __init__(self, cin, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool   # the last block of the TF graph max-pools its pool branch
        self.branch1x1 = _Conv(cin, 320, kernel_size=1)
        self.branch3x3_1 = _Conv(cin, 384, kernel_size=1)
        self.branch3x3_2a = _Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = _Conv(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pool)], 1)


class InceptionV3(nn.Module):
    """Inception-v3 as used for FID (TF 2015-12-05 graph); parameter names match pt_inception weights.

    ``forward(x)`` takes images in [0, 1], ``(n, 3, H, W)``, resizes them to 299×299 (bilinear) and
    returns the 2048-d pool features.
    """

    def __init__(self, num_classes: int = 1008):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, kernel_size=3)
        self.Mixed_5b = _BlockA(192, 32)
        self.Mixed_5c = _BlockA(256, 64)
        self.Mixed_5d = _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b = _BlockC(768, 128)
        self.Mixed_6c = _BlockC(768, 160)
        self.Mixed_6d = _BlockC(768, 160)
        self.Mixed_6e = _BlockC(768, 192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b = _BlockE(1280, max_pool=False)
        self.Mixed_7c = _BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, num_classes)   # unused for features; kept so the weights file loads

    def forward(self, x):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


class InceptionFeatures:
    """Standard FID features from a user-supplied weights file (state dict or TorchScript)."""

    comparable_to_published = True
    dim = 2048

    def __init__(self, path, device="cpu"):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"Inception weights file {self.path} does not exist")
        self.device = torch.device(device)
        self.torchscript = False
        if zipfile.is_zipfile(self.path):   # torch.save archives are zips too; TorchScript ones hold code/
            with zipfile.ZipFile(self.path) as z:
                self.torchscript = any("/code/" in n for n in z.namelist())
        if self.torchscript:
            with warnings.catch_warnings():   # torch >= 2.10 marks TorchScript deprecated; it still loads
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(str(self.path), map_location=self.device).eval()
        else:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            if not isinstance(state, dict):
                raise ValueError(f"{self.path} is neither a TorchScript file nor a state dict")
            state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
            num_classes = state["fc.weight"].shape[0] if "fc.weight" in state else 1008
            net = InceptionV3(num_classes)
            missing, unexpected = net.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.endswith("num_batches_tracked")]
            if missing or unexpected:
                raise ValueError(f"{self.path} does not hold FID Inception-v3 weights "
                                 f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
            self.net = net.to(self.device).eval()
        self.id = f"inception-{_file_digest(self.path)}"
        self.label = (f"FID (Inception-v3 {'TorchScript' if self.torchscript else 'state dict'} "
                      f"weights from {self.path})")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 200) -> np.ndarray:
        out = []
        for chunk in quantize(images).split(batch_size):
            x = chunk.to(self.device)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            if self.torchscript:
                f = self.net(x, return_features=True)
            else:
                f = self.net(x.float() / 255.0)
            out.append(f.double().cpu())
        return torch.cat(out).numpy()


# ------------------------------------------------------------------------------ offline extractor
class OfflineFeatureNet(nn.Module):
    """Small CNN classifier; its penultimate 64-d layer gives the offline FID features."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, feature_dim: int = 64):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, feature_dim))
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(feature_dim, num_classes))

    def forward(self, x):
        return self.head(self.body(x))


def _feature_net_steps(n: int, batch: int = 128) -> int:
    return int(min(3000, max(300, 2 * n // batch)))     # two epochs, at least 300 and at most 3000 steps


def _train_feature_net(train, test, device, seed: int = 0, log=print) -> tuple[OfflineFeatureNet, float]:
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = OfflineFeatureNet(train.shape[0], train.num_classes).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    n, batch = len(train), 128
    steps = _feature_net_steps(n, batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    log(f"training the offline feature network on {train.name} ({steps} steps, once; cached)")
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        x, y = train.batch(idx, flip_generator=g)
        loss = F.cross_entropy(net(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        correct = 0
        for i in range(0, len(test), 500):
            x, y = test.batch(torch.arange(i, min(i + 500, len(test))), hflip=False)
            correct += int((net(x.to(device)).argmax(1) == y.to(device)).sum())
    return net, correct / len(test)


class OfflineFeatures:
    """Offline FID features: a classifier trained here on ``dataset`` (cached). Not a published FID."""

    comparable_to_published = False
    dim = 64

    def __init__(self, train, test, device="cpu", cache_dir=None, log=print):
        self.device = torch.device(device)
        cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        # The key names the data and the training recipe, so a changed recipe never reuses an old net.
        key = f"feature-net-{train.name}-{train.fingerprint()}-w32d64s{_feature_net_steps(len(train))}-v1"
        path = cache_dir / f"{key}.pt"
        state = None
        if path.is_file():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt
                state = None
        net = OfflineFeatureNet(train.shape[0], train.num_classes)
        if state is not None and state.get("key") == key:
            net.load_state_dict(state["model"])
            self.accuracy = float(state["test_accuracy"])
        else:
            trained, self.accuracy = _train_feature_net(train, test, self.device, log=log)
            net.load_state_dict({k: v.cpu() for k, v in trained.state_dict().items()})
            atomic_save({"key": key, "model": net.state_dict(), "test_accuracy": self.accuracy}, path)
        self.net = net.to(self.device).eval()
        self.path = path
        self.id = key
        self.label = (f"offline FID (features of a {train.name} classifier trained by fracsde, test accuracy "
                      f"{100 * self.accuracy:.1f}%; NOT comparable to published FID)")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 1000) -> np.ndarray:
        out = []
        for chunk in quantize(images).split(batch_size):
            x = chunk.to(self.device).float() / 127.5 - 1.0
            out.append(self.net.body(x).double().cpu())
        return torch.cat(out).numpy()


def feature_extractor(train, test, inception: str | None = None, device="cpu", cache_dir=None, log=print):
    """Inception features when a weights file is given (argument or $GFDM_INCEPTION), else offline ones."""
    path = inception or os.environ.get(INCEPTION_ENV)
    if path:
        return InceptionFeatures(path, device=device)
    return OfflineFeatures(train, test, device=device, cache_dir=cache_dir, log=log)


def reference_stats(extractor, dataset, cache_dir=None, max_images: int = 50000) -> FeatureStats:
    """Feature statistics of (at most ``max_images`` of) the training data, cached by extractor+data."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    n = min(len(dataset), max_images)
    path = cache_dir / f"stats-{extractor.id}-{dataset.name}-{dataset.fingerprint()}-{n}.npz"
    if path.is_file():
        try:
            return FeatureStats.load(path)
        except Exception:  # noqa: BLE001 - rebuild a damaged cache entry
            pass
    stats = FeatureStats.from_features(extractor(dataset.all_float(n)))
    stats.save(path)
    return stats


def fid(extractor, samples: torch.Tensor, ref: FeatureStats, bootstrap: int = 0, seed: int = 0):
    """FID of ``samples`` against ``ref``; with ``bootstrap`` > 0 also the standard deviation of the FID over
    that many resamplings (with replacement) of the samples' features — a gauge of its sampling noise."""
    feats = extractor(samples)
    value = frechet_distance(FeatureStats.from_features(feats), ref)
    if not bootstrap:
        return value
    rng = np.random.default_rng(seed)
    boots = [frechet_distance(FeatureStats.from_features(feats[rng.integers(0, len(feats), len(feats))]), ref)
             for _ in range(bootstrap)]
    return value, float(np.std(boots, ddof=1))
