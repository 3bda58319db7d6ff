"""Link check of the built book in ``_build/html``, offline.

Every internal ``href``/``src`` (pages, ``#anchors`` within and across pages,
images, CSS, JS) must resolve to a file in the build, and an anchor to an
``id`` (or ``<a name>``) on the target page. External http(s) links are only
collected, never fetched; but a page may not load a script or a stylesheet from
another site, since the book must work offline and load no remote code.

Every figure of the book also carries a numbered caption here, and has the id that ``{ref}``
links to (``tests/test_figures.py`` checks the notebooks' side of the caption recipe).

Build first: ``jupyter-book build --all -W -n --keep-going .``
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple
from urllib.parse import unquote, urlsplit

import pytest
from book_pages import BUILD_COMMAND, chapters, pages
from book_pages import Page as BookPage

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "_build" / "html"

# (tag, attribute) pairs whose value is a URL the browser follows or loads.
LINK_ATTRS = {("a", "href"), ("link", "href"), ("script", "src"), ("img", "src"), ("source", "src"),
              ("iframe", "src"), ("video", "src"), ("audio", "src")}
# Schemes that point at no file: nothing to resolve.
IGNORED_SCHEMES = {"mailto", "javascript", "data", "tel"}


@dataclass
class Link:
    """One URL found on a page."""

    page: Path
    tag: str
    attr: str
    url: str
    rel: str = ""


@dataclass
class Page:
    """The anchors a page defines and the links it contains."""

    ids: Set[str] = field(default_factory=set)
    links: List[Link] = field(default_factory=list)


class _PageParser(HTMLParser):
    def __init__(self, path: Path) -> None:
        super().__init__(convert_charrefs=True)
        self.path = path
        self.page = Page()

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, Optional[str]]]) -> None:
        values = {name: value for name, value in attrs if value is not None}
        if "id" in values:
            self.page.ids.add(values["id"])
        if tag == "a" and "name" in values:
            self.page.ids.add(values["name"])
        for name, value in values.items():
            if (tag, name) in LINK_ATTRS:
                self.page.links.append(Link(self.path, tag, name, value.strip(), values.get("rel", "").lower()))

    handle_startendtag = handle_starttag


def parse_site(build: Path) -> Dict[Path, Page]:
    """Parse every page under ``build``; keys are resolved file paths.

    ``_static/`` holds assets only: its ``.html`` files are the themes' Jinja
    macro templates (``{{ pathto(...) }}``), which no page serves.
    """
    pages = {}
    for path in sorted(build.rglob("*.html")):
        if "_static" in path.relative_to(build).parts:
            continue
        parser = _PageParser(path.resolve())
        parser.feed(path.read_text(encoding="utf-8"))
        parser.close()
        pages[path.resolve()] = parser.page
    return pages


def is_external(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") or url.startswith("//")


def check_site(build: Path) -> Tuple[List[str], List[str], List[str]]:
    """Return ``(broken internal links, off-site scripts/stylesheets, external links)``."""
    build = build.resolve()
    pages = parse_site(build)
    broken, offsite, external = [], [], []
    for page_path, page in pages.items():
        where = page_path.relative_to(build)
        for link in page.links:
            if not link.url:
                continue
            if is_external(link.url):
                external.append(link.url)
                if link.tag == "script" or (link.tag == "link" and "stylesheet" in link.rel.split()):
                    offsite.append(f"{where}: <{link.tag} {link.attr}={link.url!r}> loads from another site")
                continue
            parts = urlsplit(link.url)
            if parts.scheme in IGNORED_SCHEMES:
                continue
            if parts.scheme or parts.netloc:
                broken.append(f"{where}: {link.url!r} has unexpected scheme {parts.scheme!r}")
                continue
            target = page_path if not parts.path else (page_path.parent / unquote(parts.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            if build not in target.parents:
                broken.append(f"{where}: {link.url!r} points outside the build, to {target}")
                continue
            if not target.is_file():
                broken.append(f"{where}: {link.url!r} -> {target.relative_to(build)} does not exist")
                continue
            fragment = unquote(parts.fragment)
            if fragment and target.suffix == ".html" and fragment not in pages.get(target, Page()).ids:
                broken.append(f"{where}: {link.url!r} -> no id {fragment!r} on {target.relative_to(build)}")
    return broken, offsite, external


@pytest.fixture(scope="module")
def site() -> Tuple[List[str], List[str], List[str]]:
    if not (BUILD / "index.html").is_file():
        pytest.fail(f"no built book at {BUILD}: run `{BUILD_COMMAND}` from the repository root first")
    return check_site(BUILD)


def test_internal_links_resolve(site: Tuple[List[str], List[str], List[str]]) -> None:
    broken = site[0]
    assert not broken, f"{len(broken)} broken internal links:\n" + "\n".join(broken)


def test_no_offsite_scripts_or_stylesheets(site: Tuple[List[str], List[str], List[str]]) -> None:
    offsite = site[1]
    assert not offsite, "pages load code or styles from other sites:\n" + "\n".join(offsite)


def test_book_pages_were_checked() -> None:
    """The checker saw every page of ``_toc.yml`` (a build with no pages would pass vacuously)."""
    if not (BUILD / "index.html").is_file():
        pytest.fail(f"no built book at {BUILD}: run `{BUILD_COMMAND}` from the repository root first")
    built = {p.relative_to(BUILD).as_posix() for p in BUILD.rglob("*.html")}
    listed = {page.html for page in pages()}
    assert listed and listed <= built, f"pages missing from the build: {sorted(listed - built)}"


def test_every_page_is_in_the_toc() -> None:
    """Every notebook and markdown page in ``book/`` is listed in ``_toc.yml``, and every entry
    there has its source. The build renders only the pages the toc lists (``only_build_toc_files``)
    and the tests go through the pages it lists, so a page left out would be silently dropped."""
    listed = {page.file for page in pages()}
    sources = {p.with_suffix("").relative_to(ROOT).as_posix()
               for suffix in ("ipynb", "md") for p in ROOT.joinpath("book").glob(f"*.{suffix}")}
    assert sources - listed == set(), f"pages in book/ that _toc.yml does not list: {sorted(sources - listed)}"
    missing = sorted(page.file for page in pages() if not page.source.is_file())
    assert missing == [], f"_toc.yml lists pages with no .ipynb or .md source: {missing}"
    assert chapters() and all(page.notebook for page in chapters()), "the numbered chapters are notebooks"


class _FigureParser(HTMLParser):
    """The ``<figure>`` elements of a page, in page order: their id, caption number and caption text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.figures: List[Dict[str, str]] = []
        self._open = 0  # <figure> elements open around the current position
        self._span: Optional[str] = None  # "number" or "text" while inside such a caption span
        self._depth = 0  # spans open inside it (math, code)

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, Optional[str]]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if tag == "figure":
            self._open += 1
            self.figures.append({"id": values.get("id", ""), "number": "", "text": ""})
        elif tag == "span" and self._span:
            self._depth += 1
        elif tag == "span" and self._open:
            classes = values.get("class", "").split()
            self._span = "number" if "caption-number" in classes else "text" if "caption-text" in classes else None

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self._open -= 1
        elif tag == "span" and self._depth:
            self._depth -= 1
        elif tag == "span":
            self._span = None

    def handle_data(self, data: str) -> None:
        if self._span:
            self.figures[-1][self._span] += data


def figures_on(path: Path) -> List[Dict[str, str]]:
    parser = _FigureParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser.figures


def figure_labels(page: BookPage) -> List[str]:
    """The labels of a notebook page's figures, in reading order (its caption cells, see test_figures.py)."""
    if not page.notebook:
        return []
    cells = json.loads(page.source.read_text(encoding="utf-8"))["cells"]
    return [cell["metadata"]["dyconv"]["figure"] for cell in cells if "figure" in cell["metadata"].get("dyconv", {})]


def test_figures_have_numbered_captions() -> None:
    """Chapter N's figures are numbered N.1, N.2, ... in reading order, each with its caption and its
    label as its id; no page shows a figure without a number and a caption."""
    if not (BUILD / "index.html").is_file():
        pytest.fail(f"no built book at {BUILD}: run `{BUILD_COMMAND}` from the repository root first")
    numbers = {page.html: n for n, page in enumerate(chapters(), start=1)}
    problems, seen = [], 0
    for page in pages():
        figures = figures_on(BUILD / page.html)
        seen += len(figures)
        labels = figure_labels(page)
        if [f["id"] for f in figures] != labels:
            problems.append(f"{page.html}: figure ids {[f['id'] for f in figures]}, caption cells {labels}")
        for i, figure in enumerate(figures, start=1):
            number = re.fullmatch(r"(?:Fig\.|Figure) (\d+(?:\.\d+)*)", figure["number"].strip())
            expected = f"{numbers[page.html]}.{i}" if page.html in numbers else None
            if number is None or (expected and number.group(1) != expected) or not figure["text"].strip():
                problems.append(f"{page.html}: figure {figure['id'] or i} is captioned "
                                f"{figure['number'].strip()!r} {figure['text'][:40]!r}, expected number {expected}")
    assert seen, "no figure found in the built book"
    assert not problems, "\n".join(problems)


def test_checker_finds_broken_links(tmp_path: Path) -> None:
    """The checker itself: a small site with one of each fault, and links that are fine."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "fig.png").write_bytes(b"")
    (tmp_path / "style.css").write_text("")
    (tmp_path / "other.html").write_text('<h1 id="top">x</h1><a name="legacy"></a>')
    (tmp_path / "index.html").write_text(
        '<link rel="stylesheet" href="style.css?digest=1"><img src="img/fig.png">'
        '<a href="other.html#top">ok</a><a href="other.html#legacy">ok</a><a href="#here">ok</a><p id="here"></p>'
        '<a href="mailto:a@b.c">ok</a><a href="https://arxiv.org/abs/1912.03458">ext</a>'
        '<a href="missing.html">bad</a><a href="other.html#nope">bad</a><a href="#gone">bad</a>'
        '<img src="img/none.png"><a href="../outside.html">bad</a>'
        '<script src="https://cdn.example.org/x.js"></script>'
        '<link rel="stylesheet" href="//cdn.example.org/x.css">'
    )
    broken, offsite, external = check_site(tmp_path)
    assert sorted(b.split(": ", 1)[1].split(" ")[0] for b in broken) == sorted(
        ["'missing.html'", "'other.html#nope'", "'#gone'", "'img/none.png'", "'../outside.html'"]
    ), broken
    assert len(offsite) == 2, offsite
    assert "https://arxiv.org/abs/1912.03458" in external
