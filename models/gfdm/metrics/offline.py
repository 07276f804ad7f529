"""The offline FID feature extractor: a small CNN classifier trained here on the dataset, cached on disk.

Its 64-d penultimate features give an "offline FID" that ranks runs made here against each other (trained
with a fixed seed on the dataset's training split, once per dataset and recipe). It is NOT comparable to
published FIDs and is always labelled so.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import atomic_save
from .common import default_cache_dir, feature_batches

__all__ = ["OfflineFeatureNet", "OfflineFeatures"]


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
    def __call__(self, images: torch.Tensor, batch_size: int = 1000, progress: str | None = None) -> np.ndarray:
        out = []
        for chunk in feature_batches(images, batch_size, progress):
            x = chunk.to(self.device).float() / 127.5 - 1.0
            out.append(self.net.body(x).double().cpu())
        return torch.cat(out).numpy()
