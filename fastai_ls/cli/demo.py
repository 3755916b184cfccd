"""Train a cross-entropy baseline beside a label-smoothing model and report their calibration side by side, with
intervals, and the cross-fitted comparison of post-hoc calibrators for each."""

from __future__ import annotations

import math
import os
import stat
import sys
import tempfile
import textwrap
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch
from fastai.learner import Learner
from fastai.torch_core import rank_distrib, set_seed
from torch import Tensor

from fastai_ls.calibration.calibrators import CALIBRATORS, CalibrationWarning, TemperatureScaling, stratified_folds
from fastai_ls.calibration.compare import compare_on_logits, cross_fit
from fastai_ls.calibration.intervals import normal_interval
from fastai_ls.calibration.plots import plot_reliability, plot_smooth_reliability
from fastai_ls.calibration.report import format_interval, report_frame
from fastai_ls.calibration.state import NLL_FLOOR, CalibrationState
from fastai_ls.cli.calibrate import best_method, check_folds, comparison_text, quiet_bars
from fastai_ls.cli.selective import selective_section
from fastai_ls.integration.callback import CalibrationCallback
from fastai_ls.integration.distributed import distrib_ctx
from fastai_ls.integration.posthoc import holdout_logits

if TYPE_CHECKING:  # matplotlib is imported only when the figure is drawn
    from matplotlib.figure import Figure

CI = 0.95
# The report's rows: metric of `CalibrationState.metrics()` (error_rate = 1 - accuracy) -> label.
METRICS = {
    "error_rate": "error rate", "confidence": "mean confidence", "ece": "ECE", "smece": "smooth ECE",
    "adaptive_ece": "adaptive ECE", "ece_debiased": "debiased ECE (l2)", "rmsce": "RMSCE (l2)", "ks_error": "KS error",
    "mce": "MCE", "classwise_ece": "classwise ECE", "overconfidence": "over-confidence",
    "underconfidence": "under-confidence", "nll": "NLL", "brier": "Brier", "aurc": "AURC", "augrc": "AUGRC",
}
# The rows of the summary "before and after the best calibrator", and the columns of the calibrator tables.
SUMMARY = ("error_rate", "ece", "smece", "nll", "brier")
COMPARED = ("error_rate", "ece", "smece", "nll", "brier")
PAIRED = ("error_rate", "nll", "brier")  # per-image scores: their differences pair up image by image
WIDTH = 110  # the explanatory lines are wrapped to this many characters


def calibration_callback(learn: Learner) -> CalibrationCallback:
    """The learner's `CalibrationCallback`.

    Parameters
    ----------
    learn : Learner
        A learner built with one (the factories' `calibration=True`).

    Returns
    -------
    CalibrationCallback

    Examples
    --------
    >>> calibration_callback(digits_learner())  # doctest: +SKIP
    CalibrationCallback
    """
    for cb in learn.cbs:
        if isinstance(cb, CalibrationCallback):
            return cb
    raise ValueError("the learner has no CalibrationCallback: build it with calibration=True")


# Every file `compare` may write into its folder.
OUTPUT_FILES = ("calibration.csv", "calibrators.csv", "differences.csv", "selective.csv", "reliability.png",
                "smooth_reliability.png", "calibrated_reliability.png")


def writable_folder(out: str | Path, force: bool = False) -> Path:
    """`out`, created if needed, once a file could be written into it and it holds none of `OUTPUT_FILES` (unless
    `force`; even then each must be a regular file, not a link, folder or FIFO): checked before any training, so
    that a report that cannot be written, or would replace an earlier one, fails at once, not after the runs.

    Parameters
    ----------
    out : str or Path
        The output folder.
    force : bool, default False
        Replace the files of an earlier report (`--force`).

    Returns
    -------
    Path

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     writable_folder(Path(folder) / "report").is_dir()
    True
    """
    out = Path(out)
    if out.exists() and not out.is_dir():  # mkdir's own message, "File exists", reads as if the folder were taken
        raise OSError(f"cannot write the report into {out}: it is a file, not a folder (give a folder, e.g. "
                      "fastai_ls_out)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise OSError(f"cannot write the report into {out}: {err}") from err
    existing = [name for name in OUTPUT_FILES if (out / name).exists() or (out / name).is_symlink()]
    for name in existing:  # --force replaces the report's own files, never what a link points to
        path = out / name
        what = f"a link to {os.readlink(path)}" if path.is_symlink() else "a folder" if path.is_dir() else \
            None if path.is_file() else "a FIFO (named pipe)" if stat.S_ISFIFO(path.stat().st_mode) else \
            "not a regular file"
        if what is not None:  # a folder fails the write after the training; a FIFO blocks it forever
            raise OSError(f"cannot replace {path}: it is {what}, not a file of an earlier report: remove it, or "
                          "give another --out")
    if existing and not force:
        raise OSError(f"{out} already holds {', '.join(existing)} (an earlier report?): pass --force to replace them, "
                      "or give another --out")
    return out


def train(make_learner: Callable[..., Learner], eps: float, epochs: int, seed: int, label: str = "") -> Learner:
    """`make_learner(eps=eps)` trained with `fit_one_cycle(epochs)` from `seed`; distributed when launched so.

    Parameters
    ----------
    make_learner : callable
        `make_learner(eps=...)` builds a learner.
    eps : float
        Label smoothing.
    epochs : int
        `fit_one_cycle` epochs.
    seed : int
        Seed set before the learner is built (its split and initial weights) and trained.
    label : str, optional
        Printed (on rank 0) before fastai's progress table, with the number of images (and of training labels
        replaced by label noise, if any), to say which model trains.

    Returns
    -------
    Learner
        The trained learner.

    Examples
    --------
    >>> learn = train(digits_learner, eps=0.1, epochs=10, seed=42, label="label smoothing")  # doctest: +SKIP
    label smoothing: fit_one_cycle(10) on 1438 training and 359 validation images
    """
    set_seed(seed, reproducible=True)
    learn = make_learner(eps=eps)
    if label and rank_distrib() == 0:
        n_train = len(learn.dls.train_ds)
        relabelled = len(getattr(learn, "relabelled", {}))
        noise = f" ({relabelled} of their labels replaced by a wrong class)" if relabelled else ""
        print(f"\n{label}: fit_one_cycle({epochs}) on {n_train} training images{noise} and "
              f"{len(learn.dls.valid_ds)} validation images", flush=True)
    with distrib_ctx(learn):  # does nothing in a single process
        learn.fit_one_cycle(epochs)
    return learn


def model_report(state: CalibrationState, seed: int = 0) -> pd.DataFrame:
    """The rows of `METRICS` for one model's validation counters: estimate, lower, upper (the 95% intervals of
    `CalibrationState.metrics`; the error rate's is the accuracy's, turned round).

    Parameters
    ----------
    state : CalibrationState
        The counters of the last validation pass (`learn.calibration.state_of(-1)`).
    seed : int, default 0
        Seed of the bootstrap.

    Returns
    -------
    pandas.DataFrame
        Index: metric (the keys of `METRICS`); columns estimate, lower, upper.

    Examples
    --------
    >>> model_report(learn.calibration.state_of(-1)).loc["ece"]  # doctest: +SKIP
    """
    metrics = state.metrics(ci=CI, seed=seed)
    metrics.update(error_rate=1 - metrics["accuracy"], error_rate_lo=1 - metrics["accuracy_hi"],
                   error_rate_hi=1 - metrics["accuracy_lo"])
    return report_frame(metrics, CI).loc[list(METRICS), ["estimate", "lower", "upper"]]


@dataclass
class Calibrated:
    """One model's post-hoc calibration, cross-fitted on its held-out rows.

    Parameters
    ----------
    table : pandas.DataFrame
        The `compare_calibrators` table (the uncalibrated model first).
    best : str
        The row with the lowest NLL (`best_method`).
    state : CalibrationState
        Counters of the best method's out-of-fold probabilities (for its reliability diagrams).
    temperature : float
        T fitted on all held-out rows (what `fit_calibrator(learn, 'temperature')` would ship).
    warnings : list of str
        The `CalibrationWarning`s of the fits.
    before : Tensor
        (N, C) probabilities of the model itself, row by row.
    after : Tensor
        (N, C) probabilities of the best method (out-of-fold), row by row.
    target : Tensor
        (N,) class ids of those rows.
    """

    table: pd.DataFrame
    best: str
    state: CalibrationState
    temperature: float
    warnings: list[str]
    before: Tensor
    after: Tensor
    target: Tensor


def validation_logits(learn: Learner) -> tuple[Tensor, Tensor]:
    """The raw logits and class ids of the validation set (`holdout_logits`), each image once. Under `torchrun`
    every process must call it: inside `distrib_ctx` the processes share the images out and gather the
    predictions, as during `fit`. (Run by several processes outside it, fastai's `get_preds` returned logits and
    targets that do not belong together; tests/test_cli.py checks the pairing.)

    Parameters
    ----------
    learn : Learner
        A trained learner.

    Returns
    -------
    tuple of two Tensors
        (N, C) logits and (N,) class ids.

    Examples
    --------
    >>> logits, target = validation_logits(learn)  # doctest: +SKIP
    """
    with distrib_ctx(learn), learn.no_bar():  # no bar: it would stay in a log, above the report
        return holdout_logits(learn)


def calibrate_learner(logits: Tensor, target: Tensor, methods: list[str], folds: int = 5,
                      seed: int = 0) -> Calibrated:
    """Compare calibrators on held-out logits by cross-fitting (`compare_calibrators`: no row is
    scored by a calibrator fitted on it), and keep the best one's out-of-fold probabilities.

    Parameters
    ----------
    logits : Tensor
        (N, C) held-out logits (`validation_logits`).
    target : Tensor
        (N,) their class ids.
    methods : list of str
        Calibration methods (names of `CALIBRATORS`).
    folds : int, default 5
        Stratified folds.
    seed : int, default 0
        Seed of the folds and of the bootstrap intervals.

    Returns
    -------
    Calibrated

    Examples
    --------
    >>> calibrate_learner(*validation_logits(learn), ["temperature", "dirichlet"]).best  # doctest: +SKIP
    'temperature'
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CalibrationWarning)
        table = compare_on_logits(logits, target, methods=methods, folds=folds, seed=seed, ci=CI)
        temperature = TemperatureScaling().fit(logits, target).temperature
    best = best_method(table)
    before = TemperatureScaling(1.0)(logits)  # the model's own probabilities, as compare_calibrators scores them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)  # the same fits as in the table, which reported them
        after = before if best == "uncalibrated" else \
            cross_fit(best, logits, target, stratified_folds(target, folds, seed))[0]
    state = CalibrationState(logits.shape[1])
    state.update(after, target)
    messages = [str(w.message) for w in caught if issubclass(w.category, CalibrationWarning)]
    for w in caught:
        if not issubclass(w.category, CalibrationWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return Calibrated(table, best, state, temperature, list(dict.fromkeys(messages)), before, after, target)


def per_row_scores(probs: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Each row's error (0 or 1), NLL and Brier score: the terms whose means are `CalibrationState`'s error rate,
    `nll` and `brier` (the NLL of a target probability of 0 capped as there).

    Parameters
    ----------
    probs : Tensor
        (N, C) probabilities.
    target : Tensor
        (N,) class ids.

    Returns
    -------
    dict of str to Tensor
        'error_rate', 'nll', 'brier': (N,) float64 each.

    Examples
    --------
    >>> scores = per_row_scores(torch.tensor([[0.75, 0.25], [0.5, 0.5]]), torch.tensor([0, 1]))
    >>> scores["error_rate"].tolist(), [round(v, 4) for v in scores["nll"].tolist()], scores["brier"].tolist()
    ([0.0, 1.0], [0.2877, 0.6931], [0.125, 0.5])
    """
    p = probs.double()
    p_y = p.gather(1, target[:, None]).squeeze(1)
    return {"error_rate": (p.argmax(1) != target).double(),
            "nll": -p_y.clamp_min(NLL_FLOOR).log(),
            "brier": (p * p).sum(1) - 2 * p_y + 1}


def paired_differences(first: Calibrated, second: Calibrated) -> pd.DataFrame:
    """`second` minus `first`, image by image on the same held-out images: the mean difference of each row's error,
    NLL and Brier score with its 95% normal interval, for the models as trained and after each one's best
    calibrator. Pairing removes what the images share, so these intervals are narrower than the two models'
    intervals side by side, and a difference whose interval excludes 0 is resolved by these images.

    Parameters
    ----------
    first : Calibrated
        One model's calibration (the one subtracted).
    second : Calibrated
        The other model's, on the same rows (same targets, in the same order).

    Returns
    -------
    pandas.DataFrame
        Index: ('before' | 'after', metric); columns estimate, lower, upper.

    Examples
    --------
    >>> paired_differences(calibrated["cross-entropy"], calibrated["label smoothing 0.1"])  # doctest: +SKIP
    """
    if not torch.equal(first.target, second.target):
        raise ValueError("the two models were not scored on the same rows in the same order")
    rows = {}
    for stage in ("before", "after"):
        a, b = per_row_scores(getattr(first, stage), first.target), per_row_scores(getattr(second, stage), first.target)
        for metric in a:
            d = b[metric] - a[metric]
            n = len(d)
            se = float(d.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.nan
            lower, upper = normal_interval(float(d.mean()), se, CI)
            rows[(stage, metric)] = {"estimate": float(d.mean()), "lower": lower, "upper": upper}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(["stage", "metric"])


def _say(text: str) -> None:
    """A blank line, then `text` wrapped to the console's usual width, and a blank line."""
    print(f"\n{textwrap.fill(text, WIDTH)}\n", flush=True)


def _text_column(report: pd.DataFrame) -> list[str]:
    return [format_interval(*row) for row in report[["estimate", "lower", "upper"]].itertuples(index=False)]


def _print_calibrated(title: str, result: Calibrated, folds: int) -> None:
    n_rows = result.table.attrs["n"]  # the rows of the logits, each image once (also under torchrun)
    _say(f"{title}: post-hoc calibrators, cross-fitted on the {n_rows} validation images (each fitted on "
         f"{folds - 1} of {folds} folds and scored on the other, in turn: no image is scored by a calibrator "
         "fitted on it); AURC, AUGRC and classwise ECE are in calibrators.csv:")
    print(comparison_text(result.table, shown=COMPARED))
    T = result.temperature
    print(textwrap.fill(
        f"lowest NLL: {result.best}. Temperature fitted on all {n_rows} images: T = {T:.3f} (T "
        f"{'< 1 sharpens an under-confident' if T < 1 else '> 1 softens an over-confident'} model).", WIDTH))
    for message in result.warnings:
        print(textwrap.fill(f"warning: {message}", WIDTH, subsequent_indent="  "))
    sys.stdout.flush()


def compare(
    make_learner: Callable[..., Learner],
    runs: dict[str, float],
    epochs: int,
    out: str | Path,
    seed: int = 42,
    methods: list[str] | None = None,
    folds: int = 5,
    force: bool = False,
    quiet: bool = False,
) -> dict[str, pd.DataFrame] | None:
    """Train one learner per run; print and write their calibration side by side with 95% intervals, the
    cross-fitted comparison of post-hoc calibrators for each, and the reliability diagrams.

    The output folder is checked first; each run is announced before its progress table; each table is printed
    as soon as it is ready (the models' calibration before the calibrators are compared). Under
    `torchrun`/`accelerate launch` every process trains; only rank 0 compares calibrators, prints and writes.
    Written into `out`: calibration.csv (model, metric, estimate, lower, upper), calibrators.csv (model, method,
    the `compare_calibrators` columns), for two runs differences.csv (`paired_differences`: stage, metric,
    estimate, lower, upper), reliability.png and smooth_reliability.png (the models as trained) and
    calibrated_reliability.png (each model after its best calibrator, out-of-fold).

    Parameters
    ----------
    make_learner : callable
        `make_learner(eps=...)` builds a learner with a `CalibrationCallback`.
    runs : dict of str to float
        Column title to eps, e.g. `{'cross-entropy': 0.0, 'label smoothing 0.1': 0.1}`, trained in this order.
    epochs : int
        `fit_one_cycle` epochs per run.
    out : str or Path
        Folder for the tables and figures (created if needed).
    seed : int, default 42
        The same seed for every run, and for the folds and bootstrap intervals.
    methods : list of str, optional
        Calibration methods to compare (default: all of `CALIBRATORS`).
    folds : int, default 5
        Cross-fitting folds.
    force : bool, default False
        Replace the files of an earlier report in `out` (otherwise refused before any training).
    quiet : bool, default False
        No progress bars (`quiet_bars`); the tables are printed as usual.

    Returns
    -------
    dict of str to pandas.DataFrame or None
        On rank 0, 'calibration', 'calibrators' and (for two runs) 'differences', the tables as written; None on
        the other ranks.

    Examples
    --------
    >>> compare(digits_learner, {"cross-entropy": 0.0, "label smoothing": 0.1}, 10, "report")  # doctest: +SKIP
    """
    out = writable_folder(out, force)
    methods = list(CALIBRATORS) if methods is None else methods
    with quiet_bars(quiet):
        learners = {title: train(make_learner, eps, epochs, seed, label=f"training {i}/{len(runs)}: {title}")
                    for i, (title, eps) in enumerate(runs.items(), 1)}
        held_out = {title: validation_logits(learn) for title, learn in learners.items()}  # every process takes part
    if rank_distrib() != 0:
        return None
    states = {title: calibration_callback(learn).state_of(-1) for title, learn in learners.items()}
    reports = {title: model_report(state, seed) for title, state in states.items()}
    n_valid = int(next(iter(states.values())).metrics()["n"])
    shown = pd.DataFrame({title: _text_column(report) for title, report in reports.items()},
                         index=[METRICS[m] for m in METRICS])
    _say(f"calibration on the {n_valid} validation images, with 95% intervals (a bootstrap over the images; normal "
         "intervals for NLL and Brier):")
    print(shown.to_string(), flush=True)  # before the comparison, which takes longer than the training
    calibrated = {}
    try:
        for title in learners:
            check_folds(*held_out[title][0].shape, folds)
            with quiet_bars(quiet):
                result = calibrate_learner(*held_out[title], methods, folds, seed)
            calibrated[title] = result
            _print_calibrated(title, result, folds)
    except ValueError as err:  # e.g. too few validation rows for the folds: the models' report still stands
        _say(f"calibrators not compared: {err}")
    if calibrated:
        summary = {}
        for title, result in calibrated.items():
            table = result.table
            rows = {"calibrator": ["none", result.best if result.best != "uncalibrated" else "none lowers NLL"]}
            for m in SUMMARY:
                rows[METRICS[m]] = [format_interval(*table.loc[row, [m, f"{m}_lo", f"{m}_hi"]])
                                    for row in ("uncalibrated", result.best)]
            summary[title] = pd.DataFrame(rows, index=["before", "after"]).T
        _say("before and after the best calibrator (the lowest cross-fitted NLL), on the same validation images:")
        print(pd.concat(summary, axis=1).to_string())
    differences = None
    if len(calibrated) == 2:
        (first, a), (second, b) = calibrated.items()
        differences = paired_differences(a, b)
        shown = pd.DataFrame({stage: [format_interval(*differences.loc[(stage, m)]) for m in PAIRED]
                              for stage in ("before", "after")}, index=[METRICS[m] for m in PAIRED])
        _say(f"{second} minus {first}, image by image on the same {a.table.attrs['n']} validation images: the mean "
             "difference with its 95% interval (normal); an interval that holds 0 is a difference these images do "
             "not resolve. 'after': each model with its own best calibrator (out-of-fold):")
        print(shown.rename(columns={"before": "as trained", "after": "after best calibrator"}).to_string())

    calibration = pd.concat({title: report for title, report in reports.items()}, names=["model", "metric"])
    calibration.to_csv(out / "calibration.csv")
    written = ["calibration.csv"]
    if calibrated:
        pd.concat({title: r.table for title, r in calibrated.items()}, names=["model", "method"]).to_csv(
            out / "calibrators.csv")
        written.append("calibrators.csv")
    if differences is not None:
        differences.to_csv(out / "differences.csv")
        written.append("differences.csv")
    written += selective_section(held_out, out, folds, seed)
    figures = {"reliability.png": reliability_figure(states),
               "smooth_reliability.png": reliability_figure(states, smooth=True, seed=seed)}
    if calibrated:
        figures["calibrated_reliability.png"] = reliability_figure(
            {f"{title} + {r.best if r.best != 'uncalibrated' else 'no calibrator'}": r.state
             for title, r in calibrated.items()},
            suptitle="after the best calibrator (lowest NLL), cross-fitted: out-of-fold probabilities")
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=120, bbox_inches="tight")
        written.append(name)
    print(f"\nwrote {', '.join(written)} into {out}")
    return {"calibration": calibration, "calibrators": pd.concat(
        {title: r.table for title, r in calibrated.items()}, names=["model", "method"]) if calibrated else None,
        "differences": differences}


def reliability_figure(
    states: dict[str, CalibrationState], smooth: bool = False, seed: int = 0, suptitle: str | None = None
) -> Figure:
    """One reliability diagram per model, side by side.

    Parameters
    ----------
    states : dict of str to CalibrationState
        Title to counters (e.g. `learn.calibration.state_of(-1)`).
    smooth : bool, default False
        The smooth diagram (`plot_smooth_reliability`) instead of the binned one.
    seed : int, default 0
        Seed of the smooth diagram's bootstrap band.
    suptitle : str, optional
        A title above the diagrams.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> reliability_figure({"cross-entropy": ce_state, "label smoothing": ls_state}).savefig("r.png")  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    # The counts (or density) in a panel below each diagram, as `cb.plot_reliability()` draws them.
    fig, axes = plt.subplots(2, len(states), figsize=(5 * len(states), 7.6), squeeze=False, sharex="col",
                             gridspec_kw={"height_ratios": [3, 1]})
    for top, panel, (title, state) in zip(axes[0], axes[1], states.items()):
        if smooth:
            plot_smooth_reliability(state, ax=(top, panel), title=title, ci=CI, seed=seed)
        else:
            plot_reliability(state, ax=(top, panel), title=title, ci=CI)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig
