"""The *built* HTML book in a real browser, offline: explorers and outputs.

Serves ``_build/html`` on 127.0.0.1 and opens it in headless Chromium
(Playwright). On each widget page it moves every control through its values and
checks the shapes and messages shown against :mod:`dyconv_teach.teaching.shapes`. On
every notebook page of ``_toc.yml``, at a desktop's and a phone's width, it checks
that no output is cut off. Build the book first (see the README); set
``DYCONV_HTML_DIR`` to test another build. Where Chromium cannot start the tests skip, except in CI (the
``CI`` environment variable is set), where they fail.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple
from urllib.parse import urlparse

import pytest
from book_pages import BUILD_COMMAND, notebook_pages

from dyconv_teach.teaching.explorer import Explorer
from dyconv_teach.teaching.shapes import (
    Shape,
    batch_kernel_shapes,
    grouped_conv_shapes,
    output_size_formula,
    static_conv_shapes,
)
from dyconv_teach.teaching.widgets import batch_kernel_explorer, grouped_conv_explorer, static_conv_explorer

ROOT = Path(__file__).resolve().parents[1]
HTML_DIR = Path(os.environ.get("DYCONV_HTML_DIR", ROOT / "_build" / "html"))
# Every notebook page, in reading order: the chapters and "Using the layer" (the markdown pages
# hold no code cells or outputs to check).
CHAPTER_PAGES = [page.html for page in notebook_pages()]


def fmt(shape: Shape) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    if not (HTML_DIR / "index.html").is_file():
        pytest.fail(f"no built book in {HTML_DIR}: run `{BUILD_COMMAND}` in the repository root first")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(HTML_DIR)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def open_explorer(browser: Any, base_url: str, page_path: str, kind: str) -> Tuple[Any, Any]:
    """Load a page, check it fetched nothing off 127.0.0.1 and raised no JS error;
    return the page and its explorer."""
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    requests: List[str] = []
    errors: List[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{base_url}/{page_path}", wait_until="networkidle")
    remote = [u for u in requests if urlparse(u).scheme not in ("data", "blob") and urlparse(u).hostname != "127.0.0.1"]
    assert remote == [], f"{page_path} requested off-host URLs (CDN?): {remote}"
    assert errors == [], f"{page_path} raised JavaScript errors: {errors}"
    explorer = page.locator(f'div.dyconv-explorer[data-explorer="{kind}"]')
    assert explorer.count() == 1, f"{page_path} should hold one {kind} explorer, found {explorer.count()}"
    return page, explorer


def settings_to_try(explorer: Explorer) -> Iterator[Dict[str, int]]:
    """Move each control through its values, the others at their defaults."""
    for control in explorer.controls:
        for value in control.grid:
            yield {**explorer.defaults(), control.name: value}


def select(explorer_el: Any, setting: Dict[str, int]) -> None:
    for name, value in setting.items():
        explorer_el.locator(f'select[data-param="{name}"]').select_option(str(value))


def role_text(explorer_el: Any, role: str) -> str:
    return explorer_el.locator(f'[data-role="{role}"]').inner_text()


def test_static_explorer(browser: Any, base_url: str) -> None:
    page, el = open_explorer(browser, base_url, "book/02_static_convolution.html", "static")
    explorer = static_conv_explorer()
    # Every control, then two settings where the dilated kernel outgrows the input.
    extra = [{**explorer.defaults(), "k": k, "dilation": 2, "H": 5} for k in (5, 7)]
    shown_before = role_text(el, "shapes")
    for setting in [*settings_to_try(explorer), *extra]:
        select(el, setting)
        s = setting
        r = static_conv_shapes(s["C"], s["O"], s["k"], s["stride"], s["padding"], s["dilation"], s["H"])
        shapes = role_text(el, "shapes")
        assert fmt(r.input) in shapes and fmt(r.weight) in shapes, (setting, shapes)
        if r.error is None:
            assert fmt(r.output) in shapes and "RuntimeError" not in shapes, (setting, shapes)
        else:
            assert r.error in shapes, (setting, shapes)
        assert output_size_formula(s["H"], s["k"], s["stride"], s["padding"], s["dilation"]) in role_text(el, "formula")
    assert role_text(el, "shapes") != shown_before, "the shapes shown never changed"
    el.screenshot(path="/tmp/dyconv-browser-static.png")
    page.close()


def test_grouped_explorer(browser: Any, base_url: str) -> None:
    page, el = open_explorer(browser, base_url, "book/03_grouped_convolution.html", "grouped")
    explorer = grouped_conv_explorer()
    for setting in [*settings_to_try(explorer), {"C": 8, "O": 8, "g": 4}, {"C": 6, "O": 6, "g": 3}]:
        select(el, setting)
        r = grouped_conv_shapes(setting["C"], setting["O"], setting["g"])
        shapes, split = role_text(el, "shapes"), role_text(el, "split")
        assert fmt(r.input) in shapes, (setting, shapes)
        diagram = el.locator('[data-role="diagram"] img')
        if r.error is None:
            assert fmt(r.output) in shapes and str(r.params) in split and str(r.params_dense) in split, (setting, split)
            assert split.count("group ") == setting["g"], (setting, split)
            assert diagram.get_attribute("alt") == f"draw_group_wiring({setting['C']}, {setting['O']}, {setting['g']})"
            assert diagram.evaluate("img => img.naturalWidth") > 0, "the wiring diagram did not load"
        else:
            assert r.error in shapes, (setting, shapes)
            assert diagram.count() == 0
    select(el, explorer.defaults())
    el.screenshot(path="/tmp/dyconv-browser-grouped.png")
    page.close()


def test_batch_kernel_explorer(browser: Any, base_url: str) -> None:
    page, el = open_explorer(browser, base_url, "book/05_batch_as_groups.html", "batch_kernel")
    fixed = json.loads(el.get_attribute("data-fixed"))  # the C, O, k, H the chapter chose
    explorer = batch_kernel_explorer(**fixed)
    seen_blog_error = False
    for setting in settings_to_try(explorer):
        select(el, setting)
        r = batch_kernel_shapes(setting["B"], setting["K"], g=setting["g"], **fixed)
        shapes = role_text(el, "shapes")
        for shape in (r.x, r.attention, r.bank):
            assert fmt(shape) in shapes, (setting, shapes)
        mix = role_text(el, "mix")
        for shape in (r.flat_bank, r.mixed, r.aggregated):
            assert fmt(shape) in mix, (setting, mix)
        assert r.naive_error in role_text(el, "naive-error")
        blog = role_text(el, "blog")
        assert fmt(r.blog_call.weight) in blog, (setting, blog)
        if setting["B"] == 1:
            assert r.blog_error is None and f"works for B=1: output {fmt(r.blog_output)}" in blog, (setting, blog)
        else:
            assert r.blog_error is not None and r.blog_error in blog, (setting, blog)
            seen_blog_error = True
        trick = role_text(el, "trick")
        for shape in (r.trick_call.input, r.trick_call.weight, r.trick_call.output, r.trick_output):
            assert fmt(shape) in trick, (setting, trick)
        assert "torch.allclose(trick, per-sample loop): True" in trick, (setting, trick)
        alt = el.locator('[data-role="diagram"] img').get_attribute("alt")
        assert alt.startswith(f"draw_batch_as_groups({setting['B']}, "), (setting, alt)
    assert seen_blog_error
    select(el, explorer.defaults())
    el.screenshot(path="/tmp/dyconv-browser-batch_kernel.png")
    page.close()


# An output line that reports an exception, such as "RuntimeError: expected stride to be ...".
ERROR_LINE = re.compile(r"\b\w+(Error|Exception): ")
OUTPUT_BOXES_JS = """() => Array.from(document.querySelectorAll("div.cell_output pre")).map(el => {
  const style = getComputedStyle(el);
  return {text: el.textContent, scrollWidth: el.scrollWidth, clientWidth: el.clientWidth,
          overflowX: style.overflowX,
          scrollbar: el.offsetHeight - el.clientHeight
                     - parseFloat(style.borderTopWidth) - parseFloat(style.borderBottomWidth)};
})"""


@pytest.mark.parametrize("width", [1280, 390])
def test_outputs_are_not_cut_off(browser: Any, base_url: str, width: int) -> None:
    """At a desktop's and at a phone's width, on every chapter with every solution unfolded:
    an error output wraps inside its box, an output wider than its box scrolls with a
    visible scrollbar, and the page itself does not scroll sideways.

    The pages are opened as on a phone (``is_mobile``), where Chromium draws overlay
    scrollbars, which take no room and show only while one scrolls (macOS does the same).
    A scrollbar that takes room is one the book's CSS makes always visible.
    """
    problems: List[str] = []
    errors_seen = 0
    for path in CHAPTER_PAGES:
        page = browser.new_page(viewport={"width": width, "height": 900}, is_mobile=True, has_touch=True)
        page.goto(f"{base_url}/{path}", wait_until="networkidle")
        page.evaluate("document.querySelectorAll('.admonition.toggle-hidden > .admonition-title')"
                      ".forEach(title => title.click())")
        assert page.locator(".toggle-hidden").count() == 0, f"{path}: a solution stayed folded"
        boxes = page.evaluate(OUTPUT_BOXES_JS)
        assert boxes, f"{path}: no output boxes found"
        for box in boxes:
            where = f"{path} at {width} px, output {box['text'].strip()[:50]!r}"
            overflows = box["scrollWidth"] > box["clientWidth"]
            if ERROR_LINE.search(box["text"]):
                errors_seen += 1
                if overflows:
                    widths = f"{box['scrollWidth']} > {box['clientWidth']} px"
                    problems.append(f"{where}: error wider than its box ({widths})")
            elif overflows and not (box["overflowX"] in ("auto", "scroll") and box["scrollbar"] > 0):
                problems.append(f"{where}: scrolls with no visible scrollbar")
        page_width, view_width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        if page_width > view_width:
            problems.append(f"{path} at {width} px: the page scrolls sideways ({page_width} > {view_width} px)")
        page.close()
    assert errors_seen, "no error output found on any chapter: is ERROR_LINE still right?"
    assert not problems, "\n".join(problems)


def test_code_fits_a_desktop_page(browser: Any, base_url: str) -> None:
    """At 1280 px no code cell of the text scrolls sideways: the chapters keep their code
    within 79 columns and the book's CSS sizes code so that 79 columns fit. (A solution's
    code sits in a narrower box, inside the unfolded solution, and may scroll.)"""
    problems: List[str] = []
    for path in CHAPTER_PAGES:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{base_url}/{path}", wait_until="networkidle")
        boxes = page.evaluate("""() => Array.from(document.querySelectorAll("div.cell_input pre"))
            .filter(el => !el.closest(".admonition"))
            .map(el => [el.textContent, el.scrollWidth, el.clientWidth])""")
        assert boxes, f"{path}: no code cells found"
        problems += [f"{path}: {text.strip().splitlines()[0][:50]!r} is {wide} px in a {box} px box"
                     for text, wide, box in boxes if wide > box]
        page.close()
    assert not problems, "\n".join(problems)

