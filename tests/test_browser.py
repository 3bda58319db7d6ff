"""The *built* HTML book in a real browser, offline: explorers, outputs, layout and fonts.

Serves ``_build/html`` on 127.0.0.1 and opens it in headless Chromium
(Playwright). On each widget page it moves every control through its values and
checks the shapes and messages shown against :mod:`dyconv_teach.teaching.shapes`, and
that the diagrams' text stays readable. On every page of ``_toc.yml``, at a desktop's and
a phone's width, it checks that nothing is cut off without a sign that it scrolls, that
each cell's prints show as one output, and that Chinese text is drawn with a Chinese font.
Build the book first (see the README); set ``DYCONV_HTML_DIR`` to test another build. Where
Chromium cannot start the tests skip, except in CI (the ``CI`` environment variable is set),
where they fail.
"""

from __future__ import annotations

import base64
import functools
import http.server
import io
import itertools
import json
import os
import re
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple
from urllib.parse import urlparse

import pytest
from book_pages import BUILD_COMMAND, notebook_pages, pages
from PIL import Image

from dyconv_teach.teaching.explorer import MIN_TEXT_PX, Explorer
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
# Every page, the markdown pages (API reference, glossary, references) included.
ALL_PAGES = [page.html for page in pages()]


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
ERROR_OUTPUTS_JS = """() => Array.from(document.querySelectorAll("div.cell_output pre"))
  .map(el => [el.textContent, el.scrollWidth, el.clientWidth])"""
# Every element of the page's text that scrolls sideways because its content is wider than its box
# (more than its right padding: a code block whose text fits but not its padding is not cut).
# Each is marked data-scroller=i for its screenshot.
SCROLLERS_JS = """() => Array.from(document.querySelectorAll("article *")).filter(el => {
  const style = getComputedStyle(el);
  return ["auto", "scroll"].includes(style.overflowX) && el.clientWidth > 0
         && el.scrollWidth - el.clientWidth > parseFloat(style.paddingRight);
}).map((el, i) => {
  const style = getComputedStyle(el);
  el.setAttribute("data-scroller", i);
  return {text: (el.textContent.trim() || el.innerHTML).slice(0, 50), left: el.clientLeft, top: el.clientTop,
          width: el.clientWidth, height: el.clientHeight,
          scrollbar: el.offsetHeight - el.clientHeight
                     - parseFloat(style.borderTopWidth) - parseFloat(style.borderBottomWidth)};
})"""
# Text and pictures made invisible, so a screenshot shows only the boxes' backgrounds.
BACKGROUNDS_ONLY = """body.backgrounds-only, body.backgrounds-only * {
  color: transparent !important; -webkit-text-fill-color: transparent !important; text-shadow: none !important; }
body.backgrounds-only img { visibility: hidden !important; }"""
# How much darker (0-255 grey levels) the strip at a box's cut edge must be than the strip at its other edge.
SHADOW_CONTRAST = 15


def open_unfolded(browser: Any, base_url: str, path: str, width: int) -> Any:
    """Open a page ``width`` px wide with every solution and dropdown open, as on a phone's browser
    (``is_mobile``): Chromium then draws overlay scrollbars, which take no room and show only
    while one scrolls (macOS does the same), so a scrollbar that takes room is one the book's
    CSS makes always visible."""
    page = browser.new_page(viewport={"width": width, "height": 900}, is_mobile=True, has_touch=True)
    page.goto(f"{base_url}/{path}", wait_until="networkidle")
    page.evaluate("document.querySelectorAll('.admonition.toggle-hidden > .admonition-title')"
                  ".forEach(title => title.click()); document.querySelectorAll('details').forEach(d => d.open = true)")
    assert page.locator(".toggle-hidden").count() == 0, f"{path}: a solution stayed folded"
    page.wait_for_timeout(500)  # the solutions' unfolding animation
    return page


def grey(image: Any, box: Tuple[int, int, int, int]) -> float:
    """The mean grey level of ``box`` (left, top, right, bottom) of ``image``."""
    histogram = image.crop(box).convert("L").histogram()
    return sum(level * count for level, count in enumerate(histogram)) / sum(histogram)


@pytest.mark.parametrize("width", [1280, 390])
def test_nothing_is_cut_off_unseen(browser: Any, base_url: str, width: int) -> None:
    """At a desktop's and at a phone's width, on every page with every solution unfolded: the
    page itself does not scroll sideways, an error output wraps inside its box, and every box
    whose content is wider than it (code, an output, a table, an equation, an explorer's table
    or diagram) says that it scrolls: with a scrollbar that is always shown, and with a shadow
    at its cut edge, which also shows where scrollbars are hidden (a phone's browser). The
    shadow is checked in a screenshot of the box's backgrounds at the start of its scroll range:
    the strip along its right edge is darker than the strip along its left edge.
    """
    problems: List[str] = []
    errors_seen = 0
    for path in ALL_PAGES:
        page = open_unfolded(browser, base_url, path, width)
        # The layout viewport grows to the widest content on a phone, so compare with the screen.
        page_width = page.evaluate("document.documentElement.scrollWidth")
        if page_width > width:
            problems.append(f"{path} at {width} px: the page scrolls sideways ({page_width} > {width} px)")
        outputs = page.evaluate(ERROR_OUTPUTS_JS)
        if path in CHAPTER_PAGES and not outputs:
            problems.append(f"{path}: no output boxes found")
        for text, wide, box in outputs:
            if ERROR_LINE.search(text):
                errors_seen += 1
                if wide > box:
                    problems.append(f"{path} at {width} px: error {text.strip()[:50]!r} wider than its box "
                                    f"({wide} > {box} px)")
        scrollers = page.evaluate(SCROLLERS_JS)
        page.add_style_tag(content=BACKGROUNDS_ONLY)
        page.evaluate("document.body.classList.add('backgrounds-only')")
        for i, el in enumerate(scrollers):
            where = f"{path} at {width} px, {el['text']!r}"
            if el["scrollbar"] <= 0:
                problems.append(f"{where}: scrolls with no visible scrollbar")
            shot = Image.open(io.BytesIO(page.locator(f'[data-scroller="{i}"]').screenshot()))
            # 6 px strips inside the box, 1 px in from each side (a neighbour's border may bleed in).
            left, top, right, bottom = el["left"], el["top"], el["left"] + el["width"], el["top"] + el["height"]
            start, cut = grey(shot, (left + 1, top, left + 7, bottom)), grey(shot, (right - 7, top, right - 1, bottom))
            if start - cut < SHADOW_CONTRAST:
                problems.append(f"{where}: no shadow at its cut edge (grey {cut:.0f} there, {start:.0f} at its start)")
        page.close()
    assert errors_seen, "no error output found on any page: is ERROR_LINE still right?"
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



def test_a_click_on_a_solutions_title_opens_it(browser: Any, base_url: str) -> None:
    """On every page with exercises, a click on a solution's title, "Solution to Exercise N.M
    (title)", most of which is sphinx-exercise's link back to the exercise, opens the solution and a
    second click closes it, without leaving the solution's place (the link once jumped up to the
    exercise)."""
    problems: List[str] = []
    seen = 0
    for path in CHAPTER_PAGES:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{base_url}/{path}", wait_until="networkidle")
        solutions = page.locator(".solution.dropdown")
        if solutions.count() == 0:
            page.close()
            continue
        seen += 1
        solution = solutions.first
        link = solution.locator(":scope > .admonition-title a.reference")
        if link.count() == 0:
            problems.append(f"{path}: the first solution's title holds no link (has sphinx-exercise changed?)")
            page.close()
            continue
        link.scroll_into_view_if_needed()
        url = page.url
        hidden = "toggle-hidden"
        folded = [hidden in (solution.get_attribute("class") or "")]
        # A real mouse click on the middle of the link's text (the link itself takes no pointer
        # events, so Playwright's own click on it would wait for it to).
        box = link.bounding_box()
        assert box is not None, path
        for _ in range(2):
            page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.wait_for_timeout(300)  # the unfolding animation
            folded.append(hidden in (solution.get_attribute("class") or ""))
        if folded != [True, False, True]:
            problems.append(f"{path}: folded before, after one and after two clicks on the title: {folded}")
        if page.url != url:
            problems.append(f"{path}: a click on the solution's title went to {page.url}")
        page.close()
    assert seen, "no page with a solution found"
    assert not problems, "\n".join(problems)


# Chinese characters (CJK ideographs and punctuation, full-width forms), as book/_ext/cjk_lang.py finds them.
CJK = "\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
# Every element whose own text holds Chinese, marked data-cjk=i; its Chinese characters, and
# whether it is prose (not code) declared Chinese (lang="zh...").
CJK_JS = f"""() => {{
  const walker = document.createTreeWalker(document.querySelector("article"), NodeFilter.SHOW_TEXT);
  const found = new Map();
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {{
    const chars = node.textContent.match(/[{CJK}]/g);
    if (!chars) continue;
    const el = node.parentElement;
    found.set(el, (found.get(el) || 0) + chars.length);
  }}
  return Array.from(found, ([el, count], i) => {{
    el.setAttribute("data-cjk", i);
    return {{text: el.textContent.trim().slice(0, 40), count: count, code: !!el.closest("pre, code"),
             lang: (el.closest("[lang]") || document.documentElement).getAttribute("lang")}};
  }});
}}"""


def test_chinese_is_drawn_with_a_chinese_font(browser: Any, base_url: str) -> None:
    """The Chinese of the book (the blog posts' titles in the bibliography and chapter 5, the
    Chinese comments of their code) is declared Chinese where it is prose, and every Chinese
    character is drawn with one of the Chinese fonts of the book's CSS: Chromium's own account
    of the fonts it drew each element's text with. Without such a font a browser draws
    empty boxes. (On Debian and Ubuntu: ``apt-get install fonts-noto-cjk``; CI installs it.)"""
    problems: List[str] = []
    seen: Dict[str, int] = {}
    for path in ALL_PAGES:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{base_url}/{path}", wait_until="networkidle")
        elements = page.evaluate(CJK_JS)
        seen[path] = len(elements)
        if elements:
            families = {name.strip().strip('"') for var in ("--dyconv-font-cjk", "--dyconv-font-cjk-mono")
                        for name in page.evaluate(f"getComputedStyle(document.documentElement)"
                                                  f".getPropertyValue('{var}')").split(",")}
            assert "Noto Sans CJK SC" in families, f"the CSS's Chinese fonts are not found: {families}"
            cdp = page.context.new_cdp_session(page)
            cdp.send("DOM.enable")
            cdp.send("CSS.enable")
            root = cdp.send("DOM.getDocument", {"depth": -1})["root"]["nodeId"]
            for i, el in enumerate(elements):
                where = f"{path}: {el['text']!r}"
                if not el["code"] and not (el["lang"] or "").startswith("zh"):
                    problems.append(f"{where} is not declared Chinese (lang {el['lang']!r})")
                node = cdp.send("DOM.querySelector", {"nodeId": root, "selector": f'[data-cjk="{i}"]'})["nodeId"]
                fonts = cdp.send("CSS.getPlatformFontsForNode", {"nodeId": node})["fonts"]
                chinese = sum(font["glyphCount"] for font in fonts if font["familyName"] in families)
                if chinese < el["count"]:
                    drawn = {font["familyName"]: font["glyphCount"] for font in fonts}
                    problems.append(f"{where}: {el['count']} Chinese characters, {chinese} drawn with a Chinese "
                                    f"font of the CSS (fonts used: {drawn})")
            cdp.detach()
        page.close()
    assert seen["book/references.html"] >= 2, f"the bibliography's two Chinese titles were not found: {seen}"
    assert not problems, "\n".join(problems)


def svg_text_px(img: Any) -> float:
    """The height, in CSS px, of the smallest text of an explorer's diagram as the page shows it."""
    svg = base64.b64decode(img.get_attribute("src").split("base64,", 1)[1]).decode()
    view_width = float(re.search(r'viewBox="0 0 ([0-9.]+) ', svg).group(1))  # type: ignore[union-attr]
    smallest = min(float(size) for size in re.findall(r"font-size: ([0-9.]+)px", svg))
    return smallest * img.evaluate("img => img.getBoundingClientRect().width") / view_width


@pytest.mark.parametrize("width", [1280, 390])
def test_explorer_diagrams_stay_readable(browser: Any, base_url: str, width: int) -> None:
    """For every setting of the wiring explorers (chapters 3 and 5), the diagram's smallest
    text (a subscript) is shown at least MIN_TEXT_PX high; on a desktop the diagram fits the
    page, on a phone it may scroll sideways instead of shrinking."""
    problems: List[str] = []
    for path, kind in [("book/03_grouped_convolution.html", "grouped"),
                       ("book/05_batch_as_groups.html", "batch_kernel")]:
        page = browser.new_page(viewport={"width": width, "height": 900}, is_mobile=width < 600, has_touch=width < 600)
        page.goto(f"{base_url}/{path}", wait_until="networkidle")
        el = page.locator(f'div.dyconv-explorer[data-explorer="{kind}"]')
        explorer = (grouped_conv_explorer() if kind == "grouped"
                    else batch_kernel_explorer(**json.loads(el.get_attribute("data-fixed"))))
        for setting in explorer.grid():
            select(el, setting)
            img = el.locator('[data-role="diagram"] img')
            if img.count() == 0:  # a setting with an error draws no wiring
                continue
            text_px = svg_text_px(img)
            if text_px < MIN_TEXT_PX:
                problems.append(f"{kind} {setting} at {width} px: text {text_px:.1f} px high")
            box = el.locator('[data-role="diagram"] .dyconv-scroll')
            if width >= 1280 and box.evaluate("box => box.scrollWidth > box.clientWidth"):
                problems.append(f"{kind} {setting} at {width} px: the diagram does not fit the page")
        if kind == "batch_kernel":
            select(el, {**explorer.defaults(), "B": 4, "g": 2})
            el.locator('[data-role="diagram"]').screenshot(path=f"/tmp/dyconv-browser-wiring-B4-g2-{width}.png")
        page.close()
    assert not problems, "\n".join(problems)


def test_each_cell_prints_one_output(browser: Any, base_url: str) -> None:
    """A cell's prints show as one output box (``nb_merge_streams`` in ``_config.yml``; the kernel
    sends them in pieces as they come). That setting moves all of a cell's prints to its first
    one, so no stored cell may print, then show something else, then print again."""
    problems: List[str] = []
    for page_ in notebook_pages():
        for i, cell in enumerate(json.loads(page_.source.read_text(encoding="utf-8"))["cells"]):
            kinds = ["stdout" if output.get("name") == "stdout" else "other" for output in cell.get("outputs", [])]
            runs = [kind for kind, _ in itertools.groupby(kinds)]
            if runs.count("stdout") > 1:
                problems.append(f"{page_.source.name} cell {i}: prints on both sides of another output {kinds}")
    for path in CHAPTER_PAGES:
        page = browser.new_page()
        page.goto(f"{base_url}/{path}", wait_until="domcontentloaded")
        counts = page.evaluate("""() => Array.from(document.querySelectorAll("div.cell_output")).map(out =>
            [out.querySelectorAll(":scope > div.output.stream").length, out.textContent.trim().slice(0, 40)])""")
        problems += [f"{path}: {n} print outputs in one cell, {text!r}" for n, text in counts if n > 1]
        page.close()
    assert not problems, "\n".join(problems)
