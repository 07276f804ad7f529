"""Image datasets that load without network access, and the deterministic batch order used in training.

Every loader returns an :class:`ImageDataset`: ``uint8`` images ``(N, C, H, W)`` with their integer
maximum (16 for the scikit-learn digits, 255 otherwise), labels, and whether the paper trains with random
horizontal flips (CIFAR-10 only). :meth:`ImageDataset.batch` scales to [−1, 1] on the device.

Sources (``name``: where it is looked for):

- ``digits``: scikit-learn's ``load_digits`` (1797 images, 8×8, values 0..16), shipped inside scikit-learn.
  There is no official split; a fixed permutation (seed 0) keeps 297 images as ``test``, 1500 as ``train``.
- ``fashion-mnist``: idx files (``train-images-idx3-ubyte[.gz]`` …) in ``root``, ``$GFDM_DATA``,
  ``$GFDM_DATA/fashion-mnist`` or ``/usr/share/datasets/fashion-mnist`` (Debian ``dataset-fashion-mnist``).
- ``mnist``: idx files or a ``mnist.npz`` (``x_train``, ``y_train``, ``x_test``, ``y_test``) in ``root``
  (also ``root/mnist``, ``root/MNIST/raw``).
- ``cifar10``: the CIFAR-10 python pickles (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``) in
  ``root``. They are read with a restricted unpickler that only rebuilds numpy arrays, lists and dicts.

With ``download=True`` and torchvision installed, mnist / fashion-mnist / cifar10 are fetched into ``root``.

:data:`DATASETS` maps each name to its :class:`DatasetSource` (loader and one-line help); ``load_dataset``,
the ``--dataset`` choices of ``gfdm`` and their help come from it, so a new dataset is one registration::

    DATASETS["tiny-noise"] = DatasetSource(load=lambda root, split, download: ImageDataset(...),
                                           help="random 8x8 images")
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

__all__ = ["ImageDataset", "DatasetNotFoundError", "DatasetSource", "load_dataset", "DATASETS", "BatchStream",
           "DEFAULT_FASHION_MNIST_DIR", "derive_seed", "datasets_help"]

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files were not found; the message says where to put what."""


@dataclass
class ImageDataset:
    name: str
    images: torch.Tensor          # uint8, (N, C, H, W)
    labels: torch.Tensor          # int64, (N,)
    max_value: int                # pixel value that maps to +1
    num_classes: int
    hflip: bool                   # random horizontal flips during training (as in the paper)
    source: str

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W); got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must have one entry per image")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return c, h, w

    def to(self, device) -> ImageDataset:
        return ImageDataset(self.name, self.images.to(device), self.labels.to(device), self.max_value,
                            self.num_classes, self.hflip, self.source)

    def to_float(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return images_uint8.float() / (self.max_value / 2) - 1.0

    def batch(self, index: torch.Tensor, flip_generator: torch.Generator | None = None,
              hflip: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [−1, 1] and labels at ``index``; flips half at random when enabled."""
        index = index.to(self.images.device, non_blocking=True)
        x = self.to_float(self.images[index])
        if self.hflip if hflip is None else hflip:
            flip = torch.rand(x.shape[0], generator=flip_generator) < 0.5
            x = torch.where(flip.to(x.device, non_blocking=True)[:, None, None, None], x.flip(-1), x)
        return x, self.labels[index]

    def all_float(self, max_images: int | None = None) -> torch.Tensor:
        imgs = self.images if max_images is None else self.images[:max_images]
        return self.to_float(imgs)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.name.encode())
        h.update(self.images.cpu().numpy().tobytes())
        h.update(self.labels.cpu().numpy().tobytes())
        return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- loaders
def _split_check(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    return split


def _load_digits(root, split: str, download: bool) -> ImageDataset:   # embedded: no root, no download
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.uint8))[:, None]
    labels = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    idx = perm[297:] if split == "train" else perm[:297]
    idx = idx.sort().values
    return ImageDataset("digits", images[idx].contiguous(), labels[idx].contiguous(), 16, 10, False,
                        f"sklearn.datasets.load_digits ({split}: {len(idx)} of 1797)")


def _read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}i", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).copy()
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: idx header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


_IDX = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _find_file(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
            if (d / name).is_file():
                return d / name
    return None


def _candidate_dirs(root, subdirs: tuple[str, ...], extra: tuple[str, ...] = ()) -> list[Path]:
    bases = [Path(root)] if root else []
    if os.environ.get("GFDM_DATA"):
        bases.append(Path(os.environ["GFDM_DATA"]))
    dirs = []
    for b in bases:
        dirs.append(b)
        dirs.extend(b / s for s in subdirs)
    dirs.extend(Path(e) for e in extra)
    return dirs


def _load_idx_pair(name: str, dirs: list[Path], split: str):
    img_stem, lab_stem = _IDX[split]
    ip, lp = _find_file(dirs, img_stem), _find_file(dirs, lab_stem)
    if ip is None or lp is None:
        return None
    images, labels = _read_idx(ip), _read_idx(lp)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"{ip} / {lp}: expected (N, H, W) images and (N,) labels")
    return images, labels, str(ip.parent)


def _torchvision(name: str, root, split: str):
    try:
        import torchvision.datasets as tvd
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        raise DatasetNotFoundError(f"--download needs torchvision, which cannot be imported here ({e}); "
                                   f"put the files in place instead (see the message without --download)") from e
    if not root:
        raise DatasetNotFoundError("--download needs --data-root FOLDER to download into")
    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]
    ds = cls(str(root), train=split == "train", download=True)
    data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
    targets = np.asarray(ds.targets, dtype=np.int64)
    return data, targets, f"torchvision {cls.__name__} in {root}"


def _load_mnist_like(name: str, root, split: str, download: bool) -> ImageDataset:
    if name == "fashion-mnist":
        dirs = _candidate_dirs(root, ("fashion-mnist", "FashionMNIST/raw"), (DEFAULT_FASHION_MNIST_DIR,))
    else:
        dirs = _candidate_dirs(root, ("mnist", "MNIST/raw"))
    found = _load_idx_pair(name, dirs, split)
    if found is None and name == "mnist":
        for d in dirs:
            if (d / "mnist.npz").is_file():
                with np.load(d / "mnist.npz", allow_pickle=False) as z:
                    found = (z[f"x_{split}"], z[f"y_{split}"], str(d / "mnist.npz"))
                break
    if found is None and download:
        found = _torchvision(name, root, split)
    if found is None:
        looked = ", ".join(str(d) for d in dirs) or "(no folder given)"
        img_stem, lab_stem = _IDX[split]
        hint = ("install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
                "or " if name == "fashion-mnist" else "")
        npz = " or mnist.npz (keys x_train, y_train, x_test, y_test)" if name == "mnist" else ""
        raise DatasetNotFoundError(
            f"{name} ({split}) not found. Looked in: {looked}. To fix: {hint}put {img_stem}[.gz] and "
            f"{lab_stem}[.gz]{npz} in a folder and pass --data-root FOLDER (or set GFDM_DATA=FOLDER); "
            f"with torchvision installed, --download --data-root FOLDER fetches it.")
    images, labels, where = found
    images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))[:, None]
    return ImageDataset(name, images, torch.from_numpy(np.asarray(labels, dtype=np.int64)), 255, 10, False,
                        f"{where} ({split}: {images.shape[0]} images)")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR-10 batches: rebuilds numpy arrays and builtins, nothing else."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch file")


def _load_cifar10(root, split: str, download: bool) -> ImageDataset:
    dirs = _candidate_dirs(root, ("cifar-10-batches-py", "cifar10/cifar-10-batches-py"))
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    for d in dirs:
        if all((d / n).is_file() for n in names):
            xs, ys = [], []
            for n in names:
                with open(d / n, "rb") as f:
                    batch = _ArrayUnpickler(f, encoding="bytes").load()
                xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
            images, labels, where = np.concatenate(xs), np.concatenate(ys), str(d)
            break
    else:
        if not download:
            looked = ", ".join(str(d) for d in dirs) or "(no folder given)"
            raise DatasetNotFoundError(
                f"cifar10 ({split}) not found. Looked in: {looked}. To fix: unpack cifar-10-python.tar.gz "
                f"so that FOLDER/cifar-10-batches-py/{names[0]} exists and pass --data-root FOLDER "
                f"(or set GFDM_DATA=FOLDER); with torchvision installed, --download --data-root FOLDER "
                f"fetches it.")
        images, labels, where = _torchvision("cifar10", root, split)
        images = images.transpose(0, 3, 1, 2)
    images = torch.from_numpy(np.ascontiguousarray(images))
    return ImageDataset("cifar10", images, torch.from_numpy(labels), 255, 10, True,
                        f"{where} ({split}: {images.shape[0]} images)")


@dataclass(frozen=True)
class DatasetSource:
    """How to get a dataset: ``load(root, split, download) -> ImageDataset`` (``split`` is "train" or
    "test"; raise :class:`DatasetNotFoundError` saying where to put the files), and a line for ``--help``."""

    load: Callable[[str | os.PathLike | None, str, bool], ImageDataset]
    help: str


#: name → source; ``gfdm --dataset`` offers exactly these (a new dataset is one entry)
DATASETS: dict[str, DatasetSource] = {
    "digits": DatasetSource(_load_digits, "scikit-learn 8x8 (embedded)"),
    "fashion-mnist": DatasetSource(partial(_load_mnist_like, "fashion-mnist"),
                                   "Debian package dataset-fashion-mnist or --data-root"),
    "mnist": DatasetSource(partial(_load_mnist_like, "mnist"), "idx files or mnist.npz under --data-root"),
    "cifar10": DatasetSource(_load_cifar10, "CIFAR-10 python batches under --data-root"),
}


def load_dataset(name: str, root: str | os.PathLike | None = None, split: str = "train",
                 download: bool = False) -> ImageDataset:
    """Load ``name`` (a key of :data:`DATASETS`) as uint8 images; see the module docstring for sources."""
    _split_check(split)
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {tuple(DATASETS)}; got {name!r}")
    return DATASETS[name].load(root, split, download)


def datasets_help() -> str:
    """``name: help`` of every registered dataset, for ``--dataset``."""
    return "; ".join(f"{name}: {source.help}" for name, source in DATASETS.items())


# ------------------------------------------------------------------------------------------ batch order
def derive_seed(*ints: int) -> int:
    """A 63-bit seed that depends on every integer given (numpy's SeedSequence hashing)."""
    words = [int(i) & 0xFFFFFFFFFFFFFFFF for i in ints]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0]) >> 1


class BatchStream:
    """Endless, resumable stream of global batches of dataset indices.

    Epoch ``e`` visits the data in ``randperm(N)`` drawn from a generator seeded with ``(seed, e)``;
    batches run across epoch boundaries, so every image is seen once per epoch. The whole state is
    ``(epoch, offset)``: a resumed stream yields exactly the batches the uninterrupted one would.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int = 0, offset: int = 0):
        if n < 1 or batch_size < 1:
            raise ValueError(f"BatchStream needs n >= 1 and batch_size >= 1; got n={n}, batch_size={batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.offset = epoch, offset
        self._perm = self._permutation(epoch)

    def _permutation(self, epoch: int) -> torch.Tensor:
        seed = derive_seed(self.seed, epoch, 0x5EED)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))

    def next_indices(self) -> torch.Tensor:
        parts, need = [], self.batch_size
        while need:
            take = min(need, self.n - self.offset)
            parts.append(self._perm[self.offset:self.offset + take])
            self.offset += take
            need -= take
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return torch.cat(parts)

    def state_dict(self) -> dict:
        return {"n": self.n, "batch_size": self.batch_size, "seed": self.seed, "epoch": self.epoch,
                "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        for k in ("n", "batch_size", "seed"):
            if state[k] != getattr(self, k):
                raise ValueError(f"data-order state has {k}={state[k]}, this run has {getattr(self, k)}")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._perm = self._permutation(self.epoch)
