"""The package as two products: the layer (``dyconv_teach``, torch alone) and the book's
helpers (``dyconv_teach.teaching``, the ``book`` extra), each with a declared public API
that the API reference documents exactly."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from book_pages import BUILD_COMMAND

ROOT = Path(__file__).resolve().parents[1]
API_PAGE = ROOT / "_build" / "html" / "book" / "api.html"

#: The layer's modules, what ``pip install .`` needs, and the book's helpers.
LAYER_MODULES = ["dyconv_teach", "dyconv_teach.functional", "dyconv_teach.layers", "dyconv_teach.odconv",
                 "dyconv_teach.strategies", "dyconv_teach.reference", "dyconv_teach.flops", "dyconv_teach.bench"]
KERNEL_MODULES = ["dyconv_teach.kernels.cpu_conv", "dyconv_teach.kernels.triton_conv"]
BOOK_MODULES = ["dyconv_teach.teaching.shapes", "dyconv_teach.teaching.explain", "dyconv_teach.teaching.checker",
                "dyconv_teach.teaching.family", "dyconv_teach.teaching.plots", "dyconv_teach.teaching.explorer",
                "dyconv_teach.teaching.widgets"]
#: The book's helpers that need torch alone: the checker runs in any Python session.
TORCH_ONLY_BOOK_MODULES = BOOK_MODULES[:4]
#: The packages of the ``book`` extra (and their import names).
BOOK_EXTRA = ("ipywidgets", "matplotlib", "mpl_toolkits", "pylab")


def test_every_public_module_declares_its_names() -> None:
    for name in LAYER_MODULES + KERNEL_MODULES + BOOK_MODULES:
        module = importlib.import_module(name)
        assert isinstance(getattr(module, "__all__", None), list) and module.__all__, name
        for public in module.__all__:
            assert hasattr(module, public), f"{name}.__all__ names {public}, which it does not define"


def without_book_extra(tmp_path: Path) -> Path:
    """A virtual environment with every package of this one except the ``book`` extra's: its
    site-packages links to this environment's entries one by one, leaving those out."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_paths()["purelib"])
    target = next(venv.glob("lib/python*/site-packages"))
    for entry in site.iterdir():
        top = re.split(r"[-.]", entry.name)[0].lower()
        if top not in BOOK_EXTRA and not (target / entry.name).exists():
            (target / entry.name).symlink_to(entry)
    return venv / "bin" / "python"


def test_the_layer_needs_no_book_extra(tmp_path: Path) -> None:
    """In an environment without ipywidgets and matplotlib, the layer's modules import and run,
    and none of them pulls in a package of the ``book`` extra; neither do the book's helpers that
    need torch alone (the checker runs); the others fail with a message that names the extra."""
    python = without_book_extra(tmp_path)
    script = f"""
import importlib, sys, torch
for name in {LAYER_MODULES!r}:
    importlib.import_module(name)
from dyconv_teach import DynamicConv1d, DynamicConv2d, DynamicConv3d
assert DynamicConv2d(4, 6, 3)(torch.randn(2, 4, 8, 8)).shape == (2, 6, 6, 6)
assert DynamicConv1d(4, 6, 3)(torch.randn(2, 4, 8)).shape == (2, 6, 6)
assert DynamicConv3d(4, 6, 3)(torch.randn(2, 4, 5, 5, 5)).shape == (2, 6, 3, 3, 3)
for name in {TORCH_ONLY_BOOK_MODULES!r}:
    importlib.import_module(name)
from dyconv_teach.teaching.checker import check_dynamic_conv
from dyconv_teach.functional import dynamic_conv2d
assert check_dynamic_conv(dynamic_conv2d).passed
loaded = sorted(m for m in sys.modules if m.split('.')[0] in {BOOK_EXTRA!r})
assert not loaded, loaded
for name in {BOOK_MODULES[len(TORCH_ONLY_BOOK_MODULES):]!r}:
    try:
        importlib.import_module(name)
    except ImportError as error:
        assert "needs the 'book' extra" in str(error), error
    else:
        raise AssertionError(name + " imported without the book extra")
print("ok")
"""
    done = subprocess.run([str(python), "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    missing = subprocess.run([str(python), "-c", "import matplotlib"], capture_output=True, text=True)
    assert missing.returncode != 0  # the environment really lacks the extra


def test_the_wheel_holds_both_products(tmp_path: Path) -> None:
    """``pip install .`` installs the layer, its kernels and the book's helpers (the latter
    usable with the extra), and the licence."""
    source = tmp_path / "source"  # a copy, so that setuptools' build/ folder stays out of the repository
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (source / name).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "dyconv_teach", source / "dyconv_teach", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("dyconv_teach-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in LAYER_MODULES + KERNEL_MODULES + BOOK_MODULES:
        path = module.replace(".", "/") + (".py" if "." in module else "/__init__.py")
        assert path in names, path
    assert "dyconv_teach/kernels/cpu_conv.c" in names  # the fused CPU kernels' source, compiled at first use
    assert any(n.endswith("licenses/LICENSE") for n in names), sorted(names)


def test_the_api_reference_documents_exactly_the_public_names() -> None:
    """Every name in a public module's ``__all__`` has an entry on the API page, and every entry
    there is such a name or one of its members (no private name, nothing a module does not export)."""
    if not API_PAGE.is_file():
        pytest.fail(f"no built API page at {API_PAGE}: run `{BUILD_COMMAND}` in the repository root first")
    documented = set(re.findall(r'<dt class="sig sig-object py" id="(dyconv_teach[\w.]*)"', API_PAGE.read_text()))
    public = {f"{name}.{n}" for name in LAYER_MODULES[1:] + KERNEL_MODULES + BOOK_MODULES
              for n in importlib.import_module(name).__all__}
    assert public <= documented, sorted(public - documented)
    extra = {d for d in documented if not any(d == p or d.startswith(p + ".") for p in public)}
    assert not extra, sorted(extra)
    assert any(d.startswith("dyconv_teach.layers.DynamicConv2d.") for d in documented)  # its methods too
