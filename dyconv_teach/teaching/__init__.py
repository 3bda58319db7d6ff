"""The book's helpers: everything a chapter draws, tabulates or lets a reader explore, and the checker.

- :mod:`~dyconv_teach.teaching.shapes`: shape tables, each shape read off a real torch call.
- :mod:`~dyconv_teach.teaching.explain`: plain-words explanations of torch's shape errors.
- :mod:`~dyconv_teach.teaching.checker`: checks a reader's own dynamic convolution and names the mistake.
- :mod:`~dyconv_teach.teaching.family`: CondConv, DyConv, ODConv and DCD as mixing steps over one batching step.
- :mod:`~dyconv_teach.teaching.plots`: the figures drawn from real tensors.
- :mod:`~dyconv_teach.teaching.explorer`: the explorer framework (live widgets, static HTML).
- :mod:`~dyconv_teach.teaching.widgets`: the book's four explorers.

The layer (:mod:`dyconv_teach`) never imports this package. ``plots``, ``explorer`` and ``widgets``
need the ``book`` extra (``pip install .[book]``: ipywidgets, matplotlib), and importing them
without it says which extra to install. ``shapes``, ``explain``, ``checker`` and ``family`` need torch alone,
so that a reader can run the checker in any Python session.
"""

__all__: list = []


def _book_extra_error(module: str, error: ImportError) -> ImportError:
    """The error to raise when ``module`` cannot import a package of the ``book`` extra."""
    return ImportError(
        f"{module} is one of the book's helpers and needs the 'book' extra ({error.name} missing): "
        "pip install 'dyconv-teach[book]', or pip install -r requirements.txt in the repository. "
        "The layer itself (from dyconv_teach import DynamicConv2d) needs torch alone."
    )
