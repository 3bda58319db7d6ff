"""Re-run notebooks in place so their stored outputs are what a fresh run gives.

nbval compares a fresh run against the stored outputs, so after editing a
chapter run:

    python tools/execute_notebooks.py book/04_dynamic_convolution.ipynb

(no argument: every notebook under book/). Runs with one thread so stored
outputs never depend on the machine's core count.

Figure captions are written once, in the italic markdown cell under the figure's code cell
(``*The caption, with $math$ and `code`.*``), whose cell metadata names the figure's label,
``{"dyconv": {"figure": "fig-group-wiring"}}``. JupyterLab shows that cell; the HTML book drops it
(this script gives it the tag ``remove-cell``) and shows the caption numbered under the figure
instead: this script copies the cell's text, without the asterisks, into the code cell's
``{"mystnb": {"figure": {"name": label, "caption": text}}}``, which myst-nb renders as a numbered
figure that ``{ref}`the figure below <fig-group-wiring>` `` links to. After editing only a caption,

    python tools/execute_notebooks.py --captions-only book/03_grouped_convolution.ipynb

copies the captions without running the notebook.

Re-running an unchanged chapter leaves its file unchanged (except for timings
the chapter prints), so a diff shows only real changes: no per-cell timing
metadata is recorded, consecutive prints are stored as one output, and the
live-widget part of an explorer's output is not stored (its model id is random
on every run, and without the widget state, which would only bloat the file,
Jupyter could not show it anyway: JupyterLab shows the stored static HTML of
the explorer instead, and the live widget once the cell is run).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"

import nbformat  # noqa: E402
from nbclient import NotebookClient  # noqa: E402

from dyconv_teach.teaching.explorer import DATA_PATTERN, STORED_DATA  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
# A figure's label: what {ref} links to, and the figure's id in the HTML page.
FIGURE_LABEL = re.compile(r"fig-[a-z0-9]+(?:-[a-z0-9]+)*")
# A caption cell's text: one italic paragraph, *...*, and nothing else.
CAPTION = re.compile(r"\*(?!\*)(?P<text>\S(?:.*\S)?)(?<!\*)\*", re.S)


def caption_text(source: str) -> str:
    """The caption a caption cell holds: its one italic paragraph, without the asterisks."""
    text = source.strip()
    match = CAPTION.fullmatch(text)
    if match is None or "\n\n" in text:
        raise ValueError(f"a caption cell holds one italic paragraph, *...*, and nothing else: {text[:80]!r}")
    return match["text"]


def sync_figure_captions(nb: nbformat.NotebookNode, where: str = "notebook") -> None:
    """Copy each caption cell's text into the ``mystnb.figure`` metadata of the code cell above it,
    tag the caption cell ``remove-cell``, and drop the ``mystnb.figure`` of a code cell that no
    caption cell follows any more."""
    captioned = set()
    for i, cell in enumerate(nb.cells):
        label = cell.metadata.get("dyconv", {}).get("figure")
        if label is None:
            continue
        if cell.cell_type != "markdown" or not FIGURE_LABEL.fullmatch(str(label)):
            raise ValueError(f"{where}, cell {i}: dyconv.figure belongs on a markdown cell and is a label "
                             f"like 'fig-group-wiring', not {label!r}")
        if i == 0 or nb.cells[i - 1].cell_type != "code":
            raise ValueError(f"{where}, cell {i}: the caption of {label} must follow its figure's code cell")
        try:
            caption = caption_text(cell.source)
        except ValueError as error:
            raise ValueError(f"{where}, cell {i} ({label}): {error}") from None
        tags = cell.metadata.setdefault("tags", [])
        if "remove-cell" not in tags:
            tags.append("remove-cell")
        nb.cells[i - 1].metadata.setdefault("mystnb", {})["figure"] = {"name": label, "caption": caption}
        captioned.add(i - 1)
    for i, cell in enumerate(nb.cells):
        mystnb = cell.metadata.get("mystnb", {})
        if cell.cell_type == "code" and i not in captioned and "figure" in mystnb:
            del mystnb["figure"]
            if not mystnb:
                del cell.metadata["mystnb"]


def coalesce_streams(outputs: list) -> list:
    """Join consecutive prints to the same stream into one output: how the kernel splits them
    varies from run to run, and a diff should not show that."""
    joined: list = []
    for output in outputs:
        last = joined[-1] if joined else None
        if (output.get("output_type") == "stream" and last is not None
                and last.get("output_type") == "stream" and last.get("name") == output.get("name")):
            last["text"] += output["text"]
        else:
            joined.append(output)
    return joined


def write_captions(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    sync_figure_captions(nb, str(path.relative_to(ROOT)))
    nbformat.write(nb, path)
    print(f"captions copied in {path.relative_to(ROOT)}")


def execute(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    sync_figure_captions(nb, str(path.relative_to(ROOT)))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
                   store_widget_state=False, record_timing=False).execute()
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # timings an older run may have stored
        if "outputs" in cell:
            cell.outputs = coalesce_streams(cell.outputs)
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            data.pop(WIDGET_VIEW, None)
            if "text/html" in data:  # an explorer's results for every setting: not stored
                data["text/html"] = re.sub(DATA_PATTERN, STORED_DATA, data["text/html"])
    nbformat.write(nb, path)
    print(f"executed {path.relative_to(ROOT)}")


if __name__ == "__main__":
    args = sys.argv[1:]
    captions_only = "--captions-only" in args
    paths = [Path(p).resolve() for p in args if p != "--captions-only"] or sorted((ROOT / "book").glob("*.ipynb"))
    for p in paths:
        if captions_only:
            write_captions(p)
        else:
            execute(p)
