"""argparse value types shared by the model command lines (``gfdm``, ``roughvol``): one message for each mistake."""
from __future__ import annotations

import argparse

__all__ = ["positive_int"]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--threads``, ``--paths``, ...), else a one-line error naming the value."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {n}")
    return n
