"""The package's layers: library modules (models, data, losses, trainers, samplers, evaluation, records) import nothing
of the stages; the stages, the RLHF loop, the quickstart, `plan` and the command line sit on top. No module grows
past 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llama2_hf"
# Modules allowed to drive stages: the stages themselves and the commands built on them.
ON_TOP = ("stages/", "quickstart/", "cli.py", "plan.py")
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the package modules `path` imports (relative imports resolved), at any depth."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("path", [p for p in MODULES if not str(p.relative_to(PACKAGE)).startswith(ON_TOP)],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_modules_import_no_stage(path):
    stages = sorted(m for m in imported_modules(path) if m == "llama2_hf.stages" or m.startswith("llama2_hf.stages."))
    assert not stages, f"{path.relative_to(PACKAGE)} imports {stages}: library code must not run back up to stages"


def test_the_leaves_import_only_leaves():
    leaves = {"errors", "run_lock", "records"}
    for name in leaves:
        used = {m.split(".")[1] for m in imported_modules(PACKAGE / f"{name}.py") if m.startswith("llama2_hf.")}
        assert used <= leaves, f"{name}.py imports {sorted(used - leaves)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_over_600_lines(path):
    assert len(path.read_text(encoding="utf-8").splitlines()) <= 600
