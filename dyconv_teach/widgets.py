"""The book's three explorers: live ipywidgets in Jupyter, static HTML in the book.

Each explorer function returns an :class:`Explorer`. Displayed in Jupyter it is
a live widget: every move of a slider runs the real torch calls of
:mod:`dyconv_teach.shapes` again. Its mime bundle also carries a ``text/html``
fallback for pages without a kernel (the HTML book picks it, see
``nb_mime_priority_overrides`` in ``_config.yml``): the results for every
setting of a small grid, computed by the same torch calls when the notebook
runs, and a few lines of inline JavaScript that show the one the reader selects.
The fallback is deterministic (no ids, no dates), so nbval can compare it.

Markup, for tests and styling: ``div.dyconv-explorer[data-explorer=...]`` holds
``select[data-param=NAME]`` controls and ``[data-role=ROLE]`` result regions.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import itertools
import json
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import ipywidgets
import matplotlib
import torch

from .plots import draw_batch_as_groups, draw_group_wiring
from .shapes import (
    OUTPUT_SIZE_FORMULA,
    Shape,
    batch_kernel_shapes,
    grouped_conv_shapes,
    static_conv_shapes,
)

__all__ = ["Control", "Explorer", "static_conv_explorer", "grouped_conv_explorer", "batch_kernel_explorer"]

Fragments = Dict[str, str]

_CSS = """<style>
.dyconv-explorer{border:1px solid #d0d7de;border-radius:6px;padding:.7em 1em;margin:.6em 0;color:#1f2328;background:#fff}
.dyconv-explorer .dyconv-title{font-weight:700;font-size:1.05em;margin-bottom:.4em}
.dyconv-explorer .dyconv-controls{display:flex;flex-wrap:wrap;gap:.3em 1.2em;margin-bottom:.6em}
.dyconv-explorer label{font-family:monospace;white-space:nowrap}
.dyconv-explorer select{font-family:monospace;margin-left:.3em;padding:0 .2em}
.dyconv-explorer .dyconv-caption{font-weight:600;font-size:.9em;color:#57606a;margin:.7em 0 .2em}
.dyconv-explorer table.dyconv-shapes{border-collapse:collapse;font-family:monospace;font-size:.9em;margin:0}
.dyconv-explorer table.dyconv-shapes td{padding:.1em .9em .1em 0;border:0;border-bottom:1px solid #eaeef2;text-align:left;background:none}
.dyconv-explorer .dyconv-error,.dyconv-explorer .dyconv-ok,.dyconv-explorer .dyconv-note,.dyconv-explorer pre.dyconv-formula{font-family:monospace;font-size:.9em;white-space:pre-wrap;padding:.35em .6em;margin:.3em 0;border-radius:0;color:#1f2328}
.dyconv-explorer .dyconv-error{background:#fff1f0;border-left:4px solid #cf222e}
.dyconv-explorer .dyconv-ok{background:#effaf1;border-left:4px solid #1a7f37}
.dyconv-explorer .dyconv-note{background:#f6f8fa;border-left:4px solid #d0d7de;color:#57606a}
.dyconv-explorer pre.dyconv-formula{background:#f6f8fa;border:0;border-left:4px solid #8c959f}
.dyconv-explorer img{max-width:100%;height:auto;display:block}
</style>"""

# Finds its explorer through document.currentScript, so the page needs no ids.
_JS = """<script>
(function () {
  var root = document.currentScript.parentElement;
  var data = JSON.parse(root.querySelector("script.dyconv-data").textContent);
  var selects = data.params.map(function (p) { return root.querySelector('select[data-param="' + p + '"]'); });
  function show() {
    var entry = data.table[selects.map(function (s) { return s.value; }).join(",")];
    data.roles.forEach(function (role, i) {
      root.querySelector('[data-role="' + role + '"]').innerHTML = data.fragments[entry[i]];
    });
  }
  selects.forEach(function (s) { s.addEventListener("change", show); });
  show();
})();
</script>"""


@dataclass(frozen=True)
class Control:
    """One integer control: ``grid`` are the values the static HTML offers,
    ``live`` the values of the live widget's slider."""

    name: str  # keyword of the explorer's render function, and data-param
    label: str
    grid: Tuple[int, ...]
    default: int
    live: Tuple[int, ...]

    def __post_init__(self) -> None:
        if self.default not in self.grid or not set(self.grid) <= set(self.live):
            raise ValueError(
                f"control {self.name}: default {self.default} must be in grid {self.grid}, within live {self.live}"
            )


class Explorer:
    """An explorer: controls, a render function, and its two displays.

    ``render(**setting)`` returns one HTML fragment per role in ``roles``;
    ``headers`` holds fixed HTML shown above a role's region, stored once;
    ``fixed`` names the settings no control changes (``data-fixed`` in the HTML).
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
        names = [c.name for c in self.controls]
        return [dict(zip(names, values)) for values in itertools.product(*(c.grid for c in self.controls))]

    def widget(self) -> ipywidgets.VBox:
        """The live widget: each slider move re-runs ``render`` (real torch calls)."""
        sliders = {
            c.name: ipywidgets.SelectionSlider(
                options=list(c.live), value=c.default, description=c.label, continuous_update=False,
                style={"description_width": "initial"},
            )
            for c in self.controls
        }
        regions = {role: ipywidgets.HTML() for role in self.roles}

        def update(_change: Optional[Mapping[str, Any]] = None) -> None:
            fragments = self.render(**{name: s.value for name, s in sliders.items()})
            for role, region in regions.items():
                region.value = _unframed(fragments[role])

        for s in sliders.values():
            s.observe(update, names="value")
        update()
        title = ipywidgets.HTML(f'{_CSS}<div class="dyconv-title">{html.escape(self.title)}</div>')
        controls = ipywidgets.HBox(list(sliders.values()), layout={"flex_flow": "row wrap"})
        parts: List[ipywidgets.Widget] = [title, controls]
        for role, region in regions.items():
            if role in self.headers:
                parts.append(ipywidgets.HTML(_unframed(self.headers[role])))
            parts.append(region)
        return ipywidgets.VBox(parts)

    def to_html(self) -> str:
        """The static fallback: controls, the default result, every grid result, the script."""
        fragments: List[str] = []
        index: Dict[str, int] = {}
        table: Dict[str, List[int]] = {}
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
            table[",".join(str(v) for v in setting.values())] = entry
            if setting == defaults:  # the grid holds the default setting (Control checks it)
                shown = rendered
        data = {
            "params": [c.name for c in self.controls],
            "roles": list(self.roles),
            "fragments": fragments,
            "table": table,
        }
        payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
        selects = "".join(
            f'<label>{html.escape(c.label)}<select data-param="{c.name}">'
            + "".join(f'<option value="{v}"{" selected" if v == c.default else ""}>{v}</option>' for v in c.grid)
            + "</select></label>"
            for c in self.controls
        )
        regions = "".join(
            f'{self.headers.get(role, "")}<div data-role="{role}">{shown[role]}</div>' for role in self.roles
        )
        fixed = html.escape(json.dumps(self.fixed))
        return (
            f'<div class="dyconv-explorer" data-explorer="{self.kind}" data-fixed="{fixed}">{_CSS}'
            f'<div class="dyconv-title">{html.escape(self.title)}</div>'
            f'<div class="dyconv-controls">{selects}</div>{regions}'
            f'<script type="application/json" class="dyconv-data">{payload}</script>{_JS}</div>'
        )

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> Dict[str, Any]:
        bundle = self.widget()._repr_mimebundle_(include=include, exclude=exclude)
        bundle["text/plain"] = f"{self.title} (run the notebook in Jupyter for the live widget)"
        bundle["text/html"] = self.to_html()
        return bundle


# -- HTML pieces shared by the render functions --------------------------------------------------


def _unframed(fragment: str) -> str:
    """A fragment inside the explorer's CSS scope, without its frame (for one live HTML widget)."""
    return f'<div class="dyconv-explorer" style="border:0;padding:0;margin:0">{fragment}</div>'


def _esc(text: str) -> str:
    """Escape text for an HTML element's content (quotes need no escaping there)."""
    return html.escape(text, quote=False)


def _shape(shape: Optional[Shape]) -> str:
    return "-" if shape is None else "[" + ", ".join(str(n) for n in shape) + "]"


def _span(channels: range) -> str:
    """``"2..3"`` for channels 2 and 3, ``"2"`` for channel 2 alone."""
    return str(channels.start) if len(channels) == 1 else f"{channels.start}..{channels.stop - 1}"


def _table(rows: Iterable[Tuple[str, str, str]]) -> str:
    """Rows of (what, symbolic shape, shape) in a monospace table."""
    body = "".join(
        f"<tr><td>{_esc(a)}</td><td>{_esc(b)}</td><td>{_esc(c)}</td></tr>" for a, b, c in rows
    )
    return f'<table class="dyconv-shapes">{body}</table>'


def _caption(text: str) -> str:
    return f'<div class="dyconv-caption">{_esc(text)}</div>'


def _error(where: str, message: str) -> str:
    return f'<div class="dyconv-error">{_esc(where)} raised RuntimeError:\n{_esc(message)}</div>'


def _note(text: str) -> str:
    return f'<div class="dyconv-note">{_esc(text)}</div>'


def _ok(text: str) -> str:
    return f'<div class="dyconv-ok">{_esc(text)}</div>'


@functools.lru_cache(maxsize=None)
def _svg_image(draw: Callable[..., Any], *args: int) -> str:
    """``draw(*args)`` as an ``<img>`` holding byte-identical SVG on every run."""
    fig = draw(*args)
    buffer = io.StringIO()
    # A fixed hash salt makes the SVG's internal ids stable; no date in the metadata.
    with matplotlib.rc_context({"svg.hashsalt": "dyconv-book", "svg.fonttype": "none"}):
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    encoded = base64.b64encode(buffer.getvalue().encode()).decode()
    alt = f"{draw.__name__}{args}"
    return f'<img alt="{html.escape(alt)}" src="data:image/svg+xml;base64,{encoded}">'


# -- the three explorers ------------------------------------------------------------------------


def _render_static(C: int, O: int, k: int, stride: int, padding: int, dilation: int, H: int) -> Fragments:
    r = static_conv_shapes(C, O, k, stride, padding, dilation, H)
    rows = [("input x", "[B, C, H, W]", _shape(r.input)), ("weight", "[O, C, k, k]", _shape(r.weight))]
    if r.error is None:
        rows.append(("output", "[B, O, H', W']", _shape(r.output)))
        shapes = _table(rows)
    else:
        shapes = _table(rows) + _error("F.conv2d", r.error)
    formula = f'<pre class="dyconv-formula">{_esc(OUTPUT_SIZE_FORMULA)}\n{_esc(r.formula)}</pre>'
    return {"shapes": shapes, "formula": formula}


def static_conv_explorer() -> Explorer:
    """Explore ``F.conv2d``'s shapes: C, O, k, stride, padding, dilation, H (W = H, B = 1)."""
    controls = [
        Control("C", "C", (1, 3, 8), 3, tuple(range(1, 17))),
        Control("O", "O", (4, 16), 16, tuple(range(1, 33))),
        Control("k", "k", (1, 3, 5, 7), 3, tuple(range(1, 12))),
        Control("stride", "stride", (1, 2, 3), 1, tuple(range(1, 5))),
        Control("padding", "padding", (0, 1, 2, 3), 0, tuple(range(0, 6))),
        Control("dilation", "dilation", (1, 2), 1, tuple(range(1, 5))),
        Control("H", "H = W", (5, 8, 28), 8, tuple(range(1, 65))),
    ]
    headers = {
        "shapes": _caption("Shapes of one F.conv2d(x, weight, stride, padding, dilation) call, B = 1"),
        "formula": _caption("Output size, as in the nn.Conv2d docstring (W' = H')"),
    }
    return Explorer("static", "Static convolution: every shape from a real F.conv2d call", controls,
                    ("shapes", "formula"), _render_static, headers)


def _render_grouped(C: int, O: int, g: int) -> Fragments:
    r = grouped_conv_shapes(C, O, g)
    rows = [("input x", "[B, C, H, W]", _shape(r.input)), ("weight", "[O, C/g, k, k]", _shape(r.weight))]
    if r.error is not None:
        shapes = _table(rows) + _error("F.conv2d", r.error)
        note = _note(f"no split: g={g} must divide C={C} and O={O}")
        return {"shapes": shapes, "split": note, "diagram": _note("no wiring to draw")}
    rows.append(("output", "[B, O, H', W']", _shape(r.output)))
    split = "\n".join(
        f"group {j}: input channels {_span(ins)} -> output channels {_span(outs)}"
        for j, (ins, outs) in enumerate(r.split)
    )
    k = r.weight[-1]
    params = (
        f"weight parameters: O*(C/g)*k*k = {O}*{C // g}*{k}*{k} = {r.params}, "
        f"vs {r.params_dense} with g=1 (1/{g} of them)"
    )
    return {
        "shapes": _table(rows),
        "split": _ok(f"{split}\n{params}"),
        "diagram": _svg_image(draw_group_wiring, C, O, g),
    }


def grouped_conv_explorer() -> Explorer:
    """Explore grouped convolution: C, O, g (k = 3, H = W = 8, B = 1)."""
    controls = [
        Control("C", "C", (2, 4, 6, 8), 4, tuple(range(1, 17))),
        Control("O", "O", (2, 4, 6, 8), 6, tuple(range(1, 17))),
        Control("g", "g", (1, 2, 3, 4), 2, tuple(range(1, 9))),
    ]
    headers = {"shapes": _caption("F.conv2d(x, weight, groups=g)"), "split": _caption("Channel split and parameters"),
               "diagram": _caption("Wiring: a line joins an input channel to each kernel that reads it")}
    return Explorer("grouped", "Grouped convolution: weight [O, C/g, k, k]", controls,
                    ("shapes", "split", "diagram"), _render_grouped, headers)


def _render_batch_kernel(B: int, K: int, g: int, C: int, O: int, k: int, H: int) -> Fragments:
    r = batch_kernel_shapes(B, K, C, O, g, k, H)
    shapes = _table([
        ("x", "[B, C, H, W]", _shape(r.x)),
        ("pi", "[B, K]", _shape(r.attention)),
        ("weight bank", "[K, O, C/g, k, k]", _shape(r.bank)),
        ("aggregated", "[B, O, C/g, k, k]", _shape(r.aggregated)),
    ])
    naive = _error("F.conv2d", r.naive_error)
    seed_rows = [
        ("x.view(1, -1, H, W)", "[1, B*C, H, W]", _shape(r.seed_call.input)),
        ("aggregated.view(O, -1, k, k)", "[O, B*C/g, k, k]", _shape(r.seed_call.weight)),
        ("groups", "g*B", str(r.seed_call.groups)),
    ]
    if r.seed_error is None:
        seed_result = _ok(f"works for B={B}: output {_shape(r.seed_output)}")
    else:
        seed_result = _error(f"the seed's F.conv2d (B={B})", r.seed_error)
    seed = _table(seed_rows) + seed_result
    trick = _table([
        ("x.reshape(1, B*C, H, W)", "[1, B*C, H, W]", _shape(r.trick_call.input)),
        ("weight", "[B*O, C/g, k, k]", _shape(r.trick_call.weight)),
        ("groups", "B*g", str(r.trick_call.groups)),
        ("F.conv2d output", "[1, B*O, H', W']", _shape(r.trick_call.output)),
        ("viewed back", "[B, O, H', W']", _shape(r.trick_output)),
    ]) + _ok(f"torch.allclose(trick, per-sample loop): {r.matches_loop}")
    return {
        "shapes": shapes,
        "naive-error": naive,
        "seed": seed,
        "trick": trick,
        "diagram": _svg_image(draw_batch_as_groups, B, C, O, g),
    }


def batch_kernel_explorer(C: int = 4, O: int = 4, k: int = 3, H: int = 6) -> Explorer:
    """Explore batching dynamic convolution: B, K and g for fixed C, O, k, H."""
    controls = [
        Control("B", "B", (1, 2, 3, 4), 2, tuple(range(1, 9))),
        Control("K", "K", (1, 2, 3, 4), 4, tuple(range(1, 9))),
        Control("g", "g", tuple(d for d in (1, 2) if C % d == 0 and O % d == 0), 1,
                tuple(d for d in range(1, min(C, O) + 1) if C % d == 0 and O % d == 0)),
    ]

    def render(B: int, K: int, g: int) -> Fragments:
        return _render_batch_kernel(B, K, g, C, O, k, H)

    headers = {
        "shapes": _caption("The naive path: one kernel set per sample"),
        "naive-error": _caption("F.conv2d(x, aggregated, groups=g) with the 5-D weight"),
        "seed": _caption("The seed's reshape: one .view for the whole batch"),
        "trick": _caption("Batch as groups: one grouped F.conv2d call"),
        "diagram": _caption("Wiring of the trick: sample b meets only its own kernels W_b"),
    }
    return Explorer("batch_kernel", f"Dynamic convolution of a batch (C={C}, O={O}, k={k}, H=W={H})", controls,
                    ("shapes", "naive-error", "seed", "trick", "diagram"), render, headers,
                    fixed={"C": C, "O": O, "k": k, "H": H})
