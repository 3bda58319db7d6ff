"""The project download of the HTML book, ``_static/dyconv-book.zip``, runs the book.

``book/_ext/project_archive.py`` writes it at the end of every HTML build. The
slow test here does what a reader does: unzip it into an empty folder, make a
fresh virtual environment there, ``pip install -r requirements.txt`` as its
HOW_TO_RUN.md says, and run a chapter, checked by nbval against the outputs the
chapter stores. That takes about 90 seconds on the 2-core machine that builds
the book, where pip finds the packages in its cache. Build the book first:
``jupyter-book build --all -W -n --keep-going .``
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import List

import nbformat
import pytest
from book_pages import BUILD_COMMAND, notebook_pages

ROOT = Path(__file__).resolve().parents[1]
BUILT = ROOT / "_build" / "html" / "_static" / "dyconv-book.zip"
LINK = "../_static/dyconv-book.zip"  # from a page in book/ to the archive in the built site
CHAPTER = "book/02_static_convolution.ipynb"  # the one the fresh environment runs: torch, widgets, plots

_spec = importlib.util.spec_from_file_location("project_archive", ROOT / "book" / "_ext" / "project_archive.py")
assert _spec is not None and _spec.loader is not None
project_archive = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(project_archive)


def expected_names() -> List[str]:
    names = [path.as_posix() for path in project_archive.members(ROOT)] + ["HOW_TO_RUN.md"]
    return sorted(f"{project_archive.FOLDER}/{name}" for name in names)


def test_archive_holds_the_runnable_project_and_is_reproducible(tmp_path: Path) -> None:
    first, second = tmp_path / "first.zip", tmp_path / "second.zip"
    project_archive.write_archive(ROOT, first)
    project_archive.write_archive(ROOT, second)
    assert first.read_bytes() == second.read_bytes(), "two archives of the same sources differ"
    names = zipfile.ZipFile(first).namelist()
    assert names == expected_names()
    # Every notebook page of the book, the chapters and the reference's "Using the layer".
    chapters = [f"dyconv-book/{page.file}.ipynb" for page in notebook_pages()]
    needed = ["README.md", "pyproject.toml", "requirements.txt", "dyconv_teach/__init__.py", "dyconv_teach/layers.py",
              "tools/gpu_check.py"]
    assert chapters and set(chapters) <= set(names)
    assert {f"dyconv-book/{n}" for n in needed} <= set(names)
    # The measurements chapters 8 and 10 read (book/data) travel with the chapters.
    data = {f"dyconv-book/{p.relative_to(ROOT).as_posix()}" for p in ROOT.glob("book/data/*.csv")}
    assert data and data <= set(names)
    # The whole project, every file git tracks.
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    project = {f"dyconv-book/{n}" for n in tracked.split()}
    assert project == set(names) - {"dyconv-book/HOW_TO_RUN.md"}


def test_the_book_ships_the_archive() -> None:
    if not BUILT.is_file():
        pytest.fail(f"no archive at {BUILT}: run `{BUILD_COMMAND}` in the repository root first")
    assert zipfile.ZipFile(BUILT).namelist() == expected_names()


def test_every_chapter_links_the_archive_and_says_how_to_install() -> None:
    """Each notebook page's first cell links the download (the chapters, and "Using the layer",
    which a reader runs too); the line above its first import of ``dyconv_teach`` says how to
    install it, and the traceback of a failed import shows that line."""
    chapters = [page.source for page in notebook_pages()]
    assert chapters
    for path in chapters:
        nb = nbformat.read(path, as_version=4)
        assert LINK in nb.cells[0].source, f"{path.name}: the first cell does not link {LINK}"
        code = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")
        lines = code.splitlines()
        first_import = next(i for i, line in enumerate(lines) if re.match(r"(from|import) dyconv_teach\b", line))
        hint = lines[first_import - 1]
        assert hint.startswith("# dyconv_teach missing?") and "pip install -r requirements.txt" in hint, (
            f"{path.name}: no install hint above `{lines[first_import]}`"
        )
    assert LINK in (ROOT / "book" / "index.md").read_text()


def run(command: List[str], cwd: Path) -> None:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    shown = " ".join(map(str, command))
    assert done.returncode == 0, f"`{shown}` failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"


def test_archive_runs_a_chapter_in_a_fresh_environment(tmp_path: Path) -> None:
    if not BUILT.is_file():
        pytest.fail(f"no archive at {BUILT}: run `{BUILD_COMMAND}` in the repository root first")
    with zipfile.ZipFile(BUILT) as archive:
        archive.extractall(tmp_path)
    project = tmp_path / project_archive.FOLDER
    venv = project / ".venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=project)
    python = str(venv / "bin" / "python")
    run([python, "-m", "pip", "install", "-q", "-r", "requirements.txt"], cwd=project)
    # The archive's own pytest configuration (pyproject.toml): nbval with its sanitizer.
    run([python, "-m", "pytest", "-q", CHAPTER], cwd=project)
