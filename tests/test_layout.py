"""The package's layout promises: the kernels an installed egn_fast loads are its own, no module in
egn_fast/ outgrows ~350 lines, the root keeps only the public face (≤ 8 modules) and the stages
live in subpackages, other stages enter the capture stage only through `capture_model`, the public
names stay what they were, a built wheel imports, and every design reference points at docs/design.md."""

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
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


MAX_ROOT_MODULES = 8
STAGES = {"capture", "losses", "rules", "ops", "system", "optim", "distributed", "cli"}
# Beside the stages: adapters to training frameworks, imported only on demand (never by `import egn_fast`)
ADAPTERS = {"integrations"}
# The public names of egn_fast: they may grow, never silently change.
PUBLIC = {
    "EGN", "EGNPreconditioner", "StepInfo", "ArmijoLineSearch", "AdaptiveDamping", "SGN", "SGNInfo", "NonFiniteError",
    "SolveError", "direction", "direction_with_info", "build_system", "forward_of", "row_jvp", "RowSpaceSystem",
    "Solution", "DirectionResult", "register_rule", "unregister_rule", "RuleContext", "ModuleCall", "Factors",
    "SeqFactors", "EmbeddingFactors", "PerSampleFactors", "Loss", "LossHead", "MSELoss", "CrossEntropyLoss",
    "BCEWithLogitsLoss", "AutogradLoss", "resolve_loss", "EigenSolver", "damped_solve", "ops", "rules",
    "reuse_cpu_memory",
}


def test_the_root_keeps_only_the_public_face_and_the_stages_have_folders():
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert "__init__.py" in root and len(root) <= MAX_ROOT_MODULES, root
    folders = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert folders == STAGES | ADAPTERS


def test_importing_egn_fast_imports_no_training_framework():
    """egn_fast.integrations imports transformers only when EGNTrainer is used."""
    code = ("import sys, egn_fast, egn_fast.integrations, egn_fast.integrations.targets; "
            "print([m for m in ('transformers', 'accelerate', 'lightning') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"


def test_public_names_are_unchanged_and_resolve():
    assert set(egn_fast.__all__) == PUBLIC
    assert all(getattr(egn_fast, name) is not None for name in PUBLIC)
    assert egn_fast.register_rule is egn_fast.rules.register_rule


def _imports(path: Path) -> list[str]:
    """The absolute egn_fast module names a file imports from (relative imports resolved)."""
    package = ["egn_fast", *path.relative_to(PACKAGE).parent.parts]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names += [module] + [f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def test_other_stages_enter_the_capture_stage_only_through_its_package():
    """Outside capture/, modules import `egn_fast.capture` (capture_model, forward_of, the types);
    only the rules read its records (ModuleCall) and layouts (BatchDim) from its modules."""
    inside = {"hooks", "layout", "plan", "forward", "model_capture"}
    reaching = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        if parts[0] in ("capture", "rules"):
            continue
        deep = [m for m in _imports(path) if m.startswith("egn_fast.capture.") and m.split(".")[2] in inside]
        if deep:
            reaching["/".join(parts)] = deep
    assert reaching == {}


def test_a_built_wheel_holds_every_subpackage_and_imports(tmp_path):
    """A regular (non-editable) wheel of the package, built from a copy of the sources (no CUDA
    extension: EGN_FAST_BUILD_CUDA=0), imported in a fresh interpreter from an unpacked copy."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("egn_fast", "triton_kernels", "csrc"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", "-w",
         str(tmp_path / "dist"), str(source)],
        check=True, capture_output=True, env={**os.environ, "EGN_FAST_BUILD_CUDA": "0"}, cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("egn_fast-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    on_disk = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "egn_fast").rglob("*.py"))
    in_wheel = sorted(p.relative_to(site).as_posix() for p in (site / "egn_fast").rglob("*.py") if "triton_kernels" not in p.parts)
    assert in_wheel == on_disk
    code = (
        f"import sys; sys.path.insert(0, {str(site)!r}); import torch, egn_fast; "
        "import egn_fast.capture, egn_fast.losses, egn_fast.rules, egn_fast.ops, egn_fast.system, egn_fast.optim, "
        "egn_fast.distributed, egn_fast.cli, egn_fast.integrations, egn_fast.triton_kernels; "
        "m = torch.nn.Linear(3, 2).double(); "
        "d = egn_fast.direction(m, torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)); "
        "print(egn_fast.__file__); print(len(d))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path).stdout.split()
    assert Path(out[0]).resolve().parent == (site / "egn_fast").resolve() and out[1] == "2"
