"""dyconv_teach.widgets: the live widget, and the static HTML fallback of each explorer."""

from __future__ import annotations

import html
import itertools
import json
import re
from typing import Any, Callable, Dict

import ipywidgets
import pytest

from dyconv_teach import widgets
from dyconv_teach.shapes import batch_kernel_shapes, grouped_conv_shapes, static_conv_shapes
from dyconv_teach.widgets import Control, Explorer, batch_kernel_explorer, grouped_conv_explorer, static_conv_explorer

EXPLORERS: Dict[str, Callable[[], Explorer]] = {
    "static": static_conv_explorer,
    "grouped": grouped_conv_explorer,
    "batch_kernel": batch_kernel_explorer,
}


@pytest.fixture(scope="module", params=sorted(EXPLORERS))
def rendered(request: Any) -> Dict[str, Any]:
    """An explorer, its mime bundle and the data its fallback stores."""
    explorer = EXPLORERS[request.param]()
    bundle = explorer._repr_mimebundle_()
    text = bundle["text/html"]
    match = re.search(r'<script type="application/json" class="dyconv-data">(.*?)</script>', text, re.S)
    assert match, "the fallback holds no data block"
    return {"kind": request.param, "explorer": explorer, "bundle": bundle, "html": text, "payload": match.group(1),
            "data": json.loads(match.group(1))}


def test_bundle_has_widget_view_and_html(rendered: Dict[str, Any]) -> None:
    bundle = rendered["bundle"]
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"]
    assert bundle["text/html"].startswith(f'<div class="dyconv-explorer" data-explorer="{rendered["kind"]}"')
    assert "Jupyter" in bundle["text/plain"] and "0x" not in bundle["text/plain"]


def test_fallback_has_one_entry_per_grid_setting(rendered: Dict[str, Any]) -> None:
    explorer, data = rendered["explorer"], rendered["data"]
    expected = {",".join(map(str, values)) for values in itertools.product(*(c.grid for c in explorer.controls))}
    assert set(data["table"]) == expected and len(data["table"]) == len(explorer.grid())
    assert data["params"] == [c.name for c in explorer.controls] and data["roles"] == list(explorer.roles)
    for entry in data["table"].values():
        assert len(entry) == len(explorer.roles) and all(0 <= i < len(data["fragments"]) for i in entry)
    # Each stored setting shows exactly what render() gives for it.
    for setting in explorer.grid()[:: max(1, len(explorer.grid()) // 25)]:
        entry = data["table"][",".join(map(str, setting.values()))]
        assert [data["fragments"][i] for i in entry] == [explorer.render(**setting)[r] for r in explorer.roles]


def test_fallback_markup(rendered: Dict[str, Any]) -> None:
    explorer, text = rendered["explorer"], rendered["html"]
    for control in explorer.controls:
        options = re.search(rf'<select data-param="{control.name}">(.*?)</select>', text).group(1)
        assert re.findall(r'<option value="(\d+)"', options) == [str(v) for v in control.grid]
        assert f'<option value="{control.default}" selected>' in options
    # The regions first show the default setting, so a reader without JavaScript sees a result.
    shown = explorer.render(**explorer.defaults())
    for role in explorer.roles:
        assert f'<div data-role="{role}">{shown[role]}</div>' in text


def test_fallback_is_deterministic_and_offline(rendered: Dict[str, Any]) -> None:
    text = rendered["html"]
    assert EXPLORERS[rendered["kind"]]().to_html() == text
    assert re.search(r"<script[^>]*\ssrc\s*=", text) is None, "no external scripts"
    assert "<link" not in text and "http" not in text.replace("base64,", " ").split("data:image")[0]
    assert "</" not in rendered["payload"], "the data must not be able to close its <script>"
    assert len(text.encode()) < 1_000_000, f"fallback is {len(text.encode())} bytes"


def shown_text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", fragment))


def test_static_fallback_shows_torch_results() -> None:
    explorer = static_conv_explorer()
    ok = {"C": 8, "O": 4, "k": 5, "stride": 2, "padding": 1, "dilation": 2, "H": 28}
    bad = {**ok, "k": 7, "stride": 1, "padding": 0, "H": 5}
    for setting in (ok, bad):
        r = static_conv_shapes(**setting)
        text = shown_text(explorer.render(**setting)["shapes"])
        assert (r.error or str(list(r.output))) in text
        assert r.formula in shown_text(explorer.render(**setting)["formula"])
    assert "Kernel size can't be greater than actual input size" in shown_text(explorer.render(**bad)["shapes"])


def test_grouped_fallback_shows_torch_results() -> None:
    explorer = grouped_conv_explorer()
    good, bad = explorer.render(C=8, O=4, g=4), explorer.render(C=6, O=4, g=4)
    assert "[4, 2, 3, 3]" in shown_text(good["shapes"]) and "= 72, vs 288 with g=1" in shown_text(good["split"])
    assert good["diagram"].startswith('<img alt="draw_group_wiring(8, 4, 4)" src="data:image/svg+xml;base64,')
    assert grouped_conv_shapes(6, 4, 4).error in shown_text(bad["shapes"]) and "<img" not in bad["diagram"]


@pytest.mark.parametrize("B", [1, 3])
def test_batch_kernel_fallback_shows_torch_results(B: int) -> None:
    fragments = batch_kernel_explorer().render(B=B, K=2, g=1)
    r = batch_kernel_shapes(B, 2)
    assert r.naive_error in shown_text(fragments["naive-error"])
    assert (f"works for B=1" if B == 1 else r.seed_error) in shown_text(fragments["seed"])
    assert "torch.allclose(trick, per-sample loop): True" in shown_text(fragments["trick"])


def test_svg_diagrams_are_byte_identical_across_renders() -> None:
    first = widgets._svg_image(widgets.draw_group_wiring, 4, 6, 2)
    widgets._svg_image.cache_clear()
    assert widgets._svg_image(widgets.draw_group_wiring, 4, 6, 2) == first


def test_live_widget_reruns_on_slider_moves() -> None:
    explorer = grouped_conv_explorer()
    box = explorer.widget()
    assert isinstance(box, ipywidgets.VBox)
    sliders = {s.description: s for s in box.children[1].children}
    regions = [w for w in box.children[2:] if isinstance(w, ipywidgets.HTML)]
    sliders["C"].value, sliders["O"].value, sliders["g"].value = 8, 8, 8  # g=8 lies outside the static grid
    text = " ".join(shown_text(w.value) for w in regions)
    assert "[8, 1, 3, 3]" in text and "draw_group_wiring(8, 8, 8)" in " ".join(w.value for w in regions)
    sliders["g"].value = 3
    assert grouped_conv_shapes(8, 8, 3).error in " ".join(shown_text(w.value) for w in regions)


def test_control_default_must_be_on_the_grid() -> None:
    with pytest.raises(ValueError, match="default 5 must be in grid"):
        Control("k", "k", (1, 3), 5, (1, 3, 5))
