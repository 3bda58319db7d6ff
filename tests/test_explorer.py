"""dyconv_teach.teaching.explorer: the live widget and the static HTML fallback, on a small explorer."""

from __future__ import annotations

import base64
import configparser
import html
import json
import re
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import ipywidgets
import pytest

from dyconv_teach.teaching import explorer
from dyconv_teach.teaching.explorer import (
    DATA_PATTERN,
    NOT_LIVE,
    STORED_DATA,
    Control,
    Explorer,
    caption,
    error,
    formula,
    ok,
    table,
)
from dyconv_teach.teaching.plots import draw_batch_as_groups, draw_group_wiring
from dyconv_teach.teaching.widgets import grouped_conv_explorer


def render(a: int, b: int) -> Dict[str, str]:
    """A toy render function: a shape table, and an error when b divides a."""
    rows = table([("x", "[a, b]", f"[{a}, {b}]")])
    result = error("f", "RuntimeError", f"{a} % {b} == 0", "b divides a.") if a % b == 0 else ok(f"sum {a + b}")
    return {"shapes": rows, "result": result}


def toy() -> Explorer:
    controls = [Control("a", "a", (1, 2), 2, (1, 2, 3)), Control("b", "b long label", (2, 3), 3, (1, 2, 3, 4))]
    return Explorer("toy", "A toy explorer <a, b>", controls, ("shapes", "result"), render,
                    {"result": caption("Result")}, fixed={"c": 7})


def data_block(fallback: str) -> str:
    """The text of the fallback's data block (the results of every setting, as JSON)."""
    match = re.search(r'<script type="application/json" class="dyconv-data">(.*?)</script>', fallback, re.S)
    assert match, "the fallback holds no data block"
    return match.group(1)


def data_of(fallback: str) -> Dict:
    return json.loads(data_block(fallback))


def test_bundle_has_widget_view_html_and_text() -> None:
    bundle = toy()._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"]
    assert bundle["text/html"].startswith('<div class="dyconv-explorer" data-explorer="toy" data-fixed="{&quot;c')
    assert bundle["text/plain"] == "A toy explorer <a, b> (run the notebook in Jupyter for the live widget)"


def test_fallback_stores_every_grid_setting_once() -> None:
    ex = toy()
    data = data_of(ex.to_html())
    assert data["params"] == ["a", "b"] and data["roles"] == ["shapes", "result"]
    assert sorted(data["table"]) == ["1,2", "1,3", "2,2", "2,3"]
    for setting in ex.grid():
        entry = data["table"][f"{setting['a']},{setting['b']}"]
        assert [data["fragments"][i] for i in entry] == [render(**setting)[r] for r in ex.roles]


def test_fallback_reads_without_script_or_stylesheet() -> None:
    text = toy().to_html()
    # The notice is visible until the script hides it; the menus are disabled until it enables them.
    assert f'<p class="dyconv-notice">{html.escape(NOT_LIVE, quote=False)}</p>' in text
    assert "Run the notebook to make this explorer live." in NOT_LIVE
    assert text.count("<select") == text.count(" disabled>") == 2
    assert 'root.querySelector(".dyconv-notice").hidden = true' in text and "s.disabled = false" in text
    # Bold title, labels with spaces around them, captions and shapes in real markup.
    assert '<p class="dyconv-title"><b>A toy explorer &lt;a, b&gt;</b></p>' in text
    assert '</select></label> <label>b long label = <select data-param="b" disabled>' in text
    assert '<p class="dyconv-caption"><b>Result</b></p>' in text
    assert '<table class="dyconv-shapes"><tr><td>x</td><td>[a, b]</td><td>[2, 3]</td></tr></table>' in text
    # The default setting is shown before any script runs.
    assert f'<div data-role="result">{render(2, 3)["result"]}</div>' in text
    options = re.search(r'<select data-param="a" disabled>(.*?)</select>', text).group(1)
    assert options == '<option value="1">1</option><option value="2" selected>2</option>'


def test_fallback_is_deterministic_and_offline() -> None:
    text = toy().to_html()
    assert toy().to_html() == text
    assert re.search(r"<script[^>]*\ssrc\s*=", text) is None and "<link" not in text and "http" not in text
    assert "</" not in data_block(text)


def test_error_fragment_holds_message_and_sentence() -> None:
    fragment = error("F.conv2d", "RuntimeError", "expected <3> channels", "Axis 1 of [O, C, k, k] holds C = 4.")
    # A shape never breaks across lines, in the message or in the sentence.
    assert fragment == (
        '<div class="dyconv-error"><p><b>F.conv2d raised RuntimeError:</b><br><code>expected &lt;3&gt; channels'
        '</code></p><p class="dyconv-why"><b>What it means:</b> Axis 1 of <span class="dyconv-nowrap">[O, C, k, k]'
        '</span> holds C = 4.</p></div>'
    )
    assert ok("a [2, 3]", "b") == (
        '<div class="dyconv-ok"><p>a <span class="dyconv-nowrap">[2, 3]</span><br>b</p></div>'
    )
    expected = '<pre class="dyconv-formula"><span class="dyconv-nowrap">[1]</span> &lt; 1\nb</pre>'
    assert formula("[1] < 1", "b") == expected


def test_live_widget_reruns_on_slider_moves() -> None:
    box = toy().widget()
    assert isinstance(box, ipywidgets.VBox)
    title, controls = box.children[:2]
    assert '<p class="dyconv-title"><b>A toy explorer &lt;a, b&gt;</b></p>' in title.value
    sliders = {s.description: s for s in controls.children}
    # Every slider has the same description width and length, whatever its label.
    assert {s.style.description_width for s in sliders.values()} == {"5em"}
    assert {s.layout.width for s in sliders.values()} == {"21em"}
    assert list(sliders["b long label"].options) == [1, 2, 3, 4]
    regions = [w for w in box.children[2:] if isinstance(w, ipywidgets.HTML)]
    before = [r.value for r in regions]
    sliders["b long label"].value = 4  # a live value outside the static grid
    after = [r.value for r in regions]
    assert before != after and "[2, 4]" in after[0] and "b divides a." not in " ".join(after)
    sliders["a"].value = 3
    assert "b divides a." not in " ".join(r.value for r in regions)
    sliders["b long label"].value = 1
    assert "b divides a." in " ".join(r.value for r in regions)


def test_live_settings_cover_every_slider_value() -> None:
    settings = toy().live_settings()
    assert len(settings) == 12 and {"a": 3, "b": 4} in settings


def test_svg_images_are_byte_identical_across_renders() -> None:
    first = explorer.svg_image(draw_group_wiring, 4, 6, 2)
    explorer.svg_image.cache_clear()
    assert explorer.svg_image(draw_group_wiring, 4, 6, 2) == first
    assert first.startswith('<div class="dyconv-scroll"><img alt="draw_group_wiring(4, 6, 2)" ')


@pytest.mark.parametrize("draw, args", [(draw_group_wiring, (8, 8, 1)), (draw_group_wiring, (2, 2, 1)),
                                        (draw_batch_as_groups, (1, 4, 6, 1)), (draw_batch_as_groups, (8, 4, 6, 2))])
def test_svg_images_never_show_text_under_min_text_px(draw: Callable[..., Any], args: Tuple[int, ...]) -> None:
    image = explorer.svg_image(draw, *args)
    match = re.search(r'<img [^>]*style="min-width:(\d+)px" src="data:image/svg\+xml;base64,([^"]+)"', image)
    assert match is not None, image[:200]
    svg = base64.b64decode(match.group(2)).decode()
    width = float(re.search(r'viewBox="0 0 ([0-9.]+) ', svg).group(1))  # type: ignore[union-attr]
    smallest = min(float(size) for size in re.findall(r"font-size: ([0-9.]+)px", svg))
    # At its narrowest the image is min-width px wide, its text font-size * min-width / width px high.
    assert smallest * int(match.group(1)) / width >= explorer.MIN_TEXT_PX
    assert smallest * (int(match.group(1)) - 1) / width < explorer.MIN_TEXT_PX  # and no wider than that needs


def test_control_default_must_be_on_the_grid() -> None:
    with pytest.raises(ValueError, match="default 5 must be in grid"):
        Control("k", "k", (1, 3), 5, (1, 3, 5))
    with pytest.raises(ValueError, match="within live"):
        Control("k", "k", (1, 3), 3, (1, 2))


def test_stored_notebooks_keep_the_default_view_and_nbval_masks_the_results() -> None:
    """tools/execute_notebooks.py replaces the results of every setting by STORED_DATA; the
    notebook still shows the default result and the notice, and nbval's sanitizer
    (tests/nbval_sanitize.cfg) masks a fresh run's results the same way, so they compare equal."""
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(Path(__file__).with_name("nbval_sanitize.cfg"))
    assert cfg["explorer results"]["regex"] == DATA_PATTERN
    assert cfg["explorer results"]["replace"] == STORED_DATA
    grouped = grouped_conv_explorer()
    fresh = grouped.to_html()
    stored = re.sub(DATA_PATTERN, STORED_DATA, fresh)
    assert len(stored) < len(fresh) / 5 and '"table"' not in stored
    assert "Not live" in stored and grouped.render(**grouped.defaults())["shapes"] in stored
    assert re.sub(DATA_PATTERN, STORED_DATA, stored) == stored  # masking a stored output changes nothing


def test_named_control_shows_its_names_and_keeps_integer_values() -> None:
    named = Control("v", "variant", (0, 1), 0, (0, 1, 2), ("alpha", "beta", "gamma"))
    assert [named.text(v) for v in named.live] == ["alpha", "beta", "gamma"] and named.text(1) == "beta"
    ex = Explorer("named", "Named", [named], ("shapes",), lambda v: {"shapes": table([("v", "[v]", str(v))])})
    text = ex.to_html()
    assert '<option value="0" selected>alpha</option><option value="1">beta</option></select>' in text
    assert sorted(data_of(text)["table"]) == ["0", "1"]
    menu = ex.widget().children[1].children[0]
    assert isinstance(menu, ipywidgets.Dropdown) and menu.label == "alpha" and menu.value == 0
    with pytest.raises(ValueError, match="2 names for 3 values"):
        Control("v", "v", (0,), 0, (0, 1, 2), ("a", "b"))


def test_unnamed_controls_keep_their_numbers() -> None:
    text = toy().to_html()
    assert '<option value="1">1</option><option value="2" selected>2</option>' in text
    assert isinstance(toy().widget().children[1].children[0], ipywidgets.SelectionSlider)
