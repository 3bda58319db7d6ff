"""The chapters in JupyterLab: MyST rendered, solutions folded, explorers that say whether they are live.

Starts JupyterLab (with jupyterlab-myst, from requirements.txt) on 127.0.0.1 with a token, over a
temporary copy of ``book/`` so that nothing it saves reaches the repository, and opens the
chapters in headless Chromium (the ``browser`` fixture of conftest.py) as a new reader would:
freshly, untrusted, kernel not run. The server is stopped by its process id at the end.

The folding of solutions follows the recipe in the README ("Maintaining the book").
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
from book_pages import chapters

# Set DYCONV_BOOK_DIR to check another copy of the chapters (e.g. a scratch rewrite).
BOOK = Path(os.environ.get("DYCONV_BOOK_DIR", Path(__file__).resolve().parents[1] / "book"))
# The numbered chapters of _toc.yml, in reading order. Not "Using the layer" (a notebook of the
# Reference part): it has no exercises or solutions, which these tests fold and unfold.
CHAPTERS = [page.name for page in chapters() if page.notebook]
TOKEN = "dyconv-test-token"

@functools.lru_cache(maxsize=None)
def cells(chapter: str) -> List[Dict[str, Any]]:
    """The chapter's cells, read once (callers only read them)."""
    return json.loads((BOOK / f"{chapter}.ipynb").read_text())["cells"]


def source(cell: Dict[str, Any]) -> str:
    return "".join(cell["source"])


def solution_cells(chapter: str) -> List[int]:
    """Indices of the cells strictly between each ``{solution-start}`` and its ``{solution-end}``."""
    inside, found = False, []
    for i, cell in enumerate(cells(chapter)):
        text = source(cell)
        if cell["cell_type"] == "markdown" and text.startswith("```{solution-start}"):
            inside = True
        elif cell["cell_type"] == "markdown" and text.startswith("```{solution-end}"):
            inside = False
        elif inside:
            found.append(i)
    return found


def shown_markdown(chapter: str) -> int:
    """How many markdown cells JupyterLab renders on opening (a folded cell is rendered when opened)."""
    return sum(c["cell_type"] == "markdown" and not c["metadata"].get("jupyter", {}).get("source_hidden")
               for c in cells(chapter))


def explorer_kinds(chapter: str) -> List[str]:
    """The explorers a chapter's stored outputs show, in order."""
    return [kind for cell in cells(chapter) if cell["cell_type"] == "code"
            for kind in re.findall(r'data-explorer=\\?"(\w+)', json.dumps(cell.get("outputs", [])))]


# -- the recipe, in the notebook files -----------------------------------------------------------


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_solution_cells_are_folded(chapter: str) -> None:
    """Inside a solution, code cells are folded in JupyterLab (and their first line, which a folded
    cell still shows, gives nothing away); prose sits in a MyST dropdown, which stays closed."""
    inside = solution_cells(chapter)
    assert inside, f"{chapter} has no solutions"
    for i in inside:
        cell = cells(chapter)[i]
        if cell["cell_type"] == "code":
            assert cell["metadata"].get("jupyter") == {"source_hidden": True, "outputs_hidden": True}, (chapter, i)
            assert source(cell).splitlines()[0].startswith("#"), (chapter, i)
        else:
            assert re.fullmatch(r"```\{dropdown\}.*\n```", source(cell).strip(), re.S), (chapter, i)


# -- JupyterLab ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def lab() -> Iterator[str]:
    """JupyterLab serving a copy of the book; yields its base URL."""
    with tempfile.TemporaryDirectory(prefix="dyconv-lab-") as tmp:
        home = Path(tmp)
        shutil.copytree(BOOK, home / "book", ignore=shutil.ignore_patterns("_*", ".ipynb_checkpoints"))
        settings = home / "settings" / "@jupyterlab"
        # Attach every cell to the page (no virtual scrolling), and no news pop-up over the cells.
        for name, value in {"notebook-extension/tracker": {"windowingMode": "none"},
                            "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False}
                            }.items():
            path = settings / f"{name}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
        env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTER_DATA_DIR": str(home / "data"),
               "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(home / "ws")}
        port = free_port()
        command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                   f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={home / 'book'}",
                   "--LabApp.expose_app_in_browser=True"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            command.append("--allow-root")
        log = open(home / "lab.log", "w")
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(f"{base}/api/status?token={TOKEN}", timeout=5)
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"JupyterLab did not start:\n{(home / 'lab.log').read_text()[-3000:]}")
                    time.sleep(0.5)
            yield base
        finally:
            os.kill(server.pid, signal.SIGTERM)  # the server shuts its kernels down
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(server.pid, signal.SIGKILL)
                server.wait()
            log.close()


def open_chapter(browser: Any, lab: str, chapter: str) -> Tuple[Any, Any]:
    """Open a chapter as a new reader does; return the page and its notebook's cells, all rendered."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(f"{lab}/lab/tree/{chapter}.ipynb?token={TOKEN}&reset")
    notebook = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook")
    count = len(cells(chapter))
    page.wait_for_function(
        """([count]) => {
            const nb = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook');
            return nb && nb.querySelectorAll('.jp-Cell').length >= count
                && !nb.querySelector('.jp-MarkdownCell:not(.jp-mod-rendered)');
        }""", arg=[count], timeout=60_000)
    # MyST renders each markdown cell asynchronously, the slower the busier the machine: wait
    # until every cell the reader sees has its MyST rendering, then a moment for the last one.
    page.wait_for_function(
        """([n]) => document.querySelectorAll(
            '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-MarkdownCell .myst').length >= n""",
        arg=[shown_markdown(chapter)], timeout=60_000)
    page.wait_for_timeout(500)
    return page, notebook.locator(".jp-Cell")


def assert_solutions_folded(chapter: str, cell_list: Any, outputs: bool = True) -> None:
    """No solution's code, output (if ``outputs``) or prose is visible."""
    for i in solution_cells(chapter):
        cell = cell_list.nth(i)
        if cells(chapter)[i]["cell_type"] == "code":
            assert cell.locator(".jp-InputPlaceholder").is_visible(), f"{chapter}: solution cell {i} is not folded"
            assert not cell.locator(".jp-InputArea").is_visible(), f"{chapter}: solution cell {i} shows its code"
            if outputs:
                assert not cell.locator(".jp-OutputArea").is_visible(), f"{chapter}: cell {i} shows its output"
        else:
            body = source(cells(chapter)[i]).strip().splitlines()[1].split()[:4]
            assert " ".join(body) not in cell.inner_text(), f"{chapter}: solution cell {i} shows its prose"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_myst_renders_and_solutions_stay_hidden_until_opened(browser: Any, lab: str, chapter: str) -> None:
    page, cell_list = open_chapter(browser, lab, chapter)
    # jupyterlab-myst renders a markdown cell into div.myst (JupyterLab's own renderer would not).
    markdown = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-MarkdownCell .myst")
    n_markdown = shown_markdown(chapter)
    assert markdown.count() == n_markdown, f"{chapter}: {markdown.count()} of {n_markdown} cells rendered by MyST"
    text = "\n".join(markdown.all_inner_texts())
    for raw in ("{doc}", "{ref}", "{cite}", "{term}", ":label:", ":class:", "```", "{exercise}", "{solution"):
        assert raw not in text, f"{chapter} shows raw MyST {raw!r}"
    n_exercises = sum(source(c).startswith("```{exercise}") for c in cells(chapter))
    assert len(re.findall(r"^Exercise \d+", text, re.M)) == n_exercises, f"{chapter}: exercises not rendered"
    if "$" in "".join(source(c) for c in cells(chapter) if c["cell_type"] == "markdown"):
        assert markdown.locator(".katex").count() > 0, f"{chapter}: no rendered math"
    # Each figure's caption cell shows its caption in italics under the figure (the HTML book drops
    # that cell and numbers the caption instead: tests/test_figures.py); a link to a figure shows its
    # description, never the bare label.
    for i, cell in enumerate(cells(chapter)):
        if "figure" in cell["metadata"].get("dyconv", {}):
            caption = cell_list.nth(i).locator(".myst em").first
            assert caption.is_visible() and caption.inner_text().strip(), f"{chapter}: caption cell {i} not shown"
    assert not re.search(r"\bfig-[a-z0-9]", text), f"{chapter} shows a figure's label instead of a description"
    # No solution is visible until the reader opens it; a click opens a folded cell.
    assert_solutions_folded(chapter, cell_list)
    first = cell_list.nth(next(i for i in solution_cells(chapter) if cells(chapter)[i]["cell_type"] == "code"))
    first.locator(".jp-InputPlaceholder").click()
    page.wait_for_timeout(300)
    assert first.locator(".jp-InputArea").is_visible()
    page.close()


def run_all(page: Any) -> None:
    """Run every cell and wait until the kernel has run them all (folded cells too)."""
    page.wait_for_function("() => window.jupyterapp !== undefined", timeout=30_000)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_function(
        """() => {
            const panel = window.jupyterapp.shell.currentWidget;
            const cells = panel.content.model.cells;
            for (let i = 0; i < cells.length; i++) {
                if (cells.get(i).type === 'code' && !cells.get(i).executionCount) return false;
            }
            return panel.sessionContext.session.kernel.status === 'idle';
        }""", timeout=300_000)


@pytest.mark.parametrize("chapter", [c for c in CHAPTERS if explorer_kinds(c)])
def test_explorers_say_they_are_not_live_then_come_alive(browser: Any, lab: str, chapter: str) -> None:
    page, cell_list = open_chapter(browser, lab, chapter)
    kinds = explorer_kinds(chapter)
    # Fresh and untrusted: the stored fallbacks, their notice shown, their menus disabled. (JupyterLab's
    # sanitizer drops the data-* attributes, scripts and styles of an untrusted output; classes stay.)
    fallbacks = page.locator(".jp-OutputArea-output > .dyconv-explorer")
    assert fallbacks.count() == len(kinds), f"{chapter}: {fallbacks.count()} stored explorers for {kinds}"
    for n in range(len(kinds)):
        fallback = fallbacks.nth(n)
        notice = fallback.locator(".dyconv-notice")
        assert notice.is_visible() and "Run the notebook to make this explorer live." in notice.inner_text()
        assert fallback.locator("select:disabled").count() == fallback.locator("select").count() > 0
    run_all(page)
    # JupyterLab shows the output of every cell it runs, but the code and the prose stay folded.
    assert_solutions_folded(chapter, cell_list, outputs=False)
    # Live: one widget per explorer, no notice; one slider move changes what the explorer shows.
    widgets = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output .widget-vbox")
    page.wait_for_function("() => document.querySelectorAll('.widget-vbox .widget-slider').length > 0")
    assert widgets.count() == len(kinds), f"{chapter}: {widgets.count()} live widgets for {kinds}"
    assert page.locator(".dyconv-notice:visible").count() == 0
    for n in range(len(kinds)):
        widget = widgets.nth(n)
        before = widget.inner_text()
        handle = widget.locator(".widget-slider .noUi-handle").first
        handle.focus()
        handle.press("ArrowRight")
        page.wait_for_function("([el, before]) => el.innerText !== before", arg=[widget.element_handle(), before],
                               timeout=30_000)
    page.close()
