"""`fastai-ls calibrate PREDICTIONS.npz` and `save_predictions`: the file format, its round trip from a learner,
the comparison it prints (the same as `compare_calibrators` on the same arrays), and one clear line with exit
status 1 for every bad file."""

from __future__ import annotations

import pickle
import subprocess
import sys

import fastai.callback.progress  # noqa: F401  (Learner.no_bar)
import numpy as np
import pandas as pd
import pytest
import torch
from fastai.data.core import Datasets
from fastai.data.transforms import ItemGetter
from fastai.learner import Learner
from torch import nn

from fastai_ls import LabelSmoothingCrossEntropy, save_predictions
from fastai_ls.calibration.calibrators import CALIBRATORS
from fastai_ls.calibration.compare import compare_calibrators
from fastai_ls.cli import main
from fastai_ls.cli.calibrate import best_method, read_predictions
from fastai_ls.cli.main import METHODS
from fastai_ls.posthoc import holdout_logits

N_CLASSES = 4


def over_confident(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float32 logits three times too sharp, and labels drawn from the true probabilities."""
    rng = np.random.default_rng(seed)
    true_logits = 2 * rng.standard_normal((n, N_CLASSES))
    p = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    targets = np.array([rng.choice(N_CLASSES, p=row) for row in p])
    return (3 * true_logits).astype(np.float32), targets


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(z.dtype)


def run(args: list[str], capsys) -> tuple[int, str, str]:
    status = main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_the_command_knows_every_calibrator():
    # The parser lists them without importing torch; the list must stay the registry's.
    assert METHODS == tuple(CALIBRATORS)


def test_the_table_is_the_comparison_of_the_saved_arrays_with_intervals(tmp_path, capsys):
    logits, targets = over_confident()
    np.savez(tmp_path / "p.npz", logits=logits, targets=targets)
    status, out, err = run(["calibrate", str(tmp_path / "p.npz"), "--methods", "temperature,histogram",
                            "--folds", "4", "--seed", "3", "--out", str(tmp_path / "t.csv")], capsys)
    assert status == 0, err
    written = pd.read_csv(tmp_path / "t.csv", index_col="method")
    expected = compare_calibrators(torch.from_numpy(logits), torch.from_numpy(targets),
                                   methods=["temperature", "histogram"], folds=4, seed=3)
    pd.testing.assert_frame_equal(written.drop(columns="fit_s"), expected.drop(columns="fit_s"), check_dtype=False)
    # every shown metric as `estimate [lower, upper]`, the table's own numbers
    row = out.splitlines()[[line.split()[0] if line.split() else "" for line in out.splitlines()].index("temperature")]
    t = expected.loc["temperature"]
    for name in ("error_rate", "ece", "smece", "nll", "brier", "aurc"):
        assert f"{t[name]:.4f} [{t[name + '_lo']:.4f}, {t[name + '_hi']:.4f}]" in row
    assert "400 rows, 4 classes, logits" in out and "4 of 4" not in out and "3 of 4 stratified folds" in out
    assert f"lowest NLL: {best_method(expected)}" in out


def test_probabilities_are_read_as_their_logs_and_zeros_are_said(tmp_path, capsys):
    logits, targets = over_confident(200, seed=1)
    probs = softmax(logits)
    probs[0] = 0.0
    probs[0, (targets[0] + 1) % N_CLASSES] = 1.0  # the target ruled out: an infinite NLL
    probs[1, (targets[1] + 1) % N_CLASSES] += probs[1, targets[1]]
    probs[1, targets[1]] = 0.0
    np.savez(tmp_path / "p.npz", probabilities=probs, targets=targets)
    read = read_predictions(tmp_path / "p.npz")
    assert read.source == "probabilities" and read.zeros == 4 and read.target_zeros == 2
    with np.errstate(divide="ignore"):
        np.testing.assert_array_equal(read.logits, np.log(probs))
    assert read.logits.dtype == np.float32 and read.targets.dtype == np.int64
    status, out, err = run(["calibrate", str(tmp_path / "p.npz"), "--methods", "temperature"], capsys)
    assert status == 0, err
    assert "4 probabilities are exactly 0: each is a -inf logit" in out
    # float32 probabilities: a target probability of 0 counts -log(float32's smallest normal) = 87.3 nats
    assert "2 rows give their target probability 0, an infinite NLL: the 'uncalibrated' row counts 87.3 nats" in out
    # the calibrators give those targets a positive probability (a -inf logit stands for the row's lowest finite
    # logit minus 104): the calibrated NLL is finite and lower
    table = compare_calibrators(torch.from_numpy(read.logits), torch.from_numpy(targets), methods=["temperature"])
    assert table.loc["uncalibrated", "nll"] > 2 * 87.3 / 200
    assert np.isfinite(table.loc["temperature", "nll"]) and table.loc["temperature", "nll"] < table.loc[
        "uncalibrated", "nll"]


class PassLogits(nn.Module):
    """Returns its input as the logits (fastai needs a parameter to find the model's device)."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x


def tiny_learner(n: int = 120, seed: int = 0) -> Learner:
    """A "model" that returns its input as logits; the validation set is every row."""

    logits, targets = over_confident(n, seed)
    dsets = Datasets(list(zip(torch.from_numpy(logits), torch.from_numpy(targets))), [[ItemGetter(0)], [ItemGetter(1)]],
                     splits=(list(range(10)), list(range(n))))
    return Learner(dsets.dataloaders(bs=32, num_workers=0, device="cpu"), PassLogits(),
                   loss_func=LabelSmoothingCrossEntropy(0.1))


def test_save_predictions_writes_the_raw_logits_and_targets_the_command_reads(tmp_path, capsys):
    learn = tiny_learner()
    with learn.no_bar():
        path = save_predictions(learn, tmp_path / "valid")
        logits, targets = holdout_logits(learn)
    assert path == tmp_path / "valid.npz" and path.is_file()  # numpy's suffix, said in the return value
    with np.load(path) as saved:
        assert sorted(saved.files) == ["logits", "targets"]
    read = read_predictions(path)
    np.testing.assert_array_equal(read.logits, logits.numpy())
    np.testing.assert_array_equal(read.targets, targets.numpy())
    assert read.source == "logits" and read.logits.dtype == np.float32
    status, out, err = run(["calibrate", str(path), "--methods", "temperature", "--folds", "3"], capsys)
    assert status == 0 and "120 rows, 4 classes, logits" in out, err


BAD_FILES = {
    "missing-targets": (dict(logits=np.zeros((5, 3), np.float32)), "needs an array 'targets' of class ids (it holds: "
                        "logits)"),
    "neither": (dict(scores=np.zeros((5, 3)), targets=np.zeros(5, int)), "needs an array 'logits' or 'probabilities'"),
    "both": (dict(logits=np.zeros((5, 3)), probabilities=np.full((5, 3), 1 / 3), targets=np.zeros(5, int)),
             "holds both 'logits' and 'probabilities'"),
    "1-d-logits": (dict(logits=np.zeros(5), targets=np.zeros(5, int)), "'logits' must be (N, C)"),
    "one-class": (dict(logits=np.zeros((5, 1)), targets=np.zeros(5, int)), "C >= 2 classes, got shape (5, 1)"),
    "text-logits": (dict(logits=np.array([["a", "b"]]), targets=np.zeros(1, int)), "must hold real numbers"),
    "targets-too-short": (dict(logits=np.zeros((5, 3)), targets=np.zeros(4, int)), "'targets' must be (5,) class ids"),
    "one-hot-targets": (dict(logits=np.zeros((5, 3)), targets=np.eye(3)[[0, 1, 2, 0, 1]]),
                        "one-hot? save targets.argmax(1)"),
    "fractional-targets": (dict(logits=np.zeros((5, 3)), targets=np.array([0, 1, 0.5, 2, 1])),
                           "integer class ids, got 0.5 in row 2"),
    "targets-out-of-range": (dict(logits=np.zeros((5, 3)), targets=np.array([0, 1, 3, 2, -100])),
                             "2 of 5 targets are not class ids in [0, 3) (first: 3 in row 2)"),
    "nan-logit": (dict(logits=np.array([[0, 1], [np.nan, 0], [1, 0]]), targets=np.array([0, 1, 0])),
                  "'logits' hold NaN or +inf (or no finite value) in 1 of 3 rows (first: row 1)"),
    "all-minus-inf-row": (dict(logits=np.array([[0, 1], [-np.inf, -np.inf]]), targets=np.array([0, 1])),
                          "(or no finite value) in 1 of 2 rows (first: row 1)"),
    "nan-probability": (dict(probabilities=np.array([[0.5, 0.5], [np.nan, 1]]), targets=np.array([0, 1])),
                        "'probabilities' hold NaN or inf in 1 of 2 rows (first: row 1)"),
    "negative-probability": (dict(probabilities=np.array([[0.5, 0.5], [-0.5, 1.5]]), targets=np.array([0, 1])),
                             "'probabilities' must hold probabilities in [0, 1], but 1 of 2 rows do not (first: row 1"),
    "rows-not-summing-to-1": (dict(probabilities=np.array([[0.5, 0.5], [0.3, 0.3]]), targets=np.array([0, 1])),
                              "rows summing to 1 within 0.02, but 1 of 2 rows do not (first: row 1 sums to 0.6)"),
    "logits-saved-as-probabilities": (dict(probabilities=np.array([[0.2, 0.7], [0.6, 0.3]]) * 3,
                                           targets=np.array([0, 1])), "save them as 'logits'"),
}


@pytest.mark.parametrize("arrays, message", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_a_bad_file_is_one_clear_line_and_exit_status_1(tmp_path, capsys, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    status, out, err = run(["calibrate", str(tmp_path / "bad.npz")], capsys)
    assert status == 1 and out == ""
    assert err.startswith(f"fastai-ls: error: {tmp_path / 'bad.npz'}") and err.count("\n") == 1, err
    assert message in err


def test_a_file_that_is_no_npz_archive_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "text.npz").write_text("logits,targets\n1,2\n")
    (tmp_path / "empty.npz").write_bytes(b"")
    with open(tmp_path / "pickled.npz", "wb") as file:
        pickle.dump({"logits": np.zeros((3, 2)), "targets": np.zeros(3, int)}, file)
    np.save(tmp_path / "single.npy", np.zeros((3, 2)))
    np.savez(tmp_path / "objects.npz", logits=np.array([object(), None]), targets=np.zeros(2, int))
    cases = {"text.npz": "is not a numpy .npz archive (it starts with b'logits'",
             "empty.npz": "is not a numpy .npz archive (the file is empty)",
             "pickled.npz": "is not a numpy .npz archive (a pickle, which is never loaded here",
             "single.npy": "holds a single array, not an .npz archive",
             "missing.npz": "no such file", "objects.npz": "cannot read array 'logits'", ".": "is a folder"}
    for name, message in cases.items():
        status, out, err = run(["calibrate", str(tmp_path / name)], capsys)
        assert status == 1 and out == "" and err.count("\n") == 1 and message in err, (name, err)
        # numpy's own message for a file that is neither zip nor .npy said to load it with allow_pickle or
        # pickle.load(): advice to run a file's code.
        assert "allow_pickle" not in err and "pickle.load" not in err, (name, err)


def test_save_predictions_checks_its_path_before_predicting(tmp_path, monkeypatch):
    # A bad path failed in np.savez, after the pass over the data ("Path('.') has an empty name" for '').
    learn = tiny_learner()
    monkeypatch.setattr(learn, "get_preds", lambda *a, **k: pytest.fail("predicted before checking the path"))
    (tmp_path / "folder.npz").mkdir()
    for path, error, message in [("", ValueError, "path must name a file, got '.'"),
                                 (tmp_path / "no" / "p.npz", FileNotFoundError, "no folder"),
                                 (tmp_path / "folder.npz", IsADirectoryError, "it is a folder")]:
        with pytest.raises(error, match=message):
            save_predictions(learn, path)


@pytest.mark.parametrize("args, message", [
    (["calibrate", ""], "PREDICTIONS.npz: expected a path, got ''"),
    (["calibrate", "p.npz", "--out", ""], "--out: expected a path, got ''"),
    (["demo", "--out", ""], "--out: expected a path, got ''"),  # was the current folder, after both trainings
    (["pets", "--path", " "], "--path: expected a path, got ' '"),
])
def test_an_empty_path_is_refused_by_the_parser(capsys, args, message):
    with pytest.raises(SystemExit) as exit:
        main(args)
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_an_unwritable_out_is_refused_before_the_comparison(tmp_path, capsys):
    logits, targets = over_confident(100)
    np.savez(tmp_path / "p.npz", logits=logits, targets=targets)
    status, out, err = run(["calibrate", str(tmp_path / "p.npz"), "--out", str(tmp_path / "no" / "t.csv")], capsys)
    assert status == 1 and out == "" and f"cannot write {tmp_path / 'no' / 't.csv'}: no folder" in err
    status, out, err = run(["calibrate", str(tmp_path / "p.npz"), "--out", str(tmp_path)], capsys)
    assert status == 1 and "it is a folder" in err


@pytest.mark.parametrize("args, message", [
    (["--methods", "tempreture"], "--methods: unknown method 'tempreture' (did you mean 'temperature'?)"),
    (["--methods", "temperature,temperature"], "--methods: expected distinct comma-separated method names"),
    (["--folds", "1"], "--folds: expected an integer >= 2, got '1'"),
])
def test_bad_options_exit_with_status_2(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit:
        main(["calibrate", "p.npz", *args])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastai-ls calibrate: error: {message}") and err.count("\n") == 1


def test_a_bad_file_prints_no_traceback_from_the_installed_command(tmp_path):
    np.savez(tmp_path / "bad.npz", probabilities=np.array([[0.3, 0.3]]), targets=np.array([0]))
    result = subprocess.run([sys.executable, "-m", "fastai_ls", "calibrate", "bad.npz"], capture_output=True,
                            text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("fastai-ls: error: bad.npz: 'probabilities' must hold probabilities, rows summing "
                                    "to 1 within 0.02, but 1 of 1 rows do not")
