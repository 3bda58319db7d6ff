"""The book's helpers: everything a chapter draws, tabulates or lets a reader explore.

Needs the ``book`` extra (``pip install .[book]``: ipywidgets, matplotlib). The layer
(:mod:`dyconv_teach`) never imports this package.

- :mod:`~dyconv_teach.teaching.shapes`: shape tables, each shape read off a real torch call.
- :mod:`~dyconv_teach.teaching.explain`: plain-words explanations of torch's shape errors.
- :mod:`~dyconv_teach.teaching.plots`: the figures drawn from real tensors.
- :mod:`~dyconv_teach.teaching.explorer`: the explorer framework (live widgets, static HTML).
- :mod:`~dyconv_teach.teaching.widgets`: the book's three explorers.
"""

import importlib.util

__all__: list = []

_missing = [name for name in ("ipywidgets", "matplotlib") if importlib.util.find_spec(name) is None]
if _missing:
    raise ImportError(
        f"dyconv_teach.teaching holds the book's helpers and needs the 'book' extra ({', '.join(_missing)} "
        "missing): pip install 'dyconv-teach[book]', or pip install -r requirements.txt in the repository. "
        "The layer itself (from dyconv_teach import DynamicConv2d) needs torch alone."
    )
