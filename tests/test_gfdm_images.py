"""Unit tests of the image side of GFDM: U-Net, data, batch order, EMA, checkpoints, metrics, grids."""
from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from models.gfdm.checkpoint import CheckpointError, atomic_save, load_checkpoint, save_checkpoint
from models.gfdm.data import DEFAULT_FASHION_MNIST_DIR, BatchStream, DatasetNotFoundError, derive_seed, load_dataset
from models.gfdm.ema import EMA, halflife_from_decay
from models.gfdm.metrics import (
    FeatureStats,
    InceptionFeatures,
    InceptionV3,
    frechet_distance,
    pixel_vendi_score,
    quantize,
)
from models.gfdm.unet import PRESETS, UNet, UNetConfig, unet_config

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- U-Net
@pytest.mark.parametrize("preset", ["digits-tiny", "digits-small", "digits", "mnist-small"])
def test_unet_presets_map_images_to_same_shape_and_start_at_zero(preset):
    cfg = PRESETS[preset]
    torch.manual_seed(0)
    net = UNet(cfg)
    x = torch.randn(3, cfg.in_channels, cfg.image_size, cfg.image_size)
    out = net(x, torch.rand(3))
    assert out.shape == x.shape
    # zero-initialised output convolution: an untrained net predicts eps = 0 (score-matching loss 1)
    assert torch.count_nonzero(out) == 0


def test_unet_paper_presets_have_the_published_sizes():
    m, c = PRESETS["mnist"], PRESETS["cifar10"]
    assert (m.model_channels, m.num_res_blocks, m.channel_mult) == (64, 3, (1, 2, 4))
    assert (c.model_channels, c.num_res_blocks, c.channel_mult, c.attention_resolutions) == \
        (128, 4, (1, 2, 2, 2), (8,))
    assert m.resolutions == (28, 14, 7) and c.resolutions == (32, 16, 8, 4)


def test_unet_depends_on_time_labels_and_attention_is_used():
    cfg = unet_config("digits-small", num_classes=10)
    torch.manual_seed(0)
    net = UNet(cfg)
    for p in net.parameters():          # leave the zero init so the output reacts to its inputs
        if p.dim() > 1 and torch.count_nonzero(p) == 0:
            torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(4, 1, 8, 8)
    t = torch.full((4,), 0.5)
    y = torch.tensor([0, 1, 2, 3])
    base = net(x, t, y=y)
    assert not torch.allclose(base, net(x, t * 0.5, y=y))
    assert not torch.allclose(base, net(x, t, y=y.flip(0)))
    assert not torch.allclose(base, net(x, t))          # y=None is the "no label" token
    assert any(isinstance(m, type(net.middle[1])) for m in net.down.modules())   # attention at 4x4
    with pytest.raises(ValueError, match="class conditioning"):
        UNet(PRESETS["digits-tiny"])(x, t, y=y)
    with pytest.raises(ValueError, match=r"expects input of shape \(batch, 1, 8, 8\)"):
        net(torch.randn(2, 1, 9, 9), torch.rand(2))


def test_unet_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="cannot be halved"):
        UNetConfig(image_size=28, channel_mult=(1, 2, 2, 2), attention_resolutions=())
    with pytest.raises(ValueError, match=r"resolutions are \(8, 4\)"):
        UNetConfig(image_size=8, channel_mult=(1, 2), attention_resolutions=(16,))
    with pytest.raises(ValueError, match="preset must be one of"):
        unet_config("huge")
    with pytest.raises(ValueError, match="dropout"):
        UNetConfig(dropout=1.5)


def test_unet_dropout_is_active_in_train_mode_only():
    cfg = unet_config("digits-tiny", dropout=0.5)
    net = UNet(cfg)
    for p in net.parameters():
        if p.dim() > 1 and torch.count_nonzero(p) == 0:
            torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    net.train()
    assert not torch.equal(net(x, t), net(x, t))
    net.eval()
    assert torch.equal(net(x, t), net(x, t))


# ---------------------------------------------------------------------------------------------- data
def test_digits_scaled_to_unit_interval_with_fixed_split():
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    assert (len(train), len(test)) == (1500, 297)
    assert train.shape == (1, 8, 8) and train.num_classes == 10 and not train.hflip
    x, y = train.batch(torch.arange(len(train)))
    assert x.min() == -1 and x.max() == 1 and x.dtype == torch.float32
    assert set(y.tolist()) == set(range(10))
    # values 0..16 map to 17 equally spaced levels
    assert torch.allclose(torch.unique(x), torch.linspace(-1, 1, 17))
    # the split is deterministic and partitions the 1797 digits
    from sklearn.datasets import load_digits

    assert train.fingerprint() == load_dataset("digits").fingerprint()
    digits = load_digits()
    full = sorted(bytes(i) + bytes([t]) for i, t in zip(digits.images.astype(np.uint8), digits.target, strict=True))
    ours = sorted(bytes(i.numpy()) + bytes([int(t)]) for i, t in zip(torch.cat([train.images, test.images]),
                                                                    torch.cat([train.labels, test.labels]),
                                                                    strict=True))
    assert ours == full


def _write_idx(path: Path, array: np.ndarray, compress: bool):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_files_from_user_folder(tmp_path, compress):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (20, 28, 28))
    labels = rng.integers(0, 10, 20)
    sfx = ".gz" if compress else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{sfx}", imgs, compress)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{sfx}", labels, compress)
    ds = load_dataset("mnist", root=tmp_path)
    assert ds.shape == (1, 28, 28) and len(ds) == 20
    assert torch.equal(ds.images[:, 0], torch.from_numpy(imgs.astype(np.uint8)))
    assert torch.equal(ds.labels, torch.from_numpy(labels))
    x, _ = ds.batch(torch.arange(20))
    assert torch.allclose(x, torch.from_numpy(imgs).float()[:, None] / 127.5 - 1)


def test_mnist_npz_and_missing_dataset_message(tmp_path, monkeypatch):
    monkeypatch.delenv("GFDM_DATA", raising=False)
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("mnist", root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "train-images-idx3-ubyte" in msg and "--data-root" in msg and "mnist.npz" in msg
    x = np.zeros((5, 28, 28), np.uint8)
    np.savez(tmp_path / "mnist.npz", x_train=x, y_train=np.arange(5), x_test=x[:2], y_test=np.arange(2))
    assert len(load_dataset("mnist", root=tmp_path)) == 5
    assert len(load_dataset("mnist", root=tmp_path, split="test")) == 2
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("imagenet")


def _fake_cifar(folder: Path, n_per_batch: int = 4):
    d = folder / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n_per_batch, 3072)).astype(np.uint8),
                 b"labels": rng.integers(0, 10, n_per_batch).tolist()}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return d


def test_cifar10_pickles_load_with_flips_and_refuse_code(tmp_path):
    d = _fake_cifar(tmp_path)
    ds = load_dataset("cifar10", root=tmp_path)
    assert ds.shape == (3, 32, 32) and len(ds) == 20 and ds.hflip
    # horizontal flips: every image of a batch is itself or its mirror, and some are mirrored
    idx = torch.arange(20)
    g = torch.Generator().manual_seed(0)
    x, _ = ds.batch(idx, flip_generator=g)
    plain, _ = ds.batch(idx, hflip=False)
    same = (x == plain).flatten(1).all(1)
    mirrored = (x == plain.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 0 < int(mirrored.sum()) < 20
    # a batch file that would run code is refused
    evil = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [os.system]}
    with open(d / "data_batch_1", "wb") as f:
        pickle.dump(evil, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar10_missing_says_where_to_put_what(tmp_path, monkeypatch):
    monkeypatch.delenv("GFDM_DATA", raising=False)
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py/data_batch_1"):
        load_dataset("cifar10", root=tmp_path)


@pytest.mark.skipif(not Path(DEFAULT_FASHION_MNIST_DIR).is_dir(),
                    reason="optional: Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package():
    ds = load_dataset("fashion-mnist", split="test")
    assert ds.shape == (1, 28, 28) and len(ds) == 10000 and ds.num_classes == 10
    assert DEFAULT_FASHION_MNIST_DIR in ds.source


def test_batch_stream_covers_each_epoch_and_resumes_exactly():
    s = BatchStream(10, 4, seed=3)
    first = torch.cat([s.next_indices() for _ in range(5)])          # 20 indices = 2 epochs
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    a = BatchStream(10, 4, seed=3)
    a.next_indices()
    a.next_indices()
    state = a.state_dict()
    b = BatchStream(10, 4, seed=3)
    b.load_state_dict(state)
    assert all(torch.equal(a.next_indices(), b.next_indices()) for _ in range(7))
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(10, 5, seed=3).load_state_dict(state)
    assert derive_seed(1, 2) != derive_seed(2, 1) and derive_seed(1, 2) == derive_seed(1, 2)


# ----------------------------------------------------------------------------------------------- EMA
def test_ema_half_life_in_images():
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = EMA(net, halflife_images=1000, rampup=None)
    with torch.no_grad():
        net.weight.fill_(1.0)
    for step in range(1, 11):          # 10 steps of 100 images = one half-life
        ema.update(net, 100, step * 100)
    assert ema.model.weight.item() == pytest.approx(0.5, rel=1e-6)
    # the same half-life with 10x larger batches takes 10x fewer steps
    ema2 = EMA(torch.nn.Linear(1, 1, bias=False).requires_grad_(False).apply(
        lambda m: torch.nn.init.zeros_(m.weight)), halflife_images=1000, rampup=None)
    ema2.update(net, 1000, 1000)
    assert ema2.model.weight.item() == pytest.approx(0.5, rel=1e-6)
    assert halflife_from_decay(0.9999, 128) == pytest.approx(887_151, rel=1e-4)
    # ramp-up: early on the half-life is at most rampup * images seen
    assert EMA(net, 1e6, rampup=0.05).decay(100, 1000) == pytest.approx(0.5 ** 2)


# --------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_atomic_write_and_clear_errors(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    base = {"unet_config": {}, "dynamics": {}, "dataset": {}, "step": 1, "model": {}, "ema": {}}
    save_checkpoint(base, path)
    assert load_checkpoint(path)["step"] == 1
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({**base, "step": 2}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]

    (tmp_path / "trunc.pt").write_bytes(before[: len(before) // 2])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "trunc.pt")
    atomic_save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a gfdm checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    # a pickle that carries code is refused by weights_only loading
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": os.system}, f, protocol=2)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(tmp_path / "evil.pt")


# ------------------------------------------------------------------------------------------- metrics
def test_pixel_vendi_score_limits_and_definition():
    n = 16
    eye = torch.eye(n).reshape(n, 1, 4, 4) * 2 - 1            # n images with one lit pixel each: orthogonal
    assert pixel_vendi_score(eye) == pytest.approx(n, rel=1e-9)
    same = eye[:1].expand(n, -1, -1, -1)
    assert pixel_vendi_score(same) == pytest.approx(1.0, rel=1e-9)
    # two groups of identical images -> 2
    assert pixel_vendi_score(torch.cat([eye[:1].expand(5, -1, -1, -1), eye[1:2].expand(5, -1, -1, -1)])) == \
        pytest.approx(2.0, rel=1e-9)
    # definition: exp of the entropy of the eigenvalues of K/n, K = cosine similarity of [0,1] pixels;
    # n > d uses the d x d dual matrix, which must agree
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 3, 3, generator=g) * 2 - 1
    v = ((x.double() + 1) / 2).reshape(40, -1)
    v = v / v.norm(dim=1, keepdim=True)
    lam = torch.linalg.eigvalsh(v @ v.T / 40).clamp_min(0)
    lam = lam[lam > 1e-15]
    assert pixel_vendi_score(x) == pytest.approx(math.exp(-(lam * lam.log()).sum().item()), rel=1e-9)
    # uint8 input is read as /255; the float route rounds in float32 first (relative error ~1e-7)
    assert pixel_vendi_score(quantize(x)) == pytest.approx(pixel_vendi_score(quantize(x).float() / 127.5 - 1), rel=1e-6)


def test_frechet_distance_against_closed_forms():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a = FeatureStats.from_features(rng.normal(size=(500, 6)))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shifted = FeatureStats(a.mu + 2.0, a.sigma, a.n)
    assert frechet_distance(a, shifted) == pytest.approx(4.0 * 6, rel=1e-9)
    b = FeatureStats.from_features(rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6)))
    s = linalg.sqrtm(a.sigma @ b.sigma)
    ref = np.sum((a.mu - b.mu) ** 2) + np.trace(a.sigma + b.sigma - 2 * np.real(s))
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)
    # 1-D: (mu1-mu2)^2 + (s1 - s2)^2
    one = FeatureStats(np.array([0.0]), np.array([[4.0]]), 2)
    two = FeatureStats(np.array([1.0]), np.array([[9.0]]), 2)
    assert frechet_distance(one, two) == pytest.approx(1 + 1, rel=1e-12)


def test_inception_state_dict_and_torchscript_loading(tmp_path):
    net = InceptionV3()
    # pt_inception-2015-12-05 has 23,850,960 parameters (torchvision Inception3 without aux, 1008 classes)
    assert sum(p.numel() for p in net.parameters()) == 23_850_960
    torch.manual_seed(0)
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    sd["AuxLogits.fc.weight"] = torch.zeros(3)      # present in some exports; ignored
    torch.save(sd, tmp_path / "pt_inception.pth")
    feats = InceptionFeatures(tmp_path / "pt_inception.pth")
    imgs = torch.rand(2, 1, 8, 8) * 2 - 1
    f = feats(imgs)
    assert f.shape == (2, 2048) and feats.comparable_to_published and "state dict" in feats.label
    with torch.no_grad():
        direct = net.eval()(quantize(imgs).float().expand(-1, 3, -1, -1) / 255).double().numpy()
    np.testing.assert_allclose(f, direct, rtol=1e-5, atol=1e-6)
    # wrong file
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="does not hold FID Inception-v3 weights"):
        InceptionFeatures(tmp_path / "wrong.pth")

    class Detector(torch.nn.Module):     # the StyleGAN2-ADA/EDM TorchScript calling convention
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            assert x.dtype == torch.uint8 and x.shape[1] == 3
            return x.float().mean(dim=(2, 3)).repeat(1, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # torch.jit is deprecated in torch >= 2.10
        torch.jit.script(Detector()).save(str(tmp_path / "detector.pt"))
    ts = InceptionFeatures(tmp_path / "detector.pt")
    assert ts.torchscript and ts(imgs).shape == (2, 12)


def test_grid_png_written(tmp_path):
    from PIL import Image

    from models.gfdm.generate import grid_image, save_grid

    imgs = torch.rand(10, 1, 8, 8) * 2 - 1
    arr = grid_image(imgs, nrow=5)
    assert arr.dtype == np.uint8 and arr.shape == (2 * 33 + 1, 5 * 33 + 1)   # 8x8 enlarged 4x, 1-px gaps
    p = save_grid(imgs, tmp_path / "g.png")
    assert Image.open(p).size == (4 * 33 + 1, 3 * 33 + 1)


# ---------------------------------------------------------------------------------------- gpu check
def test_gpu_check_smoke_runs_on_cpu(tmp_path, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "gfdm-cache"    # shared by the gfdm test files of a session
    env = {**os.environ, "GFDM_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "gpu_check"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (out / "results.md").read_text()
    assert "VP" in text and "FVP(H=0.9,K=3)" in text and "offline FID" in text and "img/s" in text
    assert "nan GiB" not in text and "n/a (CPU)" in text      # no peak-memory figure on CPU, said so
