"""The documentation promises only what exists and prints what it shows.

* Every dotted name of the library or the models that a page mentions (``fracsde.MarkovNoise``,
  ``models.gfdm.Preconditioned``, ``fracsde.kinds.KINDS``, …) and every name a page imports with
  ``from fracsde… import …`` / ``from models… import …`` resolves.
* docs/gfdm.md's and docs/pyro.md's examples print the figures the pages show (README and CONTRIBUTING: their own
  test files). pyro.md's blocks that print nothing (the latent bridge fit, ~18 s) are not run here.
"""
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOTTED = re.compile(r"(?<![\w/.-])(?:fracsde|models)(?:\.[A-Za-z_]\w*)+")
FROM_IMPORT = re.compile(r"from\s+((?:fracsde|models)(?:\.\w+)*)\s+import\s+\(?([\w\s,]+)")


def _resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ModuleNotFoundError:
            continue
    for part in parts[i:]:
        obj = getattr(obj, part)
    return obj


def _documented_names() -> list[tuple[str, str]]:
    names = set()
    for page in PAGES:
        text = page.read_text()
        # "fracsde.py"-like file names in the layout listings are files, not dotted names
        names.update((name, page.name) for name in DOTTED.findall(text) if not name.endswith(".py"))
        for module, imported in FROM_IMPORT.findall(text):
            for name in imported.replace("\n", " ").split(","):
                name = name.split(" as ")[0].strip()
                if name.isidentifier():
                    names.add((f"{module}.{name}", page.name))
    return sorted(names)


def test_the_pages_mention_the_public_names_this_test_guards():
    names = {name for name, _ in _documented_names()}
    assert {"models.gfdm.Preconditioned", "fracsde.MarkovNoise", "models.gfdm.DynamicsSpec"} <= names
    assert len(names) > 40


@pytest.mark.parametrize("name, page", _documented_names())
def test_every_documented_dotted_name_exists(name, page):
    try:
        _resolve(name)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"{page} names {name}, which does not exist: {e}")


def test_gfdm_page_example_prints_what_the_page_shows():
    from doc_snippets import blocks, check_block

    found = blocks((ROOT / "docs" / "gfdm.md").read_text())
    assert found
    namespace = {"__name__": "gfdm_page"}
    for i, (code, printed) in enumerate(found):
        check_block(code, printed, namespace, f"docs/gfdm.md block {i}")


def test_pyro_page_examples_print_what_the_page_shows():
    from doc_snippets import blocks, check_block

    found = [(code, printed) for code, printed in blocks((ROOT / "docs" / "pyro.md").read_text()) if printed]
    assert len(found) == 2                  # NUTS on an fBM path; the classical estimators' table
    for i, (code, printed) in enumerate(found):
        check_block(code, printed, {"__name__": "pyro_page"}, f"docs/pyro.md printing block {i}")
