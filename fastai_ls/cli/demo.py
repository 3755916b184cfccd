"""Train a cross-entropy baseline beside a label-smoothing model and report their calibration side by side, with
intervals, and the cross-fitted comparison of post-hoc calibrators for each.

`compare` runs four steps: train (`fastai_ls.integration.training`), score (`model_report` here,
`fastai_ls.calibration.best_calibrator`), render (`demo_render`) and write (`demo_write`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
from fastai.learner import Learner
from fastai.torch_core import rank_distrib

from fastai_ls._deprecation import warn_renamed
from fastai_ls.calibration.best_calibrator import Calibrated, calibrate_learner, paired_differences
from fastai_ls.calibration.calibrators import CALIBRATORS
from fastai_ls.calibration.report import report_frame
from fastai_ls.calibration.scores import with_error_rate
from fastai_ls.calibration.state import CalibrationState
from fastai_ls.cli.calibrate import quiet_bars
from fastai_ls.cli.demo_render import CI, METRICS, print_calibrated, print_differences, print_models, print_summary, say
from fastai_ls.cli.demo_write import reliability_figure, writable_folder, write_figures, write_tables
from fastai_ls.cli.selective import selective_section
from fastai_ls.integration.training import calibration_callback, train, validation_logits
from fastai_ls.validation import check_folds

__all__ = ["compare", "model_report"]


def model_report(state: CalibrationState, seed: int = 0) -> pd.DataFrame:
    """The rows of `METRICS` for one model's validation counters: estimate, lower, upper (the 95% intervals of
    `CalibrationState.metrics`; the error rate's is the accuracy's, turned round: `with_error_rate`).

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
    metrics = with_error_rate(state.metrics(ci=CI, seed=seed))
    return report_frame(metrics, CI).loc[list(METRICS), ["estimate", "lower", "upper"]]


def _train_runs(make_learner: Callable[..., Learner], runs: dict[str, float], epochs: int, seed: int,
                quiet: bool) -> tuple[dict[str, Learner], dict[str, tuple]]:
    """The train step: each run trained, and its held-out logits read (every process takes part)."""
    with quiet_bars(quiet):
        learners = {title: train(make_learner, eps, epochs, seed, label=f"training {i}/{len(runs)}: {title}")
                    for i, (title, eps) in enumerate(runs.items(), 1)}
        held_out = {title: validation_logits(learn) for title, learn in learners.items()}
    return learners, held_out


def _calibrate_runs(held_out: dict[str, tuple], methods: list[str], folds: int, seed: int,
                    quiet: bool) -> dict[str, Calibrated]:
    """Score and render each model's calibrators in turn, each table printed as soon as it is ready."""
    calibrated = {}
    try:
        for title, (logits, target) in held_out.items():
            check_folds(*logits.shape, folds, option="--folds")
            with quiet_bars(quiet):
                result = calibrate_learner(logits, target, methods, folds, seed)
            calibrated[title] = result
            print_calibrated(title, result, folds)
    except ValueError as err:  # e.g. too few validation rows for the folds: the models' report still stands
        say(f"calibrators not compared: {err}")
    return calibrated


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
    estimate, lower, upper), selective.csv, reliability.png and smooth_reliability.png (the models as trained) and
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
    learners, held_out = _train_runs(make_learner, runs, epochs, seed, quiet)
    if rank_distrib() != 0:
        return None
    states = {title: calibration_callback(learn).state_of(-1) for title, learn in learners.items()}
    reports = {title: model_report(state, seed) for title, state in states.items()}
    print_models(reports, int(next(iter(states.values())).metrics()["n"]))
    calibrated = _calibrate_runs(held_out, methods, folds, seed, quiet)
    if calibrated:
        print_summary(calibrated)
    differences = None
    if len(calibrated) == 2:
        (first, a), (second, b) = calibrated.items()
        differences = paired_differences(a, b, CI)
        print_differences(first, second, differences, a.table.attrs["n"])

    tables = write_tables(out, reports, calibrated, differences)
    written = [*tables, *selective_section(held_out, out, folds, seed)]
    figures = {"reliability.png": reliability_figure(states),
               "smooth_reliability.png": reliability_figure(states, smooth=True, seed=seed)}
    if calibrated:
        figures["calibrated_reliability.png"] = reliability_figure(
            {f"{title} + {r.best if r.best != 'uncalibrated' else 'no calibrator'}": r.state
             for title, r in calibrated.items()},
            suptitle="after the best calibrator (lowest NLL), cross-fitted: out-of-fold probabilities")
    written += write_figures(out, figures)
    print(f"\nwrote {', '.join(written)} into {out}")
    return {"calibration": tables["calibration.csv"], "calibrators": tables.get("calibrators.csv"),
            "differences": differences}


def __getattr__(name: str):
    """`per_row_scores`, which moved to `fastai_ls.calibration.best_calibrator.paired_scores`, with a FutureWarning
    (one release)."""
    if name == "per_row_scores":
        from fastai_ls.calibration.best_calibrator import paired_scores

        warn_renamed("fastai_ls.cli.demo.per_row_scores", "fastai_ls.calibration.best_calibrator.paired_scores")
        return paired_scores
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
