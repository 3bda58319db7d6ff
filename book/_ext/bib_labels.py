"""Citation labels from a ``shorthand`` field of ``book/references.bib``.

sphinxcontrib-bibtex labels citations with pybtex's ``alpha`` style: the authors' initials and
the year, ``[CDL+20]``. An entry without author and year gets the first three letters of its
key instead, so the two blog posts, whose authors and dates are not known, both became ``blo``
and were told apart only by a suffix: ``[bloa]``, ``[blob]``. This registers the formatting
style ``alpha_shorthand`` (``bibtex_default_style`` in ``_config.yml``): ``alpha`` in every
respect, except that an entry with a ``shorthand`` field (the field BibLaTeX uses for the same
purpose) is labelled by it, ``[Blog-parse]``.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator

from pybtex.plugin import register_plugin
from pybtex.style.formatting.alpha import Style as AlphaStyle
from pybtex.style.labels.alpha import LabelStyle as AlphaLabelStyle
from sphinx.application import Sphinx

STYLE = "alpha_shorthand"


class ShorthandLabelStyle(AlphaLabelStyle):
    """``alpha`` labels, or an entry's ``shorthand`` field where it has one."""

    def format_labels(self, sorted_entries: Iterable[Any]) -> Iterator[str]:
        entries = list(sorted_entries)
        # alpha's labels for the other entries only, so none gets a suffix for a shorthand's sake.
        alpha = iter(super().format_labels([e for e in entries if "shorthand" not in e.fields]))
        for entry in entries:
            yield str(entry.fields["shorthand"]) if "shorthand" in entry.fields else next(alpha)


class ShorthandStyle(AlphaStyle):
    """pybtex's ``alpha`` formatting style with :class:`ShorthandLabelStyle` labels."""

    default_label_style = ShorthandLabelStyle


def setup(app: Sphinx) -> Dict[str, Any]:
    register_plugin("pybtex.style.formatting", STYLE, ShorthandStyle, force=True)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
