"""Drop the duplicate inline <script> blocks Sphinx 7.4 writes into every page.

Extensions that call ``app.add_js_file(None, body=...)`` after the builder is
initialised (sphinx-thebe's ``const THEBE_JS_URL = ...``, sphinx-togglebutton's
selector) get their script added twice: once as ``_JavaScript(None)`` and again
when the HTML builder re-adds late assets as ``_JavaScript('')`` in
``prepare_writing``. The second ``const`` declaration throws a JavaScript error
on every page. This keeps the first copy of each script.

Fixed upstream by sphinx-doc/sphinx#13402 ("Sphinx.add_js_file(): replace None
filename with '' before passing to HTML builder", merged 2025-03-02). Delete this
extension (and its line in _config.yml) once the Sphinx that Jupyter Book
installs includes that fix: Jupyter Book 1.0.4 pins Sphinx 7.
"""

from __future__ import annotations

from typing import Any, Dict

from sphinx.application import Sphinx


def _dedupe(app: Sphinx, pagename: str, templatename: str, context: Dict[str, Any], doctree: Any) -> None:
    scripts = context.get("script_files")
    if not isinstance(scripts, list):
        return
    seen = set()
    unique = []
    for script in scripts:
        key = (script.filename or "", script.priority, tuple(sorted(script.attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique


def setup(app: Sphinx) -> Dict[str, Any]:
    app.connect("html-page-context", _dedupe)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
