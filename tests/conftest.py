"""Shared pytest setup for the unit tests, and the headless Chromium of the browser tests."""

import os
import shutil
from typing import Any, Iterator

import pytest
import torch

# Without CUDA, the fused Triton kernels (tests/test_triton_conv.py) run on CPU tensors under
# Triton's interpreter, which must be switched on before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The unit tests use tensors of a few hundred elements: a thread pool gains nothing on
# them, and on a busy machine its spinning threads make the suite many times slower.
torch.set_num_threads(1)

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Headless Chromium driven by Playwright (the system's ``chromium``). Where it cannot
    start the browser tests skip, except in CI (``CI`` is set), where they fail."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
    executable = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_api.sync_playwright() as p:
        try:
            # Playwright hides scrollbars by default; test_outputs_are_not_cut_off looks at them.
            chromium = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS,
                                         ignore_default_args=["--hide-scrollbars"])
        except Exception as exc:  # no binary, or it cannot start here
            reason = f"cannot launch Chromium ({executable}): {exc}"
            if os.environ.get("CI"):
                pytest.fail(reason)  # CI must run the browser tests, not skip them
            pytest.skip(reason)
        yield chromium
        chromium.close()
