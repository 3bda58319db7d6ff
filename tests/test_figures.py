"""The book's figures, in the notebook files: one caption each, no hand-typed numbers, no image twice.

A figure is a code cell whose one output is the image, followed by its caption cell: a markdown
cell holding one italic paragraph, ``*The caption.*``, with the cell metadata
``{"dyconv": {"figure": "fig-<label>"}}`` and the tag ``remove-cell``. JupyterLab shows the caption
cell; the HTML book drops it and numbers the figure from the code cell's ``mystnb.figure``
metadata, which ``tools/execute_notebooks.py`` copies from the caption cell. Prose links a figure
with ``{ref}`the figure below <fig-label>` ``, which reads well in both (``{numref}`` shows
"Figure %s" in JupyterLab). ``tests/test_links.py`` checks the numbered captions in the built book;
these tests need no build.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Iterator, List, Tuple

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
NOTEBOOKS = sorted(BOOK.glob("*.ipynb"))
MARKDOWN_PAGES = sorted(BOOK.glob("*.md"))
LABEL = re.compile(r"fig-[a-z0-9]+(?:-[a-z0-9]+)*")
# A hand-typed figure number: "Figure 5.2", "Fig. 5.2", "Figures 5.1".
FIGURE_NUMBER = re.compile(r"\b(?:Figures?|Figs?\.)\s*\d+\.\d+")
# A {ref} or {numref} role and its target: {ref}`text <target>` or {ref}`target`.
ROLE = re.compile(r"\{(ref|numref)\}`(?:([^`<]*?)\s*<([^`>]+)>|([^`<]+))`")


def cells(path: Path) -> List[Dict[str, Any]]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def source(cell: Dict[str, Any]) -> str:
    return "".join(cell["source"])


def figures(path: Path) -> Iterator[Tuple[int, str, Dict[str, Any], Dict[str, Any]]]:
    """``(index of the caption cell, label, code cell, caption cell)`` for every caption cell."""
    found = cells(path)
    for i, cell in enumerate(found):
        label = cell["metadata"].get("dyconv", {}).get("figure")
        if label is not None:
            yield i, label, (found[i - 1] if i else {}), cell


def prose() -> Iterator[Tuple[str, str]]:
    """``(where, text)`` for every markdown cell of a notebook and every markdown page."""
    for path in NOTEBOOKS:
        for i, cell in enumerate(cells(path)):
            if cell["cell_type"] == "markdown":
                yield f"{path.name}, cell {i}", source(cell)
    for path in MARKDOWN_PAGES:
        yield path.name, path.read_text(encoding="utf-8")


def image_outputs(cell: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [out for out in cell.get("outputs", [])
            if any(mime.startswith("image/") for mime in out.get("data", {}))]


def test_the_book_has_figures() -> None:
    """The checks below see the figures (a changed metadata key would make them pass vacuously)."""
    assert NOTEBOOKS and sum(1 for path in NOTEBOOKS for _ in figures(path)) >= 10


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_caption_cells_follow_the_recipe(path: Path) -> None:
    """Each caption cell: one italic paragraph, tagged ``remove-cell``, under the code cell of its
    figure, which shows one image and carries exactly that label and caption in ``mystnb.figure``."""
    for i, label, code, caption in figures(path):
        where = f"{path.name}, cell {i} ({label})"
        assert caption["cell_type"] == "markdown" and LABEL.fullmatch(label), where
        assert "remove-cell" in caption["metadata"].get("tags", []), f"{where}: not tagged remove-cell"
        text = source(caption).strip()
        assert re.fullmatch(r"\*[^*\s](.*[^*\s])?\*", text, re.S) and "\n\n" not in text, (
            f"{where}: a caption cell holds one italic paragraph, *...*, and nothing else")
        assert code.get("cell_type") == "code", f"{where}: the caption cell does not follow a code cell"
        assert code["metadata"].get("mystnb", {}).get("figure") == {"name": label, "caption": text[1:-1]}, (
            f"{where}: the figure's metadata is not its caption cell's; run "
            f"`python tools/execute_notebooks.py --captions-only book/{path.name}`")
        shown = [out for out in code.get("outputs", []) if out["output_type"] in ("display_data", "execute_result")]
        assert len(shown) == 1 and image_outputs(code) == shown, (
            f"{where}: a figure's code cell shows one output, the image (myst-nb makes each output a figure)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_image_is_a_captioned_figure(path: Path) -> None:
    """No image is left without a number and caption, and no figure metadata without its caption cell."""
    found = cells(path)
    captioned = {i - 1 for i, *_ in figures(path)}
    for i, cell in enumerate(found):
        if cell["cell_type"] != "code":
            continue
        if image_outputs(cell):
            assert i in captioned, f"{path.name}, cell {i}: an image without a caption cell under it"
        if "figure" in cell["metadata"].get("mystnb", {}):
            assert i in captioned, f"{path.name}, cell {i}: mystnb.figure, but no caption cell under it"


def test_figure_labels_are_unique() -> None:
    labels = [label for path in NOTEBOOKS for _, label, *_ in figures(path)]
    assert len(labels) == len(set(labels)), sorted(label for label in labels if labels.count(label) > 1)


def test_no_hand_typed_figure_numbers() -> None:
    """Figures are numbered by the build; prose links them with {ref} and a description."""
    found = [f"{where}: {match.group(0)!r}" for where, text in prose() for match in FIGURE_NUMBER.finditer(text)]
    assert not found, "hand-typed figure numbers:\n" + "\n".join(found)


def test_references_to_figures_resolve_and_read_well() -> None:
    """Every {ref} to a figure names an existing label and gives a description (JupyterLab shows a
    bare {ref} as its label); no {numref}, which JupyterLab shows as "Figure %s"."""
    labels = {label for path in NOTEBOOKS for _, label, *_ in figures(path)}
    problems, used = [], set()
    for where, text in prose():
        for role, title, target, bare in ROLE.findall(text):
            target = target or bare
            if role == "numref":
                problems.append(f"{where}: {{numref}}`{target}`: use {{ref}} with a description")
            elif target.startswith("fig-"):
                used.add(target)
                if not title:
                    problems.append(f"{where}: {{ref}}`{target}` has no description")
                if target not in labels:
                    problems.append(f"{where}: {{ref}} to {target}, which no figure has")
    assert not problems, "\n".join(problems)
    assert used, "no prose links a figure (has the {ref} syntax changed?)"


def test_no_image_is_stored_twice() -> None:
    """A picture the book needs twice is shown once and linked from the other page."""
    seen: Dict[str, str] = {}
    twice = []
    for path in NOTEBOOKS:
        for i, cell in enumerate(cells(path)):
            for out in image_outputs(cell):
                data = out["data"].get("image/png")
                if data is None:
                    continue
                digest = hashlib.sha256(base64.b64decode("".join(data))).hexdigest()
                where = f"{path.name}, cell {i}"
                if digest in seen:
                    twice.append(f"{where} stores the same PNG as {seen[digest]}")
                seen.setdefault(digest, where)
    assert seen, "no PNG found in the notebooks"
    assert not twice, "\n".join(twice)


# -- tools/execute_notebooks.py copies the captions --------------------------------------------------


@pytest.fixture(scope="module")
def tool() -> Iterator[ModuleType]:
    """The script, imported without leaving its one-thread setting in this process's environment."""
    before = os.environ.get("OMP_NUM_THREADS")
    spec = importlib.util.spec_from_file_location("execute_notebooks", ROOT / "tools" / "execute_notebooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before
    yield module


def notebook(*sources: Tuple[str, str, Dict[str, Any]]) -> Any:
    nb = nbformat.v4.new_notebook()
    for kind, text, metadata in sources:
        cell = nbformat.v4.new_code_cell(text) if kind == "code" else nbformat.v4.new_markdown_cell(text)
        cell.metadata.update(metadata)
        nb.cells.append(cell)
    return nb


def test_tool_copies_each_caption_into_its_figure(tool: ModuleType) -> None:
    mark = {"dyconv": {"figure": "fig-wiring"}}
    nb = notebook(("code", "draw()", {}), ("markdown", "*The wiring, $g = 2$,\nof `x`.*", mark),
                  ("markdown", "Prose.", {}))
    tool.sync_figure_captions(nb)
    figure = {"name": "fig-wiring", "caption": "The wiring, $g = 2$,\nof `x`."}
    assert nb.cells[0].metadata["mystnb"] == {"figure": figure}
    assert nb.cells[1].metadata["tags"] == ["remove-cell"]
    nb.cells[1].source = "*Edited.*"
    tool.sync_figure_captions(nb)
    assert nb.cells[0].metadata["mystnb"]["figure"]["caption"] == "Edited."
    del nb.cells[1]  # the caption cell is gone: so is the figure's number and caption
    tool.sync_figure_captions(nb)
    assert "mystnb" not in nb.cells[0].metadata


@pytest.mark.parametrize("sources", [
    [("markdown", "Prose.", {}), ("markdown", "*Caption.*", {"dyconv": {"figure": "fig-a"}})],
    [("code", "draw()", {}), ("markdown", "*Caption.*\n\nProse.", {"dyconv": {"figure": "fig-a"}})],
    [("code", "draw()", {}), ("markdown", "**Bold.**", {"dyconv": {"figure": "fig-a"}})],
    [("code", "draw()", {}), ("markdown", "*Caption.*", {"dyconv": {"figure": "Figure 1"}})],
], ids=["after-markdown", "two-paragraphs", "bold", "bad-label"])
def test_tool_refuses_a_caption_off_the_recipe(tool: ModuleType, sources: List[Tuple[str, str, Dict]]) -> None:
    with pytest.raises(ValueError):
        tool.sync_figure_captions(notebook(*sources))
