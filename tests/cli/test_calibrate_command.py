"""`fastai-ls calibrate PREDICTIONS.npz` and `save_predictions`: the file format, its round trip from a learner,
the comparison it prints (the same as `compare_calibrators` on the same arrays), and one clear line with exit
status 1 for every bad file."""

from __future__ import annotations

import io
import os
import pickle
import signal
import subprocess
import sys
import threading
import warnings
import zipfile

import fastai.callback.progress  # noqa: F401  (Learner.no_bar)
import numpy as np
import pandas as pd
import pytest
import torch
from fastai.data.core import Datasets
from fastai.data.transforms import ItemGetter
from fastai.learner import Learner
from torch import nn

import fastai_ls.calibration.compare
from fastai_ls import LabelSmoothingCrossEntropy, save_predictions
from fastai_ls.calibration.calibrators import CALIBRATORS, Calibrator
from fastai_ls.calibration.compare import compare_on_logits
from fastai_ls.calibrator_names import CALIBRATOR_NAMES
from fastai_ls.cli import main
from fastai_ls.cli.archive import read_predictions
from fastai_ls.cli.calibrate import quiet_bars
from fastai_ls.cli.tables import best_method
from fastai_ls.integration.posthoc import holdout_logits

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


def test_the_registry_is_built_from_the_names_the_command_lists_without_torch():
    assert tuple(CALIBRATORS) == CALIBRATOR_NAMES
    assert all(cls.name == name for name, cls in CALIBRATORS.items())
    subclasses, found = [Calibrator], set()  # every concrete calibrator with a name is in the registry
    while subclasses:
        cls = subclasses.pop()
        subclasses += cls.__subclasses__()
        if vars(cls).get("name") and not cls.__name__.startswith("_") and cls.__module__.startswith("fastai_ls."):
            found.add(cls.name)
    assert found <= set(CALIBRATOR_NAMES), found - set(CALIBRATOR_NAMES)


def test_the_table_is_the_comparison_of_the_saved_arrays_with_intervals(tmp_path, capsys):
    logits, targets = over_confident()
    np.savez(tmp_path / "p.npz", logits=logits, targets=targets)
    status, out, err = run(["calibrate", str(tmp_path / "p.npz"), "--methods", "temperature,histogram",
                            "--folds", "4", "--seed", "3", "--out", str(tmp_path / "t.csv")], capsys)
    assert status == 0, err
    written = pd.read_csv(tmp_path / "t.csv", index_col="method")
    expected = compare_on_logits(torch.from_numpy(logits), torch.from_numpy(targets),
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
    table = compare_on_logits(torch.from_numpy(read.logits), torch.from_numpy(targets), methods=["temperature"])
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
                             "'targets' must be class ids in [0, 3), but 2 of 5 are not (first: 3 in row 2); drop "
                             "ignored rows (such as -100) before saving; give 'logits' one column per class"),
    # Regression (issue 20, item 7): targets counted from 1 were told to drop ignored rows
    "targets-1-based": (dict(logits=np.zeros((5, 3)), targets=np.array([1, 2, 3, 3, 1])),
                        "'targets' must be class ids in [0, 3), but 2 of 5 are not (first: 3 in row 2); they look "
                        "1-based (from 1 to 3): save targets - 1"),
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


@pytest.mark.slow
def test_a_bad_file_prints_no_traceback_from_the_installed_command(tmp_path):
    np.savez(tmp_path / "bad.npz", probabilities=np.array([[0.3, 0.3]]), targets=np.array([0]))
    result = subprocess.run([sys.executable, "-m", "fastai_ls", "calibrate", "bad.npz"], capture_output=True,
                            text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("fastai-ls: error: bad.npz: 'probabilities' must hold probabilities, rows summing "
                                    "to 1 within 0.02, but 1 of 1 rows do not")


# --- issue 20: what a hostile or mistaken file does ---------------------------------------------------------------


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_zip(path, members: dict[str, bytes], compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def one_error_line(args, capsys) -> str:
    status, out, err = run(args, capsys)
    assert status == 1 and out == "" and err.count("\n") == 1 and "Traceback" not in err, (status, out, err)
    return err


def test_a_pytorch_file_is_named_as_such_with_how_to_save_an_npz(tmp_path, capsys):
    # It listed torch.save's zip internals ("it holds: model/data, model/version, ...").
    torch.save({"logits": torch.zeros(3, 2), "targets": torch.zeros(3)}, tmp_path / "model.pt")
    err = one_error_line(["calibrate", str(tmp_path / "model.pt")], capsys)
    assert "is a PyTorch file (torch.save), not a numpy .npz archive" in err
    assert "np.savez(path, logits=logits.numpy(), targets=targets.numpy())" in err and "save_predictions" in err
    assert "data.pkl" not in err and "version" not in err


class ReadSpy:
    """Records the arrays numpy decompresses (np.load's members and ours both go through `read_array`)."""

    def __init__(self, monkeypatch):
        self.shapes = []
        real = np.lib.format.read_array

        def spy(*args, **kwargs):
            array = real(*args, **kwargs)
            self.shapes.append(array.shape)
            return array

        monkeypatch.setattr(np.lib.format, "read_array", spy)


def test_only_the_arrays_the_command_needs_are_decompressed(tmp_path, capsys, monkeypatch):
    # A 3.9 MB file with an unused zero-filled member drove the command to 4.0 GB: every member was decompressed.
    logits, targets = over_confident(100)
    np.savez_compressed(tmp_path / "p.npz", logits=logits, targets=targets, unused=np.zeros((1000, 1000), np.uint8))
    spy = ReadSpy(monkeypatch)
    read = read_predictions(tmp_path / "p.npz")
    np.testing.assert_array_equal(read.logits, logits)
    assert sorted(spy.shapes) == [(100,), (100, 4)]


def test_declared_shapes_are_checked_before_any_data_is_decompressed(tmp_path, capsys, monkeypatch):
    spy = ReadSpy(monkeypatch)
    # targets that do not match the logits: refused from the two headers alone
    np.savez_compressed(tmp_path / "mismatch.npz", logits=np.zeros((200_000, 10), np.float32),
                        targets=np.zeros(5, np.int64))
    err = one_error_line(["calibrate", str(tmp_path / "mismatch.npz")], capsys)
    assert "'targets' must be (200000,) class ids, one per row of 'logits', got shape (5,)" in err
    # a header that declares 40 GB in a member of a few bytes: damaged or forged, refused before numpy allocates
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 10)})
    write_zip(tmp_path / "forged.npz", {"logits.npy": header.getvalue() + b"\0" * 64,
                                        "targets.npy": npy_bytes(np.zeros(10**9 // 10**6, np.int64))})
    err = one_error_line(["calibrate", str(tmp_path / "forged.npz")], capsys)
    assert "array 'logits' declares shape (1000000000, 10) (float32, 40,000,000,000 bytes), more than its" in err
    assert "the file is damaged" in err
    assert spy.shapes == []


def test_arrays_larger_than_the_memory_are_refused_from_their_headers(tmp_path, capsys, monkeypatch):
    import fastai_ls.cli.archive

    logits, targets = over_confident(100)
    np.savez(tmp_path / "p.npz", logits=logits, targets=targets)
    spy = ReadSpy(monkeypatch)
    monkeypatch.setattr(fastai_ls.cli.archive, "_physical_memory", lambda: 1024)
    err = one_error_line(["calibrate", str(tmp_path / "p.npz")], capsys)
    assert err == f"fastai-ls: error: {tmp_path / 'p.npz'} declares 2,400 bytes of arrays ('logits' (100, 4) " \
        "float32), more than this machine's 1,024 bytes of memory\n"
    assert spy.shapes == []


def test_an_archive_of_many_arrays_gives_a_short_error(tmp_path, capsys):
    # 20,000 members gave a ~200 KB "one-line" error listing every name.
    data = npy_bytes(np.zeros(1))
    write_zip(tmp_path / "many.npz", {f"a{i}.npy": data for i in range(20_000)})
    err = one_error_line(["calibrate", str(tmp_path / "many.npz")], capsys)
    assert "needs an array 'logits' or 'probabilities' beside 'targets' (it holds: 20000 arrays: a0, a1, a2, a3, " \
           "a4, ...)" in err and len(err) < 400


def test_a_member_that_is_not_npy_data_is_one_line(tmp_path, capsys):
    # It was `AttributeError: 'bytes' object has no attribute 'dtype'` and a traceback.
    write_zip(tmp_path / "p.npz", {"logits.npy": b"not an array at all", "targets.npy": npy_bytes(np.zeros(3, int))})
    err = one_error_line(["calibrate", str(tmp_path / "p.npz")], capsys)
    assert f"{tmp_path / 'p.npz'}: array 'logits' is not .npy data (" in err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_fifo_is_refused_at_once_instead_of_blocking(tmp_path, capsys):
    fifo = tmp_path / "p.npz"
    os.mkfifo(fifo)
    finished = threading.Event()

    def unblock():  # the command used to block in open(); a writer that comes and goes ends the read (test fails)
        if not finished.wait(10):
            with open(fifo, "wb"):
                pass

    threading.Thread(target=unblock, daemon=True).start()
    try:
        err = one_error_line(["calibrate", str(fifo)], capsys)
    finally:
        finished.set()
    assert f"{fifo} is a FIFO (named pipe), not an .npz file" in err
    # as --out, it would have blocked when the table was written, after the comparison
    logits, targets = over_confident(100)
    np.savez(tmp_path / "q.npz", logits=logits, targets=targets)
    err = one_error_line(["calibrate", str(tmp_path / "q.npz"), "--out", str(fifo), "--force"], capsys)
    assert f"cannot write {fifo}: it is not a regular file" in err


def test_running_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    logits, targets = over_confident(100)
    np.savez(tmp_path / "p.npz", logits=logits, targets=targets)

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 37.3 GiB for an array with shape (1000000000, 10) and data type float32")

    with monkeypatch.context() as patch:
        patch.setattr(np.lib.format, "read_array", no_memory)
        err = one_error_line(["calibrate", str(tmp_path / "p.npz")], capsys)
    assert err.startswith(f"fastai-ls: error: {tmp_path / 'p.npz'} is too big for this machine's memory (Unable to")

    def torch_no_memory(*args, **kwargs):  # the message of torch's CPU allocator
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: not enough memory: you "
                           "tried to allocate 4000000000 bytes.\nmore detail")

    monkeypatch.setattr(fastai_ls.calibration.compare, "compare_on_logits", torch_no_memory)
    status, out, err = run(["calibrate", str(tmp_path / "p.npz")], capsys)
    assert status == 1 and err.count("\n") == 1
    assert err.startswith(f"fastai-ls: error: {tmp_path / 'p.npz'} is too big for this machine's memory ([enforce")


def test_out_is_never_the_input_under_any_name(tmp_path, capsys):
    # `--out p.npz` exited 0 and replaced the predictions with the CSV table.
    logits, targets = over_confident(100)
    np.savez(tmp_path / "p.npz", logits=logits, targets=targets)
    before = (tmp_path / "p.npz").read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.npz").symlink_to(tmp_path / "p.npz")
    for out in [tmp_path / "p.npz", tmp_path / "sub" / ".." / "p.npz", tmp_path / "link.npz"]:
        for force in ([], ["--force"]):
            err = one_error_line(["calibrate", str(tmp_path / "p.npz"), "--out", str(out), *force], capsys)
            assert f"--out {out} is the predictions file {tmp_path / 'p.npz'}" in err
    err = one_error_line(["calibrate", str(tmp_path / "link.npz"), "--out", str(tmp_path / "p.npz")], capsys)
    assert "is the predictions file" in err
    assert (tmp_path / "p.npz").read_bytes() == before


def test_an_existing_out_is_replaced_only_with_force(tmp_path, capsys):
    logits, targets = over_confident(100)
    np.savez(tmp_path / "p.npz", logits=logits, targets=targets)
    (tmp_path / "t.csv").write_text("an earlier table\n")
    args = ["calibrate", str(tmp_path / "p.npz"), "--methods", "temperature", "--out", str(tmp_path / "t.csv")]
    err = one_error_line(args, capsys)
    assert f"{tmp_path / 't.csv'} exists: pass --force to replace it, or give another --out" in err
    assert (tmp_path / "t.csv").read_text() == "an earlier table\n"
    status, out, err = run([*args, "--force"], capsys)
    assert status == 0, err
    assert pd.read_csv(tmp_path / "t.csv", index_col="method").index.tolist() == ["uncalibrated", "temperature"]


@pytest.mark.parametrize("n, n_classes, args, message", [
    # The comparison ran partly, then failed: "got 88 rows for 100 classes".
    (110, 100, [], "--folds 5 fits each calibrator on 4 of the 5 folds, 88 of the 110 rows, fewer than the 100 "
                   "classes: use --folds 11 or more"),
    (2, 2, [], "2 rows for 2 classes: each calibrator is fitted on all folds but one"),
    (5, 2, ["--folds", "6"], "--folds 6 is more than the 5 rows: use at most --folds 5"),
])
def test_too_few_rows_for_the_folds_is_said_with_the_option_before_any_fit(tmp_path, capsys, monkeypatch, n,
                                                                          n_classes, args, message):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "p.npz", logits=rng.standard_normal((n, n_classes)).astype(np.float32),
             targets=np.arange(n) % n_classes)
    monkeypatch.setattr(fastai_ls.calibration.compare, "compare_on_logits",
                        lambda *a, **k: pytest.fail("compared before checking the folds"))
    err = one_error_line(["calibrate", str(tmp_path / "p.npz"), "--methods", "temperature", *args], capsys)
    assert message in err and "folds=" not in err


class Flushed(io.StringIO):
    """A stdout that records what had been flushed (what a pipe or a log shows) when `flushed` is read."""

    def __init__(self):
        super().__init__()
        self.flushed = ""

    def flush(self):
        super().flush()
        self.flushed = self.getvalue()


def test_what_is_known_before_the_comparison_is_printed_before_it(tmp_path, monkeypatch):
    # The explanation waited for the comparison; what is printed before it is flushed, for a pipe or a log.
    logits, targets = over_confident()
    np.savez(tmp_path / "p.npz", logits=logits, targets=targets)
    stdout = Flushed()
    monkeypatch.setattr(sys, "stdout", stdout)
    seen = []
    real = fastai_ls.calibration.compare.compare_on_logits

    def compare(*args, **kwargs):
        seen.append(stdout.flushed)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastai_ls.calibration.compare, "compare_on_logits", compare)
    assert main(["calibrate", str(tmp_path / "p.npz"), "--methods", "temperature"]) == 0
    printed, = seen
    assert "400 rows, 4 classes, logits" in printed and "cross-fitted: each method is fitted on 4 of 5" in printed
    assert "uncalibrated" not in printed and "uncalibrated" in stdout.getvalue()


def test_quiet_turns_the_progress_bars_off_for_the_comparison(tmp_path, capsys, monkeypatch):
    import fastprogress.fastprogress as fastprogress

    logits, targets = over_confident(100)
    np.savez(tmp_path / "p.npz", logits=logits, targets=targets)
    seen = []
    real = fastai_ls.calibration.compare.compare_on_logits
    monkeypatch.setattr(fastai_ls.calibration.compare, "compare_on_logits",
                        lambda *a, **k: seen.append(fastprogress.NO_BAR) or real(*a, **k))
    for args in ([], ["--quiet"]):
        assert main(["calibrate", str(tmp_path / "p.npz"), "--methods", "temperature", *args]) == 0
    assert seen == [False, True] and fastprogress.NO_BAR is False


def test_quiet_training_prints_the_table_without_the_bars_probe_characters(capsys):
    # `fastai-ls demo --quiet > log` had "█\r" before each row of the training table: fastprogress's console bar
    # prints its fill character and a carriage return when it is made (an encoding probe), even with NO_BAR.
    import fastprogress.fastprogress as fastprogress
    from fastai.test_utils import synth_learner

    learn = synth_learner(n_trn=2, n_val=2)
    probing = fastprogress.ConsoleProgressBar.__init__
    with quiet_bars(True):
        learn.fit(2)
    printed = capsys.readouterr().out
    assert "\u2588" not in printed and "\r" not in printed, repr(printed)
    lines = printed.splitlines()
    assert [line.split()[0] for line in lines] == ["epoch", "0", "1"], printed
    assert lines[0].split()[1:] == ["train_loss", "valid_loss", "time"]
    assert fastprogress.ConsoleProgressBar.__init__ is probing and fastprogress.NO_BAR is False


@pytest.mark.slow  # starts the command in subprocesses
def test_ctrl_c_while_torch_loads_or_the_comparison_runs_is_one_line(tmp_path):
    # Ctrl-C early in a run printed a traceback. The header is printed (and flushed) before torch is imported: the
    # interrupt comes while torch loads or the fits run.
    logits, targets = over_confident(2000)
    np.savez(tmp_path / "p.npz", logits=logits, targets=targets)
    process = subprocess.Popen([sys.executable, "-m", "fastai_ls", "calibrate", "p.npz", "--methods",
                                "dirichlet,matrix"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    first = process.stdout.readline()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert first.startswith("p.npz: 2000 rows, 4 classes, logits")
    assert process.returncode == 130 and err == "\nfastai-ls: interrupted\n", err


@pytest.mark.parametrize("names", [("logits.npy", "logits.npy"), ("logits", "logits.npy")])
def test_an_array_stored_twice_in_the_archive_is_refused(tmp_path, capsys, names):
    # Two members named logits.npy (or logits and logits.npy): the command read the first, np.load reads another,
    # so one file gave two different tables without a word.
    logits, targets = over_confident(100)
    path = tmp_path / "p.npz"
    with zipfile.ZipFile(path, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile's "Duplicate name" warning
        archive.writestr(names[0], npy_bytes(logits))
        archive.writestr(names[1], npy_bytes(np.zeros_like(logits)))
        archive.writestr("targets.npy", npy_bytes(targets))
    err = one_error_line(["calibrate", str(path), "--methods", "temperature"], capsys)
    assert f"{path} holds 2 arrays named 'logits' ({names[0]}, {names[1]}), of which np.load reads one and this " \
        "command another; save one with np.savez(" in err


@pytest.mark.parametrize("target", ["missing/t.csv", "t.csv"])
def test_an_out_that_is_a_dangling_link_is_refused_before_the_comparison(tmp_path, capsys, target):
    # It passed the check, and the write failed after the whole comparison ("[Errno 17] File exists").
    logits, targets = over_confident(100)
    np.savez(tmp_path / "p.npz", logits=logits, targets=targets)
    (tmp_path / "link.csv").symlink_to(tmp_path / target)
    for force in ([], ["--force"]):
        err = one_error_line(["calibrate", str(tmp_path / "p.npz"), "--methods", "temperature", "--out",
                              str(tmp_path / "link.csv"), *force], capsys)
        assert f"cannot write {tmp_path / 'link.csv'}: it is a link to {tmp_path / target}, which does not exist" \
            in err
    assert not (tmp_path / target).exists()


class ClosedAfterTheHeader(io.StringIO):
    """A stdout whose reader went away (`fastai-ls calibrate ... | head -3`) once the header was read."""

    def write(self, text):
        if "uncalibrated" in self.getvalue() + text:
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


def test_the_out_table_is_written_even_when_the_console_reader_went_away(tmp_path, monkeypatch, capsys):
    # With `| head -3`, printing the table failed (Broken pipe) before --out was written: the comparison was lost.
    logits, targets = over_confident(100)
    np.savez(tmp_path / "p.npz", logits=logits, targets=targets)
    monkeypatch.setattr(sys, "stdout", ClosedAfterTheHeader())
    main(["calibrate", str(tmp_path / "p.npz"), "--methods", "temperature", "--out", str(tmp_path / "t.csv")])
    assert pd.read_csv(tmp_path / "t.csv", index_col="method").index.tolist() == ["uncalibrated", "temperature"]
