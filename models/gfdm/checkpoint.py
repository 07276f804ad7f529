"""Checkpoints: plain state dicts, written atomically, read with ``weights_only=True``.

A checkpoint is a ``dict`` of tensors and plain Python values (no pickled classes), so loading one never
runs code. It is written to a temporary file in the target folder, flushed to disk and renamed over the
target with :func:`os.replace`, so a crash leaves either the old or the new checkpoint, never half a file.
It carries the SHA-256 of its contents (:func:`payload_checksum`). :func:`load_checkpoint` checks the format,
the required keys and the checksum and raises :class:`CheckpointError` with a readable message; callers check
everything before they change any model, optimiser or file.

Also here: the global RNG states as plain tensors (:func:`rng_state` / :func:`set_rng_state`), and
:func:`load_for_sampling`, which rebuilds the network and the dynamics a checkpoint describes.
"""
from __future__ import annotations

import hashlib
import os
import random
import tempfile
import typing
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .precondition import make_eps_model
from .runfiles import atomic_write
from .spec import DynamicsSpec
from .unet import UNet, UNetConfig

__all__ = ["CheckpointError", "check_output_path", "save_checkpoint", "atomic_save", "load_checkpoint",
           "check_state_dict", "payload_checksum", "FORMAT", "rng_state", "set_rng_state", "load_for_sampling"]

FORMAT = "fracsde-gfdm-checkpoint"
VERSION = 1
REQUIRED = ("format", "version", "unet_config", "dynamics", "dataset", "step", "model", "ema")


class CheckpointError(RuntimeError):
    """A checkpoint could not be read, or does not fit the run that wants it."""


def check_output_path(path, flag: str = "--out", folder: bool = True) -> Path:
    """Refuse, before any work, an output ``path`` (a folder, or a file if not ``folder``) that cannot be written:
    an existing file where a folder is wanted (or the reverse), or a nearest existing folder without write
    permission (a read-only folder or file system). Returns ``path`` as a Path."""
    path = Path(path)
    if path.exists() and folder != path.is_dir():
        raise FileExistsError(f"{flag} {path} is an existing {'file' if folder else 'folder'}; "
                              f"{flag} needs a {'folder' if folder else 'file name'}")
    base = path if folder else path.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise FileExistsError(f"{flag} {path}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK) or (not folder and path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(f"{flag} {path}: {base if not path.exists() or folder else path} is not writable "
                              f"(permissions or a read-only file system); choose another {flag}")
    try:            # write permission is not enough: /proc, /sys and full or special file systems refuse files
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise PermissionError(f"{flag} {path}: {base} does not accept new files ({e.strerror}; a special, full or "
                              f"read-only file system); choose another {flag}") from None
    return path


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write a training/sampling checkpoint (adds the format tag and the payload's checksum) atomically."""
    state = {"format": FORMAT, "version": VERSION, **state}
    return atomic_save({**state, "checksum": payload_checksum(state)}, path)


def atomic_save(state, path: str | os.PathLike) -> Path:
    """``torch.save`` whole or not at all (:func:`models.gfdm.runfiles.atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(state, f))


def payload_checksum(state) -> str:
    """SHA-256 of a checkpoint's contents: every key, plain value and tensor (dtype, shape and bytes), in key
    order, except the ``"checksum"`` entry itself. Stored on save and verified on every load, so flipped bytes
    inside a weight tensor (which torch loads without complaint) are found."""
    h = hashlib.sha256()

    def visit(value):
        if isinstance(value, dict):
            h.update(b"{")
            for key in sorted(value, key=repr):
                if key != "checksum":
                    h.update(repr(key).encode())
                    visit(value[key])
            h.update(b"}")
        elif isinstance(value, (list, tuple)):
            h.update(b"[")
            for item in value:
                visit(item)
            h.update(b"]")
        elif isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(value).encode())
    visit(state)
    return h.hexdigest()


def unpickling_reason(e: Exception) -> str:
    """The cause in torch's message for a file ``torch.load(weights_only=True)`` refused, without torch's advice
    to load it with ``weights_only=False`` (which would run whatever code the file holds)."""
    keep = []
    for line in str(e).splitlines():
        line = line.split("WeightsUnpickler error:")[-1].split(" Please use ")[0].strip()
        if line and not any(w in line for w in ("weights_only", "Weights only", "Check the documentation")):
            keep.append(line)
    return type(e).__name__ + (f": {' '.join(keep)}" if keep else "")


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a file (a run's checkpoint is "
                              f"{path / 'checkpoint.pt'})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise CheckpointError(f"checkpoint {path} cannot be read (damaged, truncated, or not a plain "
                              f"state dict loadable with weights_only=True): {unpickling_reason(e)}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a gfdm checkpoint (missing format tag {FORMAT!r})")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}; "
                              f"this code reads version {VERSION}")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks the entries {missing}")
    if "checksum" in state and payload_checksum(state) != state["checksum"]:     # older checkpoints have none
        raise CheckpointError(f"checkpoint {path} is damaged: its contents do not match the checksum stored in it "
                              f"(bytes changed on disk or in transfer); use another copy or retrain")
    return state


def check_state_dict(model: nn.Module, state: dict, what: str, path) -> None:
    """Raise CheckpointError unless ``state`` has exactly ``model``'s keys and shapes."""
    own = model.state_dict()
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: {what} weights are not a state dict")
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in state and (not isinstance(state[k], torch.Tensor)
                                                        or state[k].shape != v.shape)]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' …' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected {extra[:5]}{' …' if len(extra) > 5 else ''}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:5]))
        raise CheckpointError(f"{path}: {what} weights do not fit the network: " + ", ".join(parts))


def rng_state() -> dict:
    """torch's, numpy's and Python's global RNG states as tensors and plain values (``weights_only``-loadable)."""
    np_state: typing.Any = np.random.get_state()  # the legacy tuple form (legacy=True, the default)
    py_state = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
            "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64),
                       "gauss": py_state[2]}}


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(i) for i in p["state"].tolist()), p["gauss"]))


def load_for_sampling(path, device="cpu", weights: str = "ema"):
    """(ε-model in eval mode, dynamics, checkpoint dict) from a checkpoint, for sampling and evaluation.

    The ε-model is the network, wrapped in :class:`models.gfdm.Preconditioned` when the run trained with
    ``--precondition edm`` (read from the checkpoint's config).

    The dynamics are rebuilt from the checkpoint's ``"dynamics"`` entry (a :class:`DynamicsSpec` dict; the
    older ``{"name", "hurst", "num_processes"}`` entry is read too)."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw'; got {weights!r}")
    state = load_checkpoint(path)
    try:
        unet_config = UNetConfig.from_dict(dict(state["unet_config"]))
        dyn = DynamicsSpec.from_dict(state["dynamics"]).build()
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: its network or dynamics description is invalid: {e}") from None
    net = UNet(unet_config)
    weights_state = state["ema" if weights == "ema" else "model"]
    check_state_dict(net, weights_state, weights, path)
    net.load_state_dict(weights_state)
    config = state["config"] if isinstance(state.get("config"), dict) else {}
    dyn = dyn.to(device)
    model = make_eps_model(net.to(device), dyn, config.get("precondition", "none"), config.get("sigma_data", 0.5))
    return model.eval(), dyn, state
