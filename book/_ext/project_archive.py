"""Ship the whole project with the HTML book, as ``_static/dyconv-book.zip``.

A reader of the online book downloads it, installs it, and runs the chapters in
Jupyter. It holds every file of the repository (so everything the book points at: the
chapters and the measurements they read in ``book/data``, the package and its tests, the
book's configuration and extensions, ``tools/``, whose ``gpu_check.py`` chapter 10 tells
readers with a GPU to run) and ``HOW_TO_RUN.md``, all under one folder ``dyconv-book/``.
It is written at the end of every HTML build from that build's sources, with fixed
timestamps and modes and in a fixed order, so the same sources give a byte-identical archive.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from sphinx.application import Sphinx

ARCHIVE = "dyconv-book.zip"
FOLDER = "dyconv-book"
FILES = ["README.md", "LICENSE", "pyproject.toml", "requirements.txt", "_config.yml", "_toc.yml", ".ci/run",
         ".gitignore"]
# book/data holds the measurements chapters 8 and 10 read; tools/gpu_check.py re-measures them.
PATTERNS = ["book/**/*", "dyconv_teach/**/*.py", "dyconv_teach/**/*.c", "tests/*", "tools/*.py",
            ".github/workflows/*.yml"]
# What a build or a run leaves beside the sources.
SKIP = {"__pycache__", ".ipynb_checkpoints", ".pytest_cache"}
HOW_TO_RUN = """\
# How to run the book's chapters

You need Python 3.11 (the book is built and tested with it), pip, and a C
compiler (gcc or clang; on macOS, Xcode's command line tools): the package
builds its fused CPU kernels with it the first time they run, and
`torch.compile` needs one too. Without one the layer runs its other
strategies, and the lists of strategies chapters 6 and 8 print are shorter.
In a terminal, in this folder:

```bash
python3 -m venv .venv            # a virtual environment for the book
. .venv/bin/activate             # on Windows: .venv\\Scripts\\activate
pip install -r requirements.txt  # torch, JupyterLab, and this folder's dyconv_teach package
jupyter lab book/
```

Open a chapter (`book/01_introduction.ipynb` first) and run its cells from
the top. The explorers of chapters 2, 3, 5 and 11 are live widgets there.

This folder is the whole project: `README.md` describes the package and
how to build the book and run its tests (`tests/`) from here.

`requirements.txt` asks for `torch==2.13.0`; on Linux, pip picks a build
with CUDA libraries, several GB. The book runs on the CPU, so you can take
the CPU build instead:
`pip install -r requirements.txt --extra-index-url https://download.pytorch.org/whl/cpu`.

Triton, which runs chapter 9's kernels, installs on Linux only: on Windows or
macOS on Apple silicon everything else runs, and chapter 9 runs under WSL (the
Windows Subsystem for Linux) or in a Linux container. PyTorch publishes no
builds for macOS on Intel processors: there, run the book in a Linux container.

The layer alone, without the book's helpers: `pip install .`, then
`from dyconv_teach import DynamicConv2d`.
"""

# Any fixed date works; zip cannot store dates before 1980.
DATE = (1980, 1, 1, 0, 0, 0)


def members(root: Path) -> List[Path]:
    """The project files the archive holds, relative to ``root``, sorted."""
    found = [root / name for name in FILES]
    for pattern in PATTERNS:
        found.extend(path for path in root.glob(pattern) if path.is_file())
    return sorted(path.relative_to(root) for path in found if not SKIP & set(path.relative_to(root).parts))


def write_archive(root: Path, target: Path) -> None:
    """Write the archive of the project at ``root`` to ``target``."""
    entries = [(path.as_posix(), (root / path).read_bytes()) for path in members(root)]
    entries.append(("HOW_TO_RUN.md", HOW_TO_RUN.encode()))
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in sorted(entries):
            info = zipfile.ZipInfo(f"{FOLDER}/{name}", date_time=DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # Unix, whatever system builds the book
            info.external_attr = 0o644 << 16  # rw-r--r--
            archive.writestr(info, data, compresslevel=9)


def _build_finished(app: Sphinx, exception: Optional[Exception]) -> None:
    if exception is None and app.builder.format == "html":
        write_archive(Path(app.srcdir), Path(app.outdir) / "_static" / ARCHIVE)


def setup(app: Sphinx) -> Dict[str, Any]:
    app.connect("build-finished", _build_finished)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
