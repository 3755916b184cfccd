"""The code base, notebooks included, stays ruff-clean (rules in ruff.toml)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed")
def test_ruff_reports_nothing():
    # The project's own code, not whatever scripts a user keeps in the clone.
    paths = [name for name in ("fastai_ls", "tests", "benchmarks", "setup.py") if (ROOT / name).exists()]
    result = subprocess.run([sys.executable, "-m", "ruff", "check", *paths], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# What a newcomer can read in one sitting: one concept per module, one responsibility per class.
MAX_MODULE_LINES, MAX_CLASS_LINES = 400, 270


def test_no_module_is_over_400_lines_and_no_class_over_270():
    import ast

    too_long = []
    for path in sorted((ROOT / "fastai_ls").rglob("*.py")):
        text = path.read_text()
        name = path.relative_to(ROOT).as_posix()
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                too_long.append(f"{name}: class {node.name} {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, "split these: " + "; ".join(too_long)
