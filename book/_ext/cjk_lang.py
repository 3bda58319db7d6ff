"""Mark the Chinese in the pages' prose as Chinese: ``<span lang="zh-Hans">``.

The book cites two Chinese blog posts by their titles (the bibliography, chapter 5). A
declared language lets a browser pick a Chinese font and Chinese glyph forms, and a screen
reader a Chinese voice; ``book/_static/dyconv.css`` gives ``:lang(zh)`` its font stack.
Each run of Chinese characters (with any Latin letters or digits written inside it, as in
"基于Pytorch的") becomes an inline node with the class ``language-zh-Hans``, which docutils
writes as the attribute ``lang="zh-Hans"``. Code blocks and inline code are left alone (their
highlighting is computed from the raw text); their font stack holds the Chinese fonts.

Runs after the bibliography is resolved (``doctree-resolved``), so the titles it writes are
marked too.
"""

from __future__ import annotations

import re
from typing import Any, Dict

from docutils import nodes
from sphinx.application import Sphinx

LANG_CLASS = "language-zh-Hans"
# CJK punctuation, CJK ideographs (extension A and the main block), compatibility
# ideographs, full-width forms.
_CJK = "\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_RUN = re.compile(f"[{_CJK}]+(?:[A-Za-z0-9]+[{_CJK}]+)*")
_SKIP = (nodes.FixedTextElement, nodes.literal, nodes.raw, nodes.math, nodes.comment)


def _skipped(element: nodes.Element) -> bool:
    """Whether ``element`` is or lies inside code, math, raw markup or an element already marked Chinese."""
    while element is not None:
        if isinstance(element, _SKIP) or LANG_CLASS in element.get("classes", []):
            return True
        element = element.parent
    return False


def _split(text: str) -> list[nodes.Node]:
    """``text`` as text nodes and inline nodes marked zh-Hans, one for each run of Chinese."""
    pieces: list[nodes.Node] = []
    last = 0
    for run in _RUN.finditer(text):
        if run.start() > last:
            pieces.append(nodes.Text(text[last:run.start()]))
        pieces.append(nodes.inline(run.group(), run.group(), classes=[LANG_CLASS]))
        last = run.end()
    if last < len(text):
        pieces.append(nodes.Text(text[last:]))
    return pieces


def mark_chinese(app: Sphinx, doctree: nodes.document, docname: str) -> None:
    """Wrap each run of Chinese characters of ``doctree``'s text in an inline node marked zh-Hans.

    Adjacent text nodes are read as one text: the bibliography writes "{P}ytorch" as two.
    """
    for element in list(doctree.findall(nodes.Element)):
        if _skipped(element):
            continue
        i = 0
        while i < len(element.children):
            j = i
            while j < len(element.children) and isinstance(element[j], nodes.Text):
                j += 1
            text = "".join(element.children[i:j])
            if _RUN.search(text):
                pieces = _split(text)
                element[i:j] = pieces
                i += len(pieces)
            else:
                i = j + 1


def setup(app: Sphinx) -> Dict[str, Any]:
    app.connect("doctree-resolved", mark_chinese)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
