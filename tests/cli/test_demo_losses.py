"""`fastai-ls demo --losses ... --seeds N`: the loss comparison from the command line, its argument errors (one
line, before anything trains), its tables and files; one real run on a few digits."""

from __future__ import annotations

import pandas as pd
import pytest

import fastai_ls.cli.losses
import fastai_ls.integration.compare_losses as compare_module
from fastai_ls.cli import main
from fastai_ls.digits import digits_learner


@pytest.mark.parametrize("args, message", [
    (["--losses", "ce,lsx"], "fastai-ls demo: error: --losses: unknown loss 'lsx' (did you mean 'ls'?); known: "
                             "ce,ls,focal,flsd53,mbls,maxsup,logitnorm (see fastai-ls demo --help)\n"),
    (["--losses", "ce,ce"], "fastai-ls demo: error: --losses: each loss may be named once, got ce,ce (see fastai-ls "
                            "demo --help)\n"),
    (["--losses", "ce", "--seeds", "0"], "fastai-ls demo: error: --seeds: expected a positive integer, got '0' (see "
                                         "fastai-ls demo --help)\n"),
])
def test_bad_loss_arguments_are_one_line_with_exit_status_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *args])
    assert exit_info.value.code == 2 and capsys.readouterr().err == message


@pytest.mark.parametrize("args, message", [
    (["--seeds", "3"], "--seeds is for --losses"),
    (["--losses", "ce,ls", "--eps", "0.2"], "--eps sets the second model of the two-model demo"),
])
def test_options_of_the_other_demo_are_refused_before_any_training(args, message, capsys, monkeypatch):
    monkeypatch.setattr(compare_module, "train", lambda *a, **k: pytest.fail("trained"))
    assert main(["demo", *args]) == 1
    assert capsys.readouterr().err.startswith(f"fastai-ls: error: {message}")


def test_the_options_reach_the_comparison(monkeypatch):
    calls = []
    monkeypatch.setattr(fastai_ls.cli.losses, "compare_losses", lambda *args: calls.append(args))
    monkeypatch.setattr(fastai_ls.cli.losses, "writable_folder", lambda out, force, names: out)
    assert main(["demo", "--losses", "ls,ce", "--seeds", "3", "--seed", "5", "--epochs", "2", "--label-noise", "0.2",
                 "--methods", "temperature", "--folds", "4", "--max-items", "100"]) == 0
    (make, losses, seeds, epochs, seed, methods, folds), = calls
    assert make.func is digits_learner and make.keywords["label_noise"] == 0.2 and make.keywords["max_items"] == 100
    assert (losses, seeds, epochs, seed, methods, folds) == (["ls", "ce"], 3, 2, 5, ["temperature"], 4)


@pytest.mark.slow  # four small trainings and their calibrators
def test_a_real_comparison_prints_both_stages_and_writes_its_tables(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTAI_HOME", str(tmp_path / "fastai"))
    out = tmp_path / "losses"
    args = ["demo", "--losses", "ce,ls", "--seeds", "2", "--epochs", "1", "--max-items", "100", "--bs", "16",
            "--methods", "temperature", "--quiet", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "training 4/4: label smoothing 0.1, seed 43" in text
    for heading in ("as trained:", "as trained, minus ce", "best calibrator:", "best calibrator, minus ce"):
        assert f"\n{heading}" in text, heading
    table = pd.read_csv(out / "losses.csv", index_col=[0, 1, 2])
    assert table.shape == (2 * 2 * 6, 6) and table.index.get_level_values("loss").unique().tolist() == ["ce", "ls"]
    per_seed = pd.read_csv(out / "losses_per_seed.csv", index_col=[0, 1, 2])
    assert per_seed.index.get_level_values("seed").unique().tolist() == [42, 43]
    assert f"wrote losses.csv, losses_per_seed.csv into {out}" in text
    assert main(args) == 1  # an earlier comparison is not replaced without --force
    assert "already holds losses.csv, losses_per_seed.csv" in capsys.readouterr().err
