"""Re-run notebooks in place so their stored outputs are what a fresh run gives.

nbval compares a fresh run against the stored outputs, so after editing a
chapter run:

    python tools/execute_notebooks.py book/04_dynamic_convolution.ipynb

(no argument: every notebook under book/). Runs with one thread so stored
outputs never depend on the machine's core count.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"

import nbformat  # noqa: E402
from nbclient import NotebookClient  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def execute(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    # Widget state would only bloat the file: the HTML book uses the text/html fallback.
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
                   store_widget_state=False).execute()
    nbformat.write(nb, path)
    print(f"executed {path.relative_to(ROOT)}")


if __name__ == "__main__":
    paths = [Path(p).resolve() for p in sys.argv[1:]] or sorted((ROOT / "book").glob("*.ipynb"))
    for p in paths:
        execute(p)
