"""The `fastai-ls` command: the README's demo, the Pets job, errors, and a run on 2 CPU processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image

from fastai_ls.pets import make_pets_like_tree

QUICK_DEMO = ["demo", "--epochs", "1", "--max-items", "240", "--bs", "32"]
ROWS = ["error rate", "ECE", "MCE", "adaptive ECE", "NLL", "Brier", "AURC", "temperature",
        "ECE after temperature scaling"]


def run_cli(args, tmp_path, env=None, launcher=None):
    env = {**os.environ, "FASTAI_HOME": str(tmp_path / "fastai"), "TORCH_HOME": str(tmp_path / "torch"),
           "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", **(env or {})}
    command = (launcher or [sys.executable, "-m"]) + ["fastai_ls", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


def test_article_prints_the_seed_numbers(tmp_path):
    result = run_cli(["article"], tmp_path)
    assert result.returncode == 0
    for value in ["0.0018", "0.2352", "0.3518", "0.0007", "0.2641", "0.3957"]:
        assert value in result.stdout


def test_demo_prints_the_table_and_writes_csv_and_diagrams(tmp_path):
    result = run_cli([*QUICK_DEMO, "--out", "report"], tmp_path)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path / "report" / "calibration.csv", index_col="metric")
    assert list(table.columns) == ["cross-entropy", "label smoothing 0.1"] and list(table.index) == ROWS
    assert table.notna().all().all() and ((table.loc["ECE"] >= 0) & (table.loc["ECE"] <= 1)).all()
    assert Image.open(tmp_path / "report" / "reliability.png").size[0] > Image.open(
        tmp_path / "report" / "reliability.png").size[1]  # two diagrams side by side
    assert all(row in result.stdout for row in ROWS)


def test_pets_command_runs_on_an_extracted_tree(tmp_path):
    root = make_pets_like_tree(tmp_path / "pets")
    result = run_cli(["pets", "--path", str(root), "--no-pretrained", "--arch", "resnet18", "--size", "32",
                      "--bs", "8", "--epochs", "1", "--num-workers", "0", "--baseline", "--out", "out"], tmp_path)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path / "out" / "calibration.csv", index_col="metric")
    assert list(table.columns) == ["cross-entropy", "label smoothing 0.1"]


@pytest.mark.parametrize("args, status, fragment", [
    (["demo", "--epochs", "0"], 2, "must be a positive integer"),
    (["demo", "--eps", "1.5"], 2, "eps must be in [0, 1)"),
    (["pets", "--eps", "nan"], 2, "eps must be in [0, 1)"),
    (["pets", "--path", "no/such/folder"], 1, "no Pets images"),
    (["bake"], 2, "invalid choice"),
    (["pets", "--path", "pets", "--arch", "resnet_typo", "--no-pretrained"], 1, "unknown architecture"),
])
def test_bad_arguments_and_missing_data_end_with_one_line(tmp_path, args, status, fragment):
    make_pets_like_tree(tmp_path / "pets")
    result = run_cli(args, tmp_path)
    assert result.returncode == status
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [[], ["demo"], ["pets"], ["article"]])
def test_help(tmp_path, command):
    result = run_cli([*command, "--help"], tmp_path)
    assert result.returncode == 0 and "usage: fastai-ls" in result.stdout



def test_demo_on_two_cpu_processes_reports_once(tmp_path, torchrun):
    result = run_cli([*QUICK_DEMO, "--out", "report"], tmp_path, launcher=[*torchrun(), "-m"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ECE after temperature scaling") == 1  # only rank 0 prints
    table = pd.read_csv(tmp_path / "report" / "calibration.csv", index_col="metric")
    assert table.notna().all().all()
