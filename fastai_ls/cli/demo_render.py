"""The demo's console report (the render step of `fastai-ls demo`): each table is printed, and flushed, as soon as
it is ready."""

from __future__ import annotations

import sys
import textwrap

import pandas as pd

from fastai_ls.calibration.best_calibrator import PAIRED, Calibrated
from fastai_ls.calibration.report import format_interval
from fastai_ls.cli.tables import comparison_text

__all__ = ["CI", "METRICS", "SUMMARY", "COMPARED", "WIDTH", "say", "print_models", "print_calibrated",
           "print_summary", "print_differences"]

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
WIDTH = 110  # the explanatory lines are wrapped to this many characters


def say(text: str) -> None:
    """A blank line, then `text` wrapped to the console's usual width, and a blank line.

    Parameters
    ----------
    text : str
        The explanation.

    Examples
    --------
    >>> say("calibration on the 359 validation images:")
    <BLANKLINE>
    calibration on the 359 validation images:
    <BLANKLINE>
    """
    print(f"\n{textwrap.fill(text, WIDTH)}\n", flush=True)


def _text_column(report: pd.DataFrame) -> list[str]:
    return [format_interval(*row) for row in report[["estimate", "lower", "upper"]].itertuples(index=False)]


def print_models(reports: dict[str, pd.DataFrame], n_valid: int) -> None:
    """The models' calibration side by side: one column per model, `estimate [lower, upper]` per metric.

    Parameters
    ----------
    reports : dict of str to pandas.DataFrame
        Title to `model_report`.
    n_valid : int
        The validation images they were scored on.

    Examples
    --------
    >>> print_models({"cross-entropy": model_report(state)}, 359)  # doctest: +SKIP
    """
    shown = pd.DataFrame({title: _text_column(report) for title, report in reports.items()},
                         index=[METRICS[m] for m in METRICS])
    say(f"calibration on the {n_valid} validation images, with 95% intervals (a bootstrap over the images; normal "
        "intervals for NLL and Brier):")
    print(shown.to_string(), flush=True)  # before the comparison, which takes longer than the training


def print_calibrated(title: str, result: Calibrated, folds: int) -> None:
    """One model's table of cross-fitted calibrators, its best one, its temperature and its fits' warnings.

    Parameters
    ----------
    title : str
        The model's name.
    result : Calibrated
        Its `calibrate_learner` result.
    folds : int
        The cross-fitting folds.

    Examples
    --------
    >>> print_calibrated("cross-entropy", calibrate_learner(logits, target, ["temperature"]), 5)  # doctest: +SKIP
    """
    n_rows = result.table.attrs["n"]  # the rows of the logits, each image once (also under torchrun)
    say(f"{title}: post-hoc calibrators, cross-fitted on the {n_rows} validation images (each fitted on "
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


def print_summary(calibrated: dict[str, Calibrated]) -> None:
    """Each model before and after its best calibrator, side by side.

    Parameters
    ----------
    calibrated : dict of str to Calibrated
        Title to `calibrate_learner` result.

    Examples
    --------
    >>> print_summary({"cross-entropy": calibrate_learner(logits, target, ["temperature"])})  # doctest: +SKIP
    """
    summary = {}
    for title, result in calibrated.items():
        table = result.table
        rows = {"calibrator": ["none", result.best if result.best != "uncalibrated" else "none lowers NLL"]}
        for m in SUMMARY:
            rows[METRICS[m]] = [format_interval(*table.loc[row, [m, f"{m}_lo", f"{m}_hi"]])
                                for row in ("uncalibrated", result.best)]
        summary[title] = pd.DataFrame(rows, index=["before", "after"]).T
    say("before and after the best calibrator (the lowest cross-fitted NLL), on the same validation images:")
    print(pd.concat(summary, axis=1).to_string())


def print_differences(first: str, second: str, differences: pd.DataFrame, n_rows: int) -> None:
    """The paired differences of two models (`paired_differences`), as trained and after each one's best
    calibrator.

    Parameters
    ----------
    first : str
        The model subtracted.
    second : str
        The other model.
    differences : pandas.DataFrame
        `paired_differences(first's, second's)`.
    n_rows : int
        The validation images they are paired on.

    Examples
    --------
    >>> print_differences("cross-entropy", "label smoothing", paired_differences(a, b), 359)  # doctest: +SKIP
    """
    shown = pd.DataFrame({stage: [format_interval(*differences.loc[(stage, m)]) for m in PAIRED]
                          for stage in ("before", "after")}, index=[METRICS[m] for m in PAIRED])
    say(f"{second} minus {first}, image by image on the same {n_rows} validation images: the mean "
        "difference with its 95% interval (normal); an interval that holds 0 is a difference these images do "
        "not resolve. 'after': each model with its own best calibrator (out-of-fold):")
    print(shown.rename(columns={"before": "as trained", "after": "after best calibrator"}).to_string())
