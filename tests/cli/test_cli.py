"""The `fastai-ls` command: the README's demo, the Pets job, one-line errors found before any training, and a run
on 2 CPU processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

import fastai_ls
from fastai_ls.calibrator_names import CALIBRATOR_NAMES
from fastai_ls.cli import main
from fastai_ls.cli.demo import METRICS
from fastai_ls.cli.main import ARTICLE_TARGET, article_table
from fastai_ls.cli.tables import best_method
from fastai_ls.pets import make_pets_like_tree, pets_learner

QUICK_DEMO = ["demo", "--epochs", "1", "--max-items", "240", "--bs", "32", "--methods", "temperature,histogram",
              "--label-noise", "0.25"]
FIGURES = ["reliability.png", "smooth_reliability.png", "calibrated_reliability.png"]
INTERVAL = r"\d\.\d{4} \[\d\.\d{4}, \d\.\d{4}\]"  # estimate [lower, upper]


def run_cli(args, tmp_path, env=None, launcher=None, stderr=subprocess.PIPE):
    env = {**os.environ, "FASTAI_HOME": str(tmp_path / "fastai"), "TORCH_HOME": str(tmp_path / "torch"),
           "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", **(env or {})}
    command = (launcher or [sys.executable, "-m"]) + ["fastai_ls", *args]
    return subprocess.run(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=tmp_path,
                          timeout=600)


@pytest.mark.slow
def test_article_prints_the_seed_numbers(tmp_path):
    result = run_cli(["article"], tmp_path)
    assert result.returncode == 0
    for value in ["0.0018", "0.2352", "0.3518", "0.0007", "0.2641", "0.3957"]:
        assert value in result.stdout


def test_article_says_what_others_is_and_its_rows_are_that_target():
    # The table's smoothing column said "others" and nothing said what it is.
    lines = article_table().splitlines()
    said = [line for line in lines if line.startswith("others:")]
    assert len(said) == 1 and "smoothing='others'" in said[0], lines
    assert "1-eps on the true class" in said[0] and "eps/(C-1) on each other class" in said[0]
    rows = [line.rsplit(maxsplit=4) for line in lines if line.split()[-3:-2] == ["others"]]
    assert len(rows) == 2
    for logits, eps, _, ours, _ in rows:
        x, eps = torch.tensor(json.loads(logits), dtype=torch.float64), float(eps)
        y = torch.tensor(ARTICLE_TARGET)
        target = torch.full_like(x, eps / (x.shape[1] - 1)).scatter(1, y[:, None], 1 - eps)
        assert float(ours) == pytest.approx(-(target * x.log_softmax(1)).sum(1).mean().item(), abs=5e-5)


@pytest.mark.slow
def test_demo_says_what_it_does_then_prints_the_table_and_writes_csv_and_diagrams(tmp_path):
    result = run_cli([*QUICK_DEMO, "--out", "report"], tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    models = ["cross-entropy", "label smoothing 0.1"]
    # calibration.csv: every metric of each model with its interval (classwise ECE has none)
    table = pd.read_csv(tmp_path / "report" / "calibration.csv", index_col=["model", "metric"])
    assert list(table.columns) == ["estimate", "lower", "upper"]
    assert table.index.tolist() == [(m, metric) for m in models for metric in METRICS]
    assert table["estimate"].notna().all() and ((table.loc[(slice(None), "ece"), "estimate"] <= 1).all())
    bounded = table.drop(index="classwise_ece", level="metric")
    assert bounded.notna().all().all() and (bounded["lower"] <= bounded["upper"]).all()
    assert table.loc[(slice(None), "classwise_ece"), ["lower", "upper"]].isna().all().all()
    # the printed table: each metric as `estimate [lower, upper]`, the CSV's numbers
    for model in models:
        for metric, label in METRICS.items():
            estimate, lower, upper = table.loc[(model, metric)]
            shown = f"{estimate:.4f}" if metric == "classwise_ece" else f"{estimate:.4f} [{lower:.4f}, {upper:.4f}]"
            line = next(line for line in out.splitlines() if line.startswith(f"{label}  "))
            assert shown in line, (label, shown, line)
    # the calibrators, cross-fitted on the validation set, for both models; the model's own row is its metrics
    compared = pd.read_csv(tmp_path / "report" / "calibrators.csv", index_col=["model", "method"])
    assert compared.index.tolist() == [(m, r) for m in models for r in ("uncalibrated", "temperature", "histogram")]
    for model in models:
        for metric in ("ece", "nll", "brier"):
            assert compared.loc[(model, "uncalibrated"), metric] == pytest.approx(table.loc[(model, metric),
                                                                                            "estimate"], abs=1e-6)
        for method in ("temperature", "histogram"):
            row = next(line for line in out.split(f"{model}: post-hoc calibrators")[1].splitlines()
                       if line.startswith(method))
            assert len(re.findall(INTERVAL, row)) == 5, row  # error rate, ECE, smooth ECE, NLL, Brier
    assert out.count("lowest NLL: ") == 2 and "before and after the best calibrator" in out
    # label smoothing minus cross-entropy, image by image: the differences of the two tables' numbers
    differences = pd.read_csv(tmp_path / "report" / "differences.csv", index_col=["stage", "metric"])
    ce, ls = models
    best = {m: best_method(compared.loc[m]) for m in models}
    for metric in ("nll", "brier"):
        assert differences.loc[("before", metric), "estimate"] == pytest.approx(
            table.loc[(ls, metric), "estimate"] - table.loc[(ce, metric), "estimate"], abs=1e-5)
        assert differences.loc[("after", metric), "estimate"] == pytest.approx(
            compared.loc[(ls, best[ls]), metric] - compared.loc[(ce, best[ce]), metric], abs=1e-5)
    assert (differences["lower"] <= differences["estimate"]).all()
    assert (differences["estimate"] <= differences["upper"]).all()
    assert "label smoothing 0.1 minus cross-entropy, image by image on the same 50 validation images" in out
    assert "cross-fitted" in out and "no image is scored by a calibrator fitted on it" in out
    # the old rows fitted T and scored it on the same rows: gone
    assert "ECE after temperature scaling" not in out and "ECE after temperature scaling" not in table.index
    for name in FIGURES:
        width, height = Image.open(tmp_path / "report" / name).size
        assert width > height  # two diagrams side by side
    # the digits are written on first use, and each progress table is preceded by the model it trains
    written = out.index("writing scikit-learn's 1797 digit scans as PNG files into ")
    first = out.index("training 1/2: cross-entropy: fit_one_cycle(1) on 190 training images (48 of their labels "
                      "replaced by a wrong class) and 50 validation images")
    second = out.index("training 2/2: label smoothing 0.1: fit_one_cycle(1) on 190 training images (48 of their "
                       "labels replaced by a wrong class) and 50 validation images")
    headers = [i for i in range(len(out)) if out.startswith("epoch     train_loss", i)]
    assert len(headers) == 2 and written < first < headers[0] < second < headers[1] < out.index("calibration on")
    assert str(tmp_path / "fastai" / "data" / "sklearn_digits") in out[written:first]


@pytest.mark.slow
def test_pets_command_runs_on_an_extracted_tree(tmp_path):
    root = make_pets_like_tree(tmp_path / "pets")
    result = run_cli(["pets", "--path", str(root), "--no-pretrained", "--arch", "resnet18", "--size", "32",
                      "--presize", "40", "--bs", "8", "--epochs", "1", "--num-workers", "0", "--baseline",
                      "--methods", "temperature,vector", "--out", "out"], tmp_path)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path / "out" / "calibration.csv", index_col=["model", "metric"])
    assert table.index.get_level_values("model").unique().tolist() == ["cross-entropy", "label smoothing 0.1"]
    assert "training 1/2: cross-entropy: fit_one_cycle(1) on 26 training images and 6 validation images" in \
        result.stdout


def test_pets_options_reach_pets_learner(monkeypatch):
    import fastai_ls.cli.demo

    calls = []
    monkeypatch.setattr(fastai_ls.cli.demo, "compare", lambda make, runs, **kwargs: calls.append((make, runs, kwargs)))
    assert main(["pets", "--path", "P", "--presize", "300", "--size", "160", "--bs", "16", "--arch", "resnet18",
                 "--no-pretrained", "--num-workers", "0", "--seed", "7", "--eps", "0.2", "--epochs", "2"]) == 0
    (make, runs, kwargs), = calls
    assert make.func is pets_learner
    assert make.keywords == dict(path="P", arch="resnet18", pretrained=False, bs=16, presize=300, size=160,
                                 num_workers=0, seed=7)
    assert runs == {"label smoothing 0.2": 0.2}
    # its own default folder: a pets run must not replace the demo's files (found in review)
    assert kwargs == dict(epochs=2, out="fastai_ls_pets", seed=7, methods=list(CALIBRATOR_NAMES), folds=5, force=False,
                          quiet=False)


def non_pets_photos(folder):
    folder.mkdir()
    for name in ["IMG_0042.jpg", "holiday.png"]:
        Image.new("RGB", (20, 20)).save(folder / name)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("args, line", [
    (["pets", "--path", "pets", "--no-pretrained"],  # 26 training images, no batch of 64
     "fastai-ls: error: no training batch: the training set has 26 images, fewer than one batch (bs=64), and "
     "fastai drops the last partial training batch. Pass a smaller bs (at most 26) or use more images."),
    (["pets", "--path", "photos", "--no-pretrained"],
     f"fastai-ls: error: {Path('photos') / 'holiday.png'} is not named <breed>_<n>.jpg like the Oxford-IIIT Pets "
     "images (e.g. Abyssinian_1.jpg, american_pit_bull_terrier_12.jpg): the breed is read from the file name "
     "(1 of 2 images do not match)"),
    (["demo", "--out", "a_file/report"], "fastai-ls: error: cannot write the report into a_file/report: "),
], ids=["too-few-images-for-a-batch", "not-pets-file-names", "out-not-writable"])
def test_data_errors_are_one_line_before_any_training(tmp_path, args, line):
    make_pets_like_tree(tmp_path / "pets")
    non_pets_photos(tmp_path / "photos")
    (tmp_path / "a_file").write_text("")
    result = run_cli(args, tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(line) and result.stderr.count("\n") == 1, result.stderr
    assert "epoch" not in result.stdout and "training 1/" not in result.stdout
    assert not (tmp_path / "fastai" / "data" / "sklearn_digits").exists()  # --out is checked before the data


@pytest.mark.slow
def test_missing_pets_offline_is_one_line_with_no_progress_bar_before_it(tmp_path):
    """fastdownload starts a progress bar (fastprogress prints '\u2588\\r' on stdout) before it opens the URL: an
    offline run printed it in front of the error. The proxy variables make any download fail at once, here and
    on a machine with a network."""
    offline = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "no_proxy": "",
               "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    result = run_cli(["pets"], tmp_path, env=offline, stderr=subprocess.STDOUT)
    assert result.returncode == 1
    assert result.stdout.startswith("fastai-ls: error: Oxford-IIIT Pets is not in ") and "\u2588" not in result.stdout
    assert result.stdout.count("\n") == 1 and "oxford-iiit-pet.tgz" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["demo", "--epochs", "abc"], "fastai-ls demo: error: --epochs: expected a positive integer, got 'abc'"),
    (["demo", "--epochs", "0"], "fastai-ls demo: error: --epochs: expected a positive integer, got '0'"),
    (["demo", "--bs", "2.5"], "fastai-ls demo: error: --bs: expected a positive integer, got '2.5'"),
    (["demo", "--max-items", "-3"],
     "fastai-ls demo: error: --max-items: expected an integer of at least 20 (two images of each digit), got '-3'"),
    # below 20 is a bad option value (status 2), not an error after startup (status 1; found in review)
    (["demo", "--max-items", "10"],
     "fastai-ls demo: error: --max-items: expected an integer of at least 20 (two images of each digit), got '10'"),
    (["demo", "--seed", "x"], "fastai-ls demo: error: --seed: expected an integer from 0 to 4294967295, got 'x'"),
    (["demo", "--eps", "1.5"], "fastai-ls demo: error: --eps: expected a number in [0, 1), got '1.5'"),
    (["pets", "--eps", "nan"], "fastai-ls pets: error: --eps: expected a number in [0, 1), got 'nan'"),
    (["pets", "--epochs", "abc"], "fastai-ls pets: error: --epochs: expected a positive integer, got 'abc'"),
    (["pets", "--bs", "0"], "fastai-ls pets: error: --bs: expected a positive integer, got '0'"),
    (["pets", "--size", "big"], "fastai-ls pets: error: --size: expected a positive integer, got 'big'"),
    (["pets", "--presize", "0"], "fastai-ls pets: error: --presize: expected a positive integer, got '0'"),
    (["pets", "--num-workers", "-1"],
     "fastai-ls pets: error: --num-workers: expected a non-negative integer, got '-1'"),
    (["pets", "--seed", "-1"], "fastai-ls pets: error: --seed: expected an integer from 0 to 4294967295, got '-1'"),
    (["bake"], "fastai-ls: error: command: invalid choice: 'bake'"),
])
def test_bad_option_values_name_the_option_and_what_it_expects(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(args)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and err.rstrip().endswith("--help)")


@pytest.mark.slow
@pytest.mark.parametrize("args, status, fragment", [
    (["pets", "--path", "no/such/folder"], 1, "no Pets images"),
    (["pets", "--path", "pets", "--arch", "resnet_typo", "--no-pretrained", "--bs", "8"], 1, "unknown architecture"),
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


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.startswith(f"fastai-ls {fastai_ls.__version__} (fastai ")


@pytest.mark.slow
def test_demo_on_two_cpu_processes_reports_once(tmp_path, torchrun):
    result = run_cli([*QUICK_DEMO, "--out", "report"], tmp_path, launcher=[*torchrun(), "-m"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("before and after the best calibrator") == 1  # only rank 0 prints
    # The calibrators see each validation image once, with its own target and the logits the callback scored: the
    # model's own row of their table is the callback's metrics. (Outside the distributed context, fastai's
    # get_preds on every process paired logits with other images' targets; and on CPUs, without SyncBatchNorm,
    # each process keeps BatchNorm statistics of its own shard, so one process alone predicts differently.)
    assert result.stdout.count("post-hoc calibrators, cross-fitted on the 50 validation images") == 2
    table = pd.read_csv(tmp_path / "report" / "calibration.csv", index_col=["model", "metric"])
    assert table["estimate"].notna().all()
    compared = pd.read_csv(tmp_path / "report" / "calibrators.csv", index_col=["model", "method"])
    for model in ("cross-entropy", "label smoothing 0.1"):
        for metric in ("ece", "nll", "brier"):
            assert compared.loc[(model, "uncalibrated"), metric] == pytest.approx(
                table.loc[(model, metric), "estimate"], abs=1e-5)


def test_ctrl_c_ends_with_one_line_and_status_130(tmp_path, monkeypatch, capsys):
    # Ctrl-C during training printed an 80-line traceback from inside torch's conv2d.
    cli_main = sys.modules[main.__module__]  # `fastai_ls.cli.main` is also the name of the function

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_main, "_demo", interrupted)
    assert main(["demo", "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "\nfastai-ls: interrupted\n"


def test_ctrl_c_while_the_arguments_are_read_is_one_line_too(monkeypatch, capsys):
    # Ctrl-C in the first tenth of a second (before the subcommand ran) printed a traceback.
    cli_main = sys.modules[main.__module__]

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_main, "build_parser", interrupted)
    try:
        status = main(["demo"])
    except KeyboardInterrupt:
        status = "a traceback"
    assert status == 130 and capsys.readouterr().err == "\nfastai-ls: interrupted\n"


def test_the_sigint_handler_is_ours_while_a_command_runs_and_restored_after(monkeypatch):
    cli_main = sys.modules[main.__module__]
    seen = []
    monkeypatch.setattr(cli_main, "_article", lambda args: seen.append(signal.getsignal(signal.SIGINT)))
    before = signal.getsignal(signal.SIGINT)
    assert main(["article"]) == 0
    assert seen == [cli_main._interrupt] and signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("command", ["demo", "pets"])
def test_help_names_every_file_the_command_writes(command, capsys):
    # demo --help named calibration.csv and calibrators.csv: not differences.csv, selective.csv or the PNG files.
    from fastai_ls.cli.demo_write import OUTPUT_FILES
    from fastai_ls.cli.losses import LOSS_FILES

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in OUTPUT_FILES + (LOSS_FILES if command == "demo" else ()):
        assert re.search(rf"(?<![\w.]){re.escape(name)}", text), name


@pytest.mark.parametrize("command", ["demo", "pets", "calibrate"])
def test_help_never_breaks_a_method_name_or_an_option_across_lines(command, monkeypatch, capsys):
    # argparse wrapped the --methods list mid-word ("iso tonic", "top_lab el_isotonic"): copied, a wrong name.
    for columns in range(40, 121, 4):
        monkeypatch.setenv("COLUMNS", str(columns))
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # the lines joined: a name cut in two stays cut
        default = text[text.index("(default: all"):]
        for name in CALIBRATOR_NAMES:
            assert re.search(rf"(?<!\w){name}(?!\w)", default), (columns, name, default[:200])
        for option in re.findall(r"--[a-z-]+", text):
            assert option.rstrip("-") in {"--help", "--methods", "--folds", "--force", "--quiet", "--out", "--seed",
                                          "--epochs", "--eps", "--bs", "--max-items", "--label-noise", "--path",
                                          "--arch", "--no-pretrained", "--presize", "--size", "--num-workers",
                                          "--baseline", "--losses", "--seeds"}, (columns, option)


@pytest.fixture
def fake_runs(monkeypatch):
    """`compare` with the training replaced: each run's held-out rows are over-confident random logits, and its
    callback's state is their softmax."""
    import fastai_ls.cli.demo as demo
    from fastai_ls.calibration import CalibrationState

    def held_out(n=120, n_classes=4):
        g = torch.Generator().manual_seed(0)
        logits = 2 * torch.randn(n, n_classes, generator=g)
        target = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
        return 3 * logits, target

    class Callback:
        def __init__(self, logits, target):
            self.state = CalibrationState(logits.shape[1])
            self.state.update(logits.softmax(1), target)

        def state_of(self, i):
            return self.state

    rows = {"n": 120, "n_classes": 4}
    monkeypatch.setattr(demo, "train", lambda make, eps, epochs, seed, label="": eps)
    monkeypatch.setattr(demo, "validation_logits", lambda learn: held_out(**rows))
    monkeypatch.setattr(demo, "calibration_callback", lambda learn: Callback(*held_out(**rows)))
    monkeypatch.setattr(demo, "reliability_figure", lambda *a, **k: type("Figure", (), {
        "savefig": lambda self, path, **k: Path(path).write_bytes(b"png")})())
    return rows


def test_the_demo_prints_the_models_calibration_before_comparing_calibrators(fake_runs, tmp_path, monkeypatch):
    # The calibration table waited about 5 minutes for the calibrators' comparison.
    from test_calibrate_command import Flushed

    import fastai_ls.cli.demo as demo

    stdout = Flushed()
    monkeypatch.setattr(sys, "stdout", stdout)
    seen, real = [], demo.calibrate_learner

    def calibrate_learner(*args):
        seen.append(stdout.flushed)
        return real(*args)

    monkeypatch.setattr(demo, "calibrate_learner", calibrate_learner)
    assert main(["demo", "--methods", "temperature", "--out", str(tmp_path / "report")]) == 0
    first, second = seen
    assert "calibration on the 120 validation images" in first and "\nECE  " in first
    assert "post-hoc calibrators" not in first
    # the first model's comparison is shown before the second one's starts
    assert "cross-entropy: post-hoc calibrators" in second and "label smoothing 0.1: post-hoc" not in second


def test_the_demo_names_the_folds_option_when_the_rows_are_too_few(fake_runs, tmp_path, capsys):
    fake_runs.update(n=12, n_classes=10)
    assert main(["demo", "--methods", "temperature", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "calibrators not compared: --folds 5 fits each calibrator on 4 of the 5 folds, 9 of the 12 rows" in out


def test_the_demo_replaces_an_earlier_report_only_with_force(fake_runs, tmp_path, capsys):
    (tmp_path / "calibration.csv").write_text("earlier\n")
    (tmp_path / "notes.txt").write_text("mine\n")
    assert main(["demo", "--methods", "temperature", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"fastai-ls: error: {tmp_path} already holds calibration.csv (an earlier " \
        "report?): pass --force to replace them, or give another --out\n"
    assert (tmp_path / "calibration.csv").read_text() == "earlier\n"
    assert main(["demo", "--methods", "temperature", "--out", str(tmp_path), "--force"]) == 0
    assert pd.read_csv(tmp_path / "calibration.csv").shape[0] == 2 * len(METRICS)
    assert (tmp_path / "notes.txt").read_text() == "mine\n"  # not a file of the report: never touched


@pytest.mark.slow
def test_quiet_turns_the_training_bars_off(fake_runs, tmp_path, monkeypatch):
    import fastprogress.fastprogress as fastprogress

    import fastai_ls.cli.demo as demo

    seen = []
    monkeypatch.setattr(demo, "train", lambda *a, **k: seen.append(fastprogress.NO_BAR))
    for args in ([], ["--quiet"]):
        assert main(["demo", "--methods", "temperature", "--out", str(tmp_path / str(len(seen))), *args]) == 0
    assert seen == [False, False, True, True] and fastprogress.NO_BAR is False


@pytest.mark.parametrize("kind", ["folder", "link", "fifo"])
def test_with_force_a_report_name_that_is_no_regular_file_is_refused_before_training(fake_runs, tmp_path, capsys,
                                                                                   monkeypatch, kind):
    # --force accepted them: a folder named calibrators.csv failed after the training, a FIFO blocked the write
    # forever, and a link had the file it points to (outside the report) overwritten.
    import fastai_ls.cli.demo as demo

    if kind == "fifo" and not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes here")
    other = tmp_path / "mine.csv"
    other.write_text("mine\n")
    report = tmp_path / "report"
    report.mkdir()
    name = report / "calibrators.csv"
    {"folder": name.mkdir, "link": lambda: name.symlink_to(other), "fifo": lambda: os.mkfifo(name)}[kind]()

    def train(*args, **kwargs):
        raise AssertionError("trained")

    monkeypatch.setattr(demo, "train", train)
    assert main(["demo", "--methods", "temperature", "--out", str(report), "--force"]) == 1
    what = {"folder": "a folder", "link": f"a link to {other}", "fifo": "a FIFO (named pipe)"}[kind]
    assert capsys.readouterr().err == f"fastai-ls: error: cannot replace {name}: it is {what}, not a file of an " \
        "earlier report: remove it, or give another --out\n"
    assert other.read_text() == "mine\n"


@pytest.mark.parametrize("args, message", [
    # The help lists the methods as "temperature, vector, ...": pasted as is, the shell splits the list and the error
    # blamed "vector" under the top-level command, without saying why.
    (["demo", "--methods", "temperature,", "vector"],
     "fastai-ls demo: error: unrecognized arguments: vector; --methods takes one word, the names separated by "
     "commas without spaces: --methods temperature,vector (see fastai-ls demo --help)\n"),
    (["calibrate", "p.npz", "--methods", "temperature", "histogram"],
     "fastai-ls calibrate: error: unrecognized arguments: histogram; --methods takes one word, the names separated "
     "by commas without spaces: --methods temperature,histogram (see fastai-ls calibrate --help)\n"),
    (["demo", "extra"], "fastai-ls demo: error: unrecognized arguments: extra (see fastai-ls demo --help)\n"),
])
def test_unrecognized_arguments_are_told_by_their_command_with_a_hint_for_split_methods(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(args)
    assert exit.value.code == 2 and capsys.readouterr().err == message


def test_a_method_name_in_capitals_gets_the_did_you_mean_hint(capsys):
    # `--methods TEMPERATURE` listed the known names without "did you mean 'temperature'".
    with pytest.raises(SystemExit):
        main(["demo", "--methods", "histogram,TEMPERATURE"])
    assert "unknown method 'TEMPERATURE' (did you mean 'temperature'?)" in capsys.readouterr().err


def test_a_demo_out_that_is_a_file_is_said_to_be_no_folder(tmp_path, capsys):
    # It said "[Errno 17] File exists: '...'", which reads as if the folder were taken.
    (tmp_path / "notes.txt").write_text("mine\n")
    assert main(["demo", "--out", str(tmp_path / "notes.txt")]) == 1
    assert capsys.readouterr().err == f"fastai-ls: error: cannot write the report into {tmp_path / 'notes.txt'}: " \
        "it is a file, not a folder (give a folder, e.g. fastai_ls_out)\n"
    assert (tmp_path / "notes.txt").read_text() == "mine\n"
