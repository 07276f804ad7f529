"""Argument checks shared by the whole library.

Each check raises ``ValueError``/``TypeError`` whose message names the parameter, the
allowed range and the offending value, so users never have to read a traceback to learn
what went wrong.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

KINDS = ("type1", "type2")


def check_has_data(tensor, name: str) -> None:
    """Refuse a tensor on the 'meta' device: it has a shape but no values, so no check (and no result) exists."""
    if isinstance(tensor, torch.Tensor) and tensor.is_meta:
        raise ValueError(f"{name} is a tensor on the 'meta' device (a shape without values); pass one on a device "
                         f"that holds data, e.g. 'cpu' or 'cuda'")


def check_hurst(hurst, name: str = "hurst", scalar: bool = False) -> None:
    """Require a (tensor of) Hurst index strictly inside (0, 1), NaN rejected; ``scalar``: a single value."""
    if isinstance(hurst, torch.Tensor):
        check_has_data(hurst, name)
        if scalar and hurst.numel() != 1:
            raise ValueError(f"{name} must be a single value here; got a tensor of shape {tuple(hurst.shape)} "
                             f"(sample one process per Hurst index)")
        if hurst.is_floating_point() is False:
            raise TypeError(f"{name} must be a floating-point number or tensor, got dtype {hurst.dtype}")
        bad = ~((hurst > 0) & (hurst < 1))  # NaN compares False -> bad
        if bool(bad.any()):
            raise ValueError(f"{name} must lie in the open interval (0, 1); got {hurst.detach().cpu().tolist()}")
        return
    if isinstance(hurst, bool) or not isinstance(hurst, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1), got {type(hurst).__name__}")
    if not (0.0 < float(hurst) < 1.0):  # also rejects NaN
        raise ValueError(f"{name} must lie in the open interval (0, 1); got {hurst}")


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} ('type1' = Mandelbrot-van Ness, "
                         f"'type2' = Riemann-Liouville); got {kind!r}")
    return kind


def check_finite_times(t, name: str) -> torch.Tensor:
    """A float64 tensor of ``t`` with no NaN or infinity (any shape), naming ``name`` and the bad values."""
    check_has_data(t, name)
    t = torch.as_tensor(t, dtype=torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite; got {t[~torch.isfinite(t)].unique().tolist()}")
    return t


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value}")
    return value


def check_positive_float(value, name: str, lower: float = 0.0, inclusive: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
    ok = v >= lower if inclusive else v > lower
    if not ok or math.isnan(v) or math.isinf(v):
        op = ">=" if inclusive else ">"
        raise ValueError(f"{name} must be finite and {op} {lower}; got {value}")
    return v


def as_times(ts, name: str = "ts", dtype=torch.float64, device=None, allow_zero_length: bool = False) -> torch.Tensor:
    """Convert a grid to a 1-D tensor and check it is finite, non-negative, strictly increasing."""
    if not isinstance(ts, torch.Tensor):
        if isinstance(ts, (int, float)):
            raise TypeError(f"{name} must be a 1-D sequence of times, got a scalar {ts!r}")
        ts = torch.as_tensor(ts, dtype=dtype)
    check_has_data(ts, name)
    if ts.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(ts.shape)}")
    if ts.numel() == 0 and not allow_zero_length:
        raise ValueError(f"{name} must contain at least one time")
    if not ts.is_floating_point():
        ts = ts.to(dtype)
    if device is not None:
        ts = ts.to(device)
    if not bool(torch.isfinite(ts).all()):
        raise ValueError(f"{name} must be finite; got {ts.tolist()}")
    if bool((ts < 0).any()):
        raise ValueError(f"{name} must be non-negative (fBM starts at t = 0); got min {ts.min().item()}")
    if ts.numel() > 1 and not bool((ts[1:] > ts[:-1]).all()):
        raise ValueError(f"{name} must be strictly increasing")
    return ts


def check_batch_size(batch_size) -> int:
    return check_positive_int(batch_size, "batch_size", 1)


def check_choice(value, name: str, choices: Sequence) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}; got {value!r}")
    return value


#: dtypes too coarse for the sampling recursions: computed in float32 and cast (bfloat16 gave +8 % variance)
_REDUCED = (torch.float16, torch.bfloat16)


def sampling_dtypes(dtype) -> tuple:
    """(dtype to compute in, dtype to return) for a sampler's ``dtype`` argument (None: torch's default).

    float16/bfloat16 are computed in float32 and cast at the end (their rounding biases the MA-fBM recursion:
    bfloat16 variance +8 % at t = 1); non-floating dtypes are refused, naming the dtype.
    """
    dtype = dtype or torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
        raise TypeError(f"dtype must be a real floating-point torch dtype (float32, float64; float16/bfloat16 are "
                        f"computed in float32 and cast); got {dtype}")
    return (torch.float32 if dtype in _REDUCED else dtype), dtype


def check_device(device, name: str = "device") -> torch.device:
    """A torch.device that this machine has (a clear error instead of torch's "not compiled with CUDA")."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} must be a torch device such as 'cpu' or 'cuda:0'; got {device!r}") from None
    if device.type == "meta":
        raise ValueError(f"{name}='meta' holds no values (shapes only); use device='cpu' or 'cuda'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}={str(device)!r} requested but CUDA is not available here "
                         f"(torch {torch.__version__}); use device='cpu'")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"{name}={str(device)!r} requested but MPS is not available here; use device='cpu'")
    return device
