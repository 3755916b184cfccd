"""The package's layers: the math (`fastai_ls/loss/`, `fastai_ls/calibration/`) is torch in, torch out and never
imports fastai or the layers above it; imports between the package's modules point one way (no cycles)."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "fastai_ls"
MATH = ("fastai_ls.loss", "fastai_ls.calibration", "fastai_ls.validation", "fastai_ls.calibrator_names",
        "fastai_ls._deprecation")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p) for p in PACKAGE.rglob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """Every module that `path` imports, at any depth of its code (a lazy import is still a dependency).
    `from package import module` depends on that module, not on the package's `__init__`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & MODULES
            found |= submodules or {node.module}
    return found


def internal_graph() -> dict[str, set[str]]:
    imports = {module_name(p): imported_modules(p) for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in found if m in MODULES and m != name} for name, found in imports.items()}


def in_math_layer(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in MATH)


def test_the_math_layer_imports_neither_fastai_nor_the_layers_above_it():
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if not in_math_layer(name):
            continue
        imports = imported_modules(path)
        assert not any(m == "fastai" or m.startswith("fastai.") for m in imports), f"{name} imports fastai"
        above = [m for m in imports if m.startswith("fastai_ls") and m != "fastai_ls" and not in_math_layer(m)]
        assert not above, f"{name} imports {above} from a layer above it"


def test_imports_between_modules_have_no_cycle():
    graph = internal_graph()
    # A package's __init__ re-exports its modules; a module importing its own package's __init__ would be a cycle.
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as err:
        raise AssertionError(f"import cycle: {' -> '.join(err.args[1])}") from None
