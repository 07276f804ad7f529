"""docs/CONTRIBUTING.md: every extension-point example runs as written and prints what the page shows."""
import pathlib
import re

import pytest

PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "CONTRIBUTING.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)


def test_page_has_the_extension_point_examples():
    text = PAGE.read_text()
    for heading in ("### A noise process", "### A schedule", "### A sampler", "### A dataset"):
        assert heading in text, heading
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_contributing_block_runs_and_prints_what_the_page_shows(index):
    from doc_snippets import blocks, check_block

    code, printed = blocks(PAGE.read_text())[index]
    check_block(code, printed, {"__name__": "contributing"}, f"CONTRIBUTING block {index}")
