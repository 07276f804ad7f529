"""The Python blocks of a documentation page, run as written, with what they print checked against the page.

A page shows a block's output in a ```text block right after it (a line "Prints:" between them is allowed).
:func:`check_page` runs every block in one namespace (later blocks may use earlier names), captures what each
prints and compares it with that output: the words exactly (whitespace aside), each number to the precision the
page prints it (two units of its last printed digit, for last-digit round-off across BLAS builds). A block that
prints but has no output block fails: a figure the page does not state is a claim nobody checks.
"""
from __future__ import annotations

import contextlib
import io
import math
import re

BLOCK = re.compile(r"```python\n(.*?)```\n(?:\s*Prints:\s*\n)?(?:\s*```text\n(.*?)```)?", re.S)
NUMBER = re.compile(r"[-+−]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+−]?\d+)?")


def blocks(text: str) -> list[tuple[str, str | None]]:
    """(code, printed output or None) of each Python block of a page."""
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(text)]


def _unit(number: str) -> float:
    """One unit of the last printed digit of ``number`` (e.g. 0.001 for "0.502", 1e-5 for "1.5e-04")."""
    mantissa, _, exponent = number.replace("−", "-").lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (-decimals + (int(exponent) if exponent else 0))


def compare_printed(expected: str, actual: str, where: str) -> None:
    exp_words = NUMBER.sub("#", " ".join(expected.split()))
    act_words = NUMBER.sub("#", " ".join(actual.split()))
    assert exp_words == act_words, f"{where} prints\n{actual}\nbut the page shows\n{expected}"
    for e, a in zip(NUMBER.findall(expected), NUMBER.findall(actual), strict=True):
        ev, av = (float(x.replace("−", "-")) for x in (e, a))
        assert math.isclose(ev, av, abs_tol=2 * _unit(e)), (f"{where} prints {a} where the page shows {e}:\n"
                                                            f"{actual}")


def run_block(code: str, namespace: dict, where: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, where, "exec"), namespace)
    return buf.getvalue()


def check_block(code: str, expected: str | None, namespace: dict, where: str) -> None:
    printed = run_block(code, namespace, where)
    if expected is None:
        assert not printed, f"{where} prints\n{printed}\nbut the page shows no output block (```text) for it"
    else:
        compare_printed(expected, printed, where)
