"""Every notebook in nbs/ runs top to bottom in its CI-sized mode (FASTAI_LS_SMALL=1: small data, no network), and is
committed with the outputs of a full run, which `python tests/architecture/test_notebooks.py nbs/NAME.ipynb ...`
makes (the prelude below included, as in the tests)."""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")  # the test extra's notebook runner: skipped, not a collection error
NotebookClient = pytest.importorskip("nbclient").NotebookClient
pytestmark = [pytest.mark.notebook, pytest.mark.slow]
NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "nbs").glob("*.ipynb"))
# Run before a notebook's first cell by this harness, not shown to users: warnings print their category and message
# alone, so that saved outputs name no file of the machine that ran them, and fastai 2.8's torch.jit.script call at
# import, which torch 2.10+ deprecates, prints nothing (fastai_ls filters it the same way).
PRELUDE = """\
import warnings

warnings.formatwarning = lambda message, category, *args, **kwargs: f"{category.__name__}: {message}\\n"
warnings.filterwarnings("ignore", message=r".*torch\\.jit\\.script.*", category=FutureWarning)
"""


def execute(notebook: nbformat.NotebookNode, workdir: Path, timeout: int | None = 1200) -> nbformat.NotebookNode:
    """`notebook` run top to bottom in `workdir` after `PRELUDE`, which is then taken out again (the execution
    counts start at 1, as if the notebook had run alone); `timeout`: seconds per cell (None: no limit)."""
    notebook.cells.insert(0, nbformat.v4.new_code_cell(PRELUDE))
    try:
        NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(workdir)}}).execute()
    finally:
        notebook.cells.pop(0)
    for cell in notebook.cells:
        if cell.cell_type == "code" and cell.get("execution_count"):
            cell.execution_count -= 1
            for out in cell.outputs:
                if out.get("execution_count"):
                    out["execution_count"] -= 1
    return notebook


def test_there_are_notebooks():
    assert {"00_loss.ipynb", "01_pets.ipynb", "02_calibration.ipynb"} <= {nb.name for nb in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTAI_LS_SMALL", "1")
    monkeypatch.setenv("FASTAI_HOME", str(tmp_path / "fastai"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = execute(nbformat.read(path, as_version=4), tmp_path)
    errors = [out for cell in notebook.cells for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors


# An absolute path of two folders or more (not the end of a URL or of an HTML tag), or a Windows drive path: the
# outputs of a run must name no folder of the machine it ran on, whichever that was.
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/<~-])/[\w.-]+/[\w.-]+|\b[A-Za-z]:[\\/][\w.-]+")


def cell_texts(cell) -> list[str]:
    """A code cell's source and the text of its outputs (streams, text/plain, text/html; not images' bytes)."""
    texts = [cell.source]
    for out in cell.outputs:
        texts.append(out.get("text", ""))
        texts += [value for kind, value in out.get("data", {}).items() if kind.startswith("text/")]
    return texts


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_shows_its_outputs_and_no_machine_path(path):
    # Users read the notebooks on GitHub: each is committed with the outputs of a run, every code cell but
    # imports showing something, none an error, and none naming a folder of the machine it ran on.
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert sum(bool(cell.outputs) for cell in code) >= len(code) // 2, "run the notebook and commit its outputs"
    for cell in code:
        assert all(out.get("output_type") != "error" for out in cell.outputs), cell.source[:80]
        for text in cell_texts(cell):
            found = ABSOLUTE_PATH.search(text)
            assert found is None, f"{path.name}: a path {found.group(0)!r} in the outputs of {cell.source[:80]!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_show_users_no_test_plumbing(path):
    # Issue 20: each notebook's first code cell set up warnings for the saved outputs; the harness does it now.
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        assert "formatwarning" not in cell.source and "filterwarnings" not in cell.source, cell.source[:80]
    first = [cell for cell in notebook.cells if cell.cell_type == "code"][0]
    assert first.execution_count in (None, 1)


def test_the_calibration_notebook_uses_the_demos_seed_everywhere():
    # Issue 20: the notebook's calibrator comparison used fold seed 0, the demo (and the README) 42, so the notebook
    # named another best calibrator for the label-smoothing model.
    import inspect

    from fastai_ls.cli.demo import compare

    source = "\n".join(cell.source for cell in nbformat.read(NOTEBOOKS_BY_NAME["02_calibration.ipynb"], as_version=4)
                       .cells if cell.cell_type == "code")
    assert re.findall(r"^SEED = (\d+)$", source, re.M) == [str(inspect.signature(compare).parameters["seed"].default)]
    assert re.findall(r"seed=(\w+)|set_seed\((\w+)", source) and \
        all(value == "SEED" for pair in re.findall(r"seed=(\w+)|set_seed\((\w+)", source) for value in pair if value)
    assert "compare_calibrators(learn, methods=methods, seed=SEED)" in source


NOTEBOOKS_BY_NAME = {path.name: path for path in NOTEBOOKS}


if __name__ == "__main__":  # re-run the given notebooks in full (no FASTAI_LS_SMALL) and save their outputs
    # No time limit per cell: a full run trains many models in one cell (nbs/03_losses.ipynb: 35).
    for name in sys.argv[1:]:
        path = Path(name).resolve()
        with tempfile.TemporaryDirectory() as workdir:
            nbformat.write(execute(nbformat.read(path, as_version=4), Path(workdir), timeout=None), path)
        print(f"ran {path.name}")
