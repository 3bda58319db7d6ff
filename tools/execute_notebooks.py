"""Re-run notebooks in place so their stored outputs are what a fresh run gives.

nbval compares a fresh run against the stored outputs, so after editing a
chapter run:

    python tools/execute_notebooks.py book/04_dynamic_convolution.ipynb

(no argument: every notebook under book/). Runs with one thread so stored
outputs never depend on the machine's core count.

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


def execute(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
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
    paths = [Path(p).resolve() for p in sys.argv[1:]] or sorted((ROOT / "book").glob("*.ipynb"))
    for p in paths:
        execute(p)
