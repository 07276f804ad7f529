"""MkDocs hooks (mkdocs.yml ``hooks:``).

- ``notebooks/*.ipynb`` are published at ``notebooks/`` of the site: they live outside ``docs/`` (the tests
  execute them where they are), and this lets the pages link them with strict link checking. A line
  ``<!-- notebooks -->`` becomes a list of links to all of them, each with the heading of its first cell.
- A line ``<!-- api: PACKAGE -->`` in a page becomes one mkdocstrings block (``::: PACKAGE.NAME``) per name of
  ``PACKAGE.__all__``, in its order, so the API reference always lists exactly the exported names. ``__all__``
  is read from the package's ``__init__.py`` source (a list of string literals), without importing it.
- Sphinx roles left in docstrings (``:class:`~fracsde.MarkovNoise```, ``:meth:`marginal```) become links to the
  rendered object when the name (or its trailing part) names exactly one object of the API pages, and plain
  code otherwise.
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from mkdocs.structure.files import File, Files
from mkdocs.utils import get_relative_url

ROOT = Path(__file__).resolve().parents[1]
API_MARKER = re.compile(r"^<!-- api: ([\w.]+) -->$", re.M)
NOTEBOOKS_MARKER = re.compile(r"^<!-- notebooks -->$", re.M)
OBJECT_ID = re.compile(r'id="((?:fracsde|models)\.[\w.]+)"')
ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc):<code>(~?)([\w.]+)</code>")
_anchors: dict[str, str] = {}          # rendered object id -> URL of its page


def public_names(package: str) -> list[str]:
    """The string literals of ``package.__all__`` in ``<package path>/__init__.py`` (ValueError if none)."""
    init = ROOT.joinpath(*package.split("."), "__init__.py")
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise ValueError(f"{init} defines no __all__ list; the API reference renders exactly __all__")


def notebook_title(path: Path) -> str:
    """The first line of the notebook's first markdown cell, without '#' and a leading 'NN —'."""
    cells = json.loads(path.read_text())["cells"]
    text = next(("".join(c["source"]).strip() for c in cells if c["cell_type"] == "markdown"), "")
    first = text.splitlines()[0] if text else path.stem
    return re.sub(r"^#+\s*(\d+\s*[—·:-]\s*)?", "", first).strip()


def on_files(files: Files, config) -> Files:
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        files.append(File(f"notebooks/{nb.name}", src_dir=str(ROOT), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    def blocks(match: re.Match) -> str:
        package = match.group(1)
        return "\n\n".join(f"::: {package}.{name}" for name in public_names(package))

    def notebook_list(match: re.Match) -> str:
        return "\n".join(f"- [{nb.name}](notebooks/{nb.name}): {notebook_title(nb)}"
                          for nb in sorted((ROOT / "notebooks").glob("*.ipynb")))

    markdown = NOTEBOOKS_MARKER.sub(notebook_list, markdown)
    return API_MARKER.sub(blocks, markdown)


def on_pre_build(config) -> None:
    _anchors.clear()                     # `mkdocs serve` rebuilds in the same process


def on_page_content(html: str, page, config, files) -> str:
    for object_id in OBJECT_ID.findall(html):
        _anchors.setdefault(object_id, page.url)
    return html


def _resolve(name: str) -> str | None:
    """The rendered object id named by the longest trailing part of ``name`` that names any (None if that part
    names several: shorter parts would only name more)."""
    parts = name.split(".")
    for k in range(len(parts)):
        suffix = ".".join(parts[k:])
        found = [i for i in _anchors if i == suffix or i.endswith("." + suffix)]
        if len(found) == 1:
            return found[0]
        if found:
            return None
    return None


def on_post_page(output: str, page, config) -> str:
    # every page's content is rendered (on_page_content) before any page is written, so _anchors is complete
    def link(match: re.Match) -> str:
        short, name = match.groups()
        text = f"<code>{name.rsplit('.', 1)[-1] if short else name}</code>"
        target = _resolve(name)
        if target is None:
            return text
        href = get_relative_url(_anchors[target], page.url) + "#" + target
        return f'<a class="autorefs autorefs-internal" href="{href}">{text}</a>'

    return ROLE.sub(link, output)
