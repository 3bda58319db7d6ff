"""The package is typed: mypy finds no error in ``dyconv_teach``."""

from pathlib import Path

from mypy import api as mypy_api

PACKAGE = Path(__file__).resolve().parents[1] / "dyconv_teach"


def test_mypy_finds_no_error() -> None:
    stdout, stderr, status = mypy_api.run([str(PACKAGE), "--ignore-missing-imports", "--no-incremental"])
    assert status == 0, f"mypy reported errors:\n{stdout}{stderr}"
