"""Shared pytest setup for the unit tests, and the headless Chromium of the browser tests."""

import shutil
from typing import Any, Iterator

import pytest
import torch

# The unit tests use tensors of a few hundred elements: a thread pool gains nothing on
# them, and on a busy machine its spinning threads make the suite many times slower.
torch.set_num_threads(1)

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Headless Chromium driven by Playwright (the system's ``chromium``)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
    executable = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_api.sync_playwright() as p:
        try:
            chromium = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        except Exception as exc:  # no binary, or it cannot start here
            pytest.skip(f"cannot launch Chromium ({executable}): {exc}")
        yield chromium
        chromium.close()
