"""Every notebook in nbs/ runs top to bottom in its CI-sized mode (FASTAI_LS_SMALL=1: small data, no network)."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "nbs").glob("*.ipynb"))


def test_there_are_notebooks():
    assert {"00_loss.ipynb", "01_pets.ipynb", "02_calibration.ipynb"} <= {nb.name for nb in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTAI_LS_SMALL", "1")
    monkeypatch.setenv("FASTAI_HOME", str(tmp_path / "fastai"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
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
