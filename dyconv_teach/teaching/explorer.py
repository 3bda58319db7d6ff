"""The explorer framework: controls, a render function, and its two displays.

An :class:`Explorer` displayed in Jupyter is a live widget: every move of a
slider calls its render function again, which runs real torch calls. Its mime
bundle also carries a ``text/html`` fallback for pages without a kernel (the
HTML book picks it, see ``nb_mime_priority_overrides`` in ``_config.yml``): the
results for every setting of a small grid, computed by the same render function
when the notebook runs, and a few lines of inline JavaScript that show the one
the reader selects. The fallback is deterministic (no ids, no dates), so nbval
can compare it.

Where the fallback's script does not run (a notebook freshly opened in
JupyterLab is not trusted, so its stored scripts and styles are dropped), the
fallback says so: its notice "Not live ..." is visible, its menus are disabled,
and its markup reads without the stylesheet (real tables, labels with spaces,
bold titles). The script hides the notice and enables the menus.

Markup, for tests and styling: ``div.dyconv-explorer[data-explorer=...]`` holds
``p.dyconv-notice``, ``select[data-param=NAME]`` controls and
``[data-role=ROLE]`` result regions. The fragment builders below (:func:`table`,
:func:`error`, ...) are what render functions return.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import itertools
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from . import _book_extra_error

try:
    import ipywidgets
    import matplotlib
except ImportError as missing:
    raise _book_extra_error(__name__, missing) from missing

__all__ = [
    "Fragments",
    "Control",
    "Explorer",
    "NOT_LIVE",
    "table",
    "caption",
    "error",
    "formula",
    "note",
    "ok",
    "svg_image",
]

#: An explorer's rendered view, HTML fragments by the name of the slot each fills.
Fragments = Dict[str, str]

#: What a fallback whose script has not run says, above its menus.
NOT_LIVE = (
    "Not live: these menus do nothing until the page's script runs, and the results below are "
    "those stored for the default setting. Run the notebook to make this explorer live."
)

_CSS = """<style>
.dyconv-explorer{border:1px solid #d0d7de;border-radius:6px;padding:.7em 1em;margin:.6em 0;color:#1f2328;
background:#fff;line-height:1.45}
.dyconv-explorer p{margin:.3em 0}
.dyconv-explorer .dyconv-title{font-size:1.05em;margin:0 0 .4em}
.dyconv-explorer .dyconv-notice{background:#fff8c5;border-left:4px solid #d4a72c;padding:.35em .6em}
.dyconv-explorer .dyconv-controls{display:flex;flex-wrap:wrap;gap:.3em 1.2em;margin-bottom:.6em}
.dyconv-explorer label{font-family:monospace;white-space:nowrap}
.dyconv-explorer select{font-family:monospace;padding:0 .2em}
.dyconv-explorer .dyconv-caption{font-size:.9em;color:#57606a;margin:.8em 0 .2em}
.dyconv-explorer .dyconv-scroll{overflow-x:auto;padding-bottom:2px}
.dyconv-explorer .dyconv-scroll::-webkit-scrollbar{height:6px;background:#f6f8fa}
.dyconv-explorer .dyconv-scroll::-webkit-scrollbar-thumb{background:#8c959f;border-radius:3px}
@supports not selector(::-webkit-scrollbar){
.dyconv-explorer .dyconv-scroll{scrollbar-width:thin;scrollbar-color:#8c959f #f6f8fa}}
.dyconv-explorer table.dyconv-shapes{border-collapse:collapse;font-family:monospace;font-size:.9em;margin:0}
.dyconv-explorer table.dyconv-shapes td{padding:.1em .9em .1em 0;border:0;border-bottom:1px solid #eaeef2;
text-align:left;background:none;white-space:nowrap}
.dyconv-explorer .dyconv-error,.dyconv-explorer .dyconv-ok,.dyconv-explorer .dyconv-note,
.dyconv-explorer pre.dyconv-formula{font-family:monospace;font-size:.9em;padding:.35em .6em;margin:.3em 0;color:#1f2328}
.dyconv-explorer .dyconv-error{background:#fff1f0;border-left:4px solid #cf222e;overflow-wrap:anywhere}
.dyconv-explorer .dyconv-error code{background:none;color:inherit;padding:0}
.dyconv-explorer .dyconv-why{font-family:sans-serif;font-size:1.05em}
.dyconv-explorer .dyconv-ok{background:#effaf1;border-left:4px solid #1a7f37}
.dyconv-explorer .dyconv-note{background:#f6f8fa;border-left:4px solid #d0d7de;color:#57606a}
.dyconv-explorer pre.dyconv-formula{white-space:pre-wrap;background:#f6f8fa;border:0;border-left:4px solid #8c959f;
border-radius:0}
.dyconv-explorer .dyconv-nowrap{white-space:nowrap}
@media (max-width:600px){
.dyconv-explorer table.dyconv-shapes tr{display:block;border-bottom:1px solid #eaeef2;padding:.1em 0}
.dyconv-explorer table.dyconv-shapes td{display:inline-block;border:0;padding:0 .9em 0 0}
.dyconv-explorer table.dyconv-shapes td:first-child{display:block}}
.dyconv-explorer img{max-width:100%;height:auto;display:block}
</style>"""

#: The fallback's results, one JSON block, and what a stored notebook keeps of it.
#: tools/execute_notebooks.py replaces the block by STORED_DATA (the results of every
#: setting only make the file large: JupyterLab never runs a stored script, and the HTML
#: book executes the notebook afresh); tests/nbval_sanitize.cfg masks it the same way.
DATA_PATTERN = r'(<script type="application/json" class="dyconv-data">).*?(</script>)'
STORED_DATA = r'\1{"stored": "run the notebook for every setting"}\2'

# Finds its explorer through document.currentScript, so the page needs no ids. Without
# the results table (a stored notebook's fallback) it leaves the notice up.
_JS = """<script>
(function () {
  var root = document.currentScript.parentElement;
  var data = JSON.parse(root.querySelector("script.dyconv-data").textContent);
  if (!data.table) { return; }
  var selects = data.params.map(function (p) { return root.querySelector('select[data-param="' + p + '"]'); });
  function show() {
    var entry = data.table[selects.map(function (s) { return s.value; }).join(",")];
    data.roles.forEach(function (role, i) {
      root.querySelector('[data-role="' + role + '"]').innerHTML = data.fragments[entry[i]];
    });
  }
  selects.forEach(function (s) { s.disabled = false; s.addEventListener("change", show); });
  root.querySelector(".dyconv-notice").hidden = true;
  show();
})();
</script>"""


@dataclass(frozen=True)
class Control:
    """One integer control: ``grid`` are the values the static HTML offers,
    ``live`` the values of the live widget's slider.

    ``names``, when given, names each value of ``live`` (``names[i]`` for ``live[i]``): the live
    widget is then a menu of the names, and the static HTML's options show them. The values, which
    the render function receives and the static HTML's data keys hold, stay integers."""

    name: str  # keyword of the explorer's render function, and data-param
    label: str
    grid: Tuple[int, ...]
    default: int
    live: Tuple[int, ...]
    names: Optional[Tuple[str, ...]] = None

    def __post_init__(self) -> None:
        if self.default not in self.grid or not set(self.grid) <= set(self.live):
            raise ValueError(
                f"control {self.name}: default {self.default} must be in grid {self.grid}, within live {self.live}"
            )
        if self.names is not None and len(self.names) != len(self.live):
            raise ValueError(f"control {self.name}: {len(self.names)} names for {len(self.live)} values {self.live}")

    def text(self, value: int) -> str:
        """What the control shows for ``value``: its name, or the number."""
        return str(value) if self.names is None else self.names[self.live.index(value)]

    def options(self) -> List[Any]:
        """The live widget's options: the values, or (name, value) pairs."""
        return list(self.live) if self.names is None else list(zip(self.names, self.live))


class Explorer:
    """An explorer: controls, a render function, and its two displays.

    ``render(**setting)`` returns one HTML fragment per role in ``roles``, for
    every setting the live sliders reach; ``headers`` holds fixed HTML shown
    above a role's region, stored once; ``fixed`` names the settings no control
    changes (``data-fixed`` in the HTML).
    """

    def __init__(
        self,
        kind: str,
        title: str,
        controls: Sequence[Control],
        roles: Sequence[str],
        render: Callable[..., Fragments],
        headers: Optional[Mapping[str, str]] = None,
        fixed: Optional[Mapping[str, int]] = None,
    ) -> None:
        self.kind = kind
        self.title = title
        self.controls = tuple(controls)
        self.roles = tuple(roles)
        self.render = render
        self.headers = dict(headers or {})
        self.fixed = dict(fixed or {})

    def defaults(self) -> Dict[str, int]:
        """The setting shown first."""
        return {c.name: c.default for c in self.controls}

    def grid(self) -> List[Dict[str, int]]:
        """Every setting the static HTML holds a result for."""
        return self._product(c.grid for c in self.controls)

    def live_settings(self) -> List[Dict[str, int]]:
        """Every setting the live widget's sliders reach."""
        return self._product(c.live for c in self.controls)

    def _product(self, values: Iterable[Tuple[int, ...]]) -> List[Dict[str, int]]:
        names = [c.name for c in self.controls]
        return [dict(zip(names, setting)) for setting in itertools.product(*values)]

    def _title(self) -> str:
        return f'<p class="dyconv-title"><b>{_esc(self.title)}</b></p>'

    def widget(self) -> ipywidgets.VBox:
        """The live widget: each slider move re-runs ``render`` (real torch calls)."""
        sliders = {c.name: _live_control(c) for c in self.controls}
        regions = {role: ipywidgets.HTML() for role in self.roles}

        def update(_change: Optional[Mapping[str, Any]] = None) -> None:
            fragments = self.render(**{name: s.value for name, s in sliders.items()})
            for role, region in regions.items():
                region.value = _unframed(fragments[role])

        for s in sliders.values():
            s.observe(update, names="value")
        update()
        title = ipywidgets.HTML(_CSS + _unframed(self._title()))
        controls = ipywidgets.HBox(list(sliders.values()), layout={"flex_flow": "row wrap"})
        parts: List[ipywidgets.Widget] = [title, controls]
        for role, region in regions.items():
            if role in self.headers:
                parts.append(ipywidgets.HTML(_unframed(self.headers[role])))
            parts.append(region)
        return ipywidgets.VBox(parts)

    def to_html(self) -> str:
        """The static fallback: title, notice, controls, the default result, every grid result, the script."""
        fragments: List[str] = []
        index: Dict[str, int] = {}
        table_: Dict[str, List[int]] = {}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the grid's convolutions are tiny: threads only add overhead
        try:
            rendered_grid = [(setting, self.render(**setting)) for setting in self.grid()]
        finally:
            torch.set_num_threads(threads)
        defaults = self.defaults()
        shown: Fragments = {}
        for setting, rendered in rendered_grid:
            entry = []
            for role in self.roles:
                if rendered[role] not in index:  # store each distinct fragment once
                    index[rendered[role]] = len(fragments)
                    fragments.append(rendered[role])
                entry.append(index[rendered[role]])
            table_[",".join(str(v) for v in setting.values())] = entry
            if setting == defaults:  # the grid holds the default setting (Control checks it)
                shown = rendered
        data = {
            "params": [c.name for c in self.controls],
            "roles": list(self.roles),
            "fragments": fragments,
            "table": table_,
        }
        payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
        # Spaces around each label, so the controls read apart without the stylesheet.
        selects = " ".join(
            f'<label>{_esc(c.label)} = <select data-param="{c.name}" disabled>'
            + "".join(f'<option value="{v}"{" selected" if v == c.default else ""}>{_esc(c.text(v))}</option>'
                      for v in c.grid)
            + "</select></label>"
            for c in self.controls
        )
        regions = "".join(
            f'{self.headers.get(role, "")}<div data-role="{role}">{shown[role]}</div>' for role in self.roles
        )
        fixed = html.escape(json.dumps(self.fixed))
        return (
            f'<div class="dyconv-explorer" data-explorer="{self.kind}" data-fixed="{fixed}">{_CSS}{self._title()}'
            f'<p class="dyconv-notice">{_esc(NOT_LIVE)}</p>'
            f'<p class="dyconv-controls">{selects}</p>{regions}'
            f'<script type="application/json" class="dyconv-data">{payload}</script>{_JS}</div>'
        )

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> Dict[str, Any]:
        bundle = self.widget()._repr_mimebundle_(include=include, exclude=exclude)
        bundle["text/plain"] = f"{self.title} (run the notebook in Jupyter for the live widget)"
        bundle["text/html"] = self.to_html()
        return bundle


def _live_control(c: Control) -> ipywidgets.ValueWidget:
    """A control's live widget: a slider over its values, or a menu of its names."""
    # One description width and one length for every control, whatever its label.
    look: Dict[str, Any] = {"description": c.label, "style": {"description_width": "5em"},
                            "layout": {"width": "21em"}}
    if c.names is not None:
        return ipywidgets.Dropdown(options=c.options(), value=c.default, **look)
    return ipywidgets.SelectionSlider(options=c.options(), value=c.default, continuous_update=False, **look)


def _unframed(fragment: str) -> str:
    """A fragment inside the explorer's CSS scope, without its frame (for one live HTML widget)."""
    return f'<div class="dyconv-explorer" style="border:0;padding:0;margin:0">{fragment}</div>'


def _esc(text: str) -> str:
    """Escape text for an HTML element's content (quotes need no escaping there)."""
    return html.escape(text, quote=False)


def _prose(text: str) -> str:
    """Escaped text in which no shape such as ``[2, 6, 4, 3, 3]`` breaks across lines."""
    return re.sub(r"\[[^\[\]]*\]", lambda m: f'<span class="dyconv-nowrap">{m.group()}</span>', _esc(text))


# -- fragments that render functions return ------------------------------------------------------


def table(rows: Iterable[Tuple[str, str, str]]) -> str:
    """Rows of (what, symbolic shape, shape). No cell wraps: on a narrow screen each row puts
    ``what`` above its two shapes, and the table scrolls if that is still too wide."""
    body = "".join(f"<tr><td>{_esc(a)}</td><td>{_esc(b)}</td><td>{_esc(c)}</td></tr>" for a, b, c in rows)
    return f'<div class="dyconv-scroll"><table class="dyconv-shapes">{body}</table></div>'


def caption(text: str) -> str:
    """``text`` as the bold caption above a table or figure."""
    return f'<p class="dyconv-caption"><b>{_esc(text)}</b></p>'


def error(where: str, exc: str, message: str, why: str) -> str:
    """Torch's error ``message`` (type ``exc``) from ``where``, and the sentence ``why`` that explains it."""
    return (
        f'<div class="dyconv-error"><p><b>{_esc(where)} raised {_esc(exc)}:</b><br><code>{_prose(message)}</code></p>'
        f'<p class="dyconv-why"><b>What it means:</b> {_prose(why)}</p></div>'
    )


def formula(*lines: str) -> str:
    """Lines of arithmetic in monospace, one per line (a narrow screen wraps them between shapes)."""
    return f'<pre class="dyconv-formula">{_prose(chr(10).join(lines))}</pre>'


def note(text: str) -> str:
    """``text`` as a boxed note (no shape in it breaks across lines)."""
    return f'<div class="dyconv-note"><p>{_prose(text)}</p></div>'


def ok(*lines: str) -> str:
    """Lines of a result that worked, one per line."""
    return f'<div class="dyconv-ok"><p>{"<br>".join(_prose(line) for line in lines)}</p></div>'


#: The smallest text of an explorer's diagram is never shown under this size (CSS px): where
#: the page is too narrow for that, the diagram keeps this size and scrolls sideways.
MIN_TEXT_PX = 8
_SVG_WIDTH = re.compile(r'viewBox="0 0 ([0-9.]+) ')
_SVG_FONT_SIZE = re.compile(r"font-size: ([0-9.]+)px")


@functools.lru_cache(maxsize=None)
def svg_image(draw: Callable[..., Any], *args: int) -> str:
    """``draw(*args)`` as an ``<img>`` holding byte-identical SVG on every run, in a box that
    scrolls sideways where the page is too narrow to show its smallest text at ``MIN_TEXT_PX``."""
    fig = draw(*args)
    buffer = io.StringIO()
    # A fixed hash salt makes the SVG's internal ids stable; no date in the metadata. No
    # background, so the box's scroll shadows show through.
    with matplotlib.rc_context({"svg.hashsalt": "dyconv-book", "svg.fonttype": "none"}):
        fig.savefig(buffer, format="svg", bbox_inches="tight", facecolor="none", metadata={"Date": None})
    svg = buffer.getvalue()
    # Text drawn at font size f in a viewBox w wide is f * shown_width / w px high.
    width = float(_SVG_WIDTH.search(svg).group(1))  # type: ignore[union-attr]
    smallest = min(float(size) for size in _SVG_FONT_SIZE.findall(svg))
    min_width = math.ceil(MIN_TEXT_PX * width / smallest)
    encoded = base64.b64encode(svg.encode()).decode()
    alt = f"{draw.__name__}{args}"
    return (f'<div class="dyconv-scroll"><img alt="{html.escape(alt)}" style="min-width:{min_width}px" '
            f'src="data:image/svg+xml;base64,{encoded}"></div>')
