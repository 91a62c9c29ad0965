"""The package's layout promises: the kernels an installed egn_fast loads are its own, no module in
egn_fast/ outgrows ~350 lines, and every design reference in the tree points at docs/design.md."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import egn_fast

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(egn_fast.__file__).resolve().parent
MAX_LINES = 350
SOURCE_SUFFIXES = {".py", ".md", ".cu", ".cuh", ".cpp", ".h", ".sh"}
OLD_REFERENCE = "DESIGN" + " §"  # the shared document outside the repository; split so this file does not cite it
SKIPPED_DIRS = {".venv", ".git", "build", ".cache", ".pytest_cache"}


def test_triton_kernels_are_loaded_from_egn_fasts_own_tree():
    """Installed, they sit in egn_fast/triton_kernels; editable, in the checkout's triton_kernels/
    next to egn_fast/. Never a top-level `triton_kernels` package from elsewhere (one exists on PyPI)."""
    pytest.importorskip("triton")
    code = (
        "import sys, egn_fast, egn_fast.triton_kernels as tk; print(egn_fast.__file__); "
        "print(tk.__file__); print(tk.gram_dense.__module__); print('triton_kernels' in sys.modules)"
    )
    # a fresh interpreter (TRITON_INTERPRET must precede `import triton`), importing as this one does
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TRITON_INTERPRET": "1"}).stdout.split("\n")
    package, kernels = Path(out[0]).resolve().parent, Path(out[1]).resolve().parent
    assert kernels in (package / "triton_kernels", package.parent / "triton_kernels")
    assert (kernels / "gram_dense.py").is_file() and (kernels / "_common.py").is_file()
    assert out[2] == "egn_fast.triton_kernels.gram_dense"
    assert out[3] == "False"  # nothing imported a top-level triton_kernels


def test_no_module_in_the_package_is_over_the_size_limit():
    sizes = {p.relative_to(PACKAGE).as_posix(): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert sizes and {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_every_design_reference_resolves_to_docs_design_md():
    design = (REPO / "docs" / "design.md").read_text()
    sections = set(re.findall(r"^## (\d+)\.", design, re.M))
    cited: list[tuple[str, str]] = []
    for path in REPO.rglob("*"):
        if path.suffix not in SOURCE_SUFFIXES or SKIPPED_DIRS.intersection(path.parts) or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        assert OLD_REFERENCE not in text, f"{path} cites the old design document"
        cited += [(str(path), s) for s in re.findall(r"docs/design\.md §(\d+)", text)]
    assert cited, "nothing cites docs/design.md"
    assert [c for c in cited if c[1] not in sections] == []


def test_every_subpackage_is_installed():
    """pyproject.toml lists the packages explicitly (triton_kernels/ is mapped into egn_fast), so a
    new subpackage must be listed there or a regular (non-editable) install lacks it."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {"egn_fast." + p.parent.relative_to(REPO / "egn_fast").as_posix().replace("/", ".")
               for p in (REPO / "egn_fast").rglob("__init__.py") if p.parent != REPO / "egn_fast"}
    assert listed == {"egn_fast", "egn_fast.triton_kernels"} | on_disk
