"""The book's pages as ``_toc.yml`` lists them, for the tests that go through the book page by page.

The table of contents is the one list of the book's pages: the build renders only the pages it
names (``only_build_toc_files`` in ``_config.yml``), so the tests take their pages from it rather
than from a pattern over ``book/`` that a new page could escape. ``tests/test_links.py`` checks
that every page source in ``book/`` is listed there.

The test modules import this one as ``from book_pages import ...``: pytest's default import mode
("prepend") puts ``tests/`` (a folder without ``__init__.py``) on ``sys.path`` before it imports
them, whether it runs the whole suite or one file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List

import yaml

ROOT = Path(__file__).resolve().parents[1]
TOC = ROOT / "_toc.yml"
# The README's build command, which the tests that need the built book tell the reader to run.
BUILD_COMMAND = "jupyter-book build --all -W -n --keep-going ."


@dataclass(frozen=True)
class Page:
    """One page of the book: a ``root:`` or ``file:`` entry of ``_toc.yml``."""

    file: str  # as _toc.yml names it, relative to the repository root, without suffix: "book/02_static_convolution"
    numbered: bool  # in a ``numbered`` part: one of the chapters

    @property
    def name(self) -> str:
        """The file name without folder and suffix: ``02_static_convolution``."""
        return Path(self.file).name

    @property
    def notebook(self) -> bool:
        """Whether the page is a notebook (``<file>.ipynb``), not a markdown page (``<file>.md``)."""
        return (ROOT / f"{self.file}.ipynb").is_file()

    @property
    def source(self) -> Path:
        """The page's source file."""
        return ROOT / f"{self.file}.ipynb" if self.notebook else ROOT / f"{self.file}.md"

    @property
    def html(self) -> str:
        """The page's path in the built site: ``book/02_static_convolution.html``."""
        return f"{self.file}.html"


def _without_suffix(file: str) -> str:
    path = Path(file)
    return path.with_suffix("").as_posix() if path.suffix in (".ipynb", ".md") else path.as_posix()


def _entries(items: List[Any], numbered: bool) -> Iterator[Page]:
    """The ``file:`` entries of a list of parts, chapters or sections, depth first (reading order)."""
    for item in items or []:
        if "glob" in item:  # its pages would be known only to the build
            raise ValueError(f"_toc.yml: name each page with `file:`, not `glob: {item['glob']}`")
        if "file" in item:
            yield Page(_without_suffix(item["file"]), numbered)
        for key in ("parts", "chapters", "sections"):
            if key in item:
                yield from _entries(item[key], bool(item.get("numbered", numbered)))


def pages(toc: Path = TOC) -> List[Page]:
    """Every page of the book in reading order: the root, then each ``file:`` entry."""
    data = yaml.safe_load(toc.read_text(encoding="utf-8"))
    numbered = bool(data.get("defaults", {}).get("numbered", False))
    found = [Page(_without_suffix(data["root"]), False)] if "root" in data else []
    found += _entries([data], numbered)
    return found


def notebook_pages() -> List[Page]:
    """The pages that are notebooks, in reading order: the chapters and the notebook pages after them."""
    return [page for page in pages() if page.notebook]


def chapters() -> List[Page]:
    """The numbered chapters (the ``numbered`` part of ``_toc.yml``), in reading order."""
    return [page for page in pages() if page.numbered]
