"""An honest comparison of post-hoc calibrators: cross-fitting on held-out logits, so that no row is scored by a
calibrator that was fitted on it."""

from __future__ import annotations

import copy
import math
import sys
import time
import warnings
from collections.abc import Mapping, Sequence

import fastprogress.fastprogress as fastprogress
import numpy as np
import pandas as pd
import torch
from fastprogress.fastprogress import progress_bar
from torch import Tensor

from fastai_ls._deprecation import warn_renamed
from fastai_ls.calibration.calibrators import CALIBRATORS, CalibrationWarning, Calibrator, get_calibrator
from fastai_ls.calibration.calibrators.base import calibration_messages, check_fit_input, row_blocks
from fastai_ls.calibration.calibrators.folds import stratified_folds
from fastai_ls.calibration.checks import SUM_TOLERANCE
from fastai_ls.calibration.scores import with_error_rate
from fastai_ls.calibration.state import CLASSWISE_MAX_CLASSES, N_FINE, CalibrationState
from fastai_ls.validation import check_ci, check_folds, check_seed

__all__ = ["compare_on_logits", "cross_fit", "DEFAULT_METHODS", "COLUMNS"]

DEFAULT_METHODS = tuple(CALIBRATORS)
# The metrics of `CalibrationState.metrics()` in the table, in order; `error_rate` is 1 - accuracy. With `ci`, the
# interval columns `<name>_lo`, `<name>_hi` follow their metric (classwise ECE has none).
COLUMNS = ("error_rate", "ece", "smece", "classwise_ece", "nll", "brier", "aurc", "augrc")


class _Softmax(Calibrator):
    """The uncalibrated model as a calibrator with nothing to fit: softmax(z), with the same input handling."""

    name = "uncalibrated"
    may_change_prediction = False

    @property
    def fitted(self) -> bool:
        return True

    def _probs(self, z: Tensor) -> Tensor:
        return z.softmax(1)


def _as_tensor(values, name: str) -> Tensor:
    if isinstance(values, np.ndarray):
        return torch.from_numpy(values)
    if not isinstance(values, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or a numpy array, got {type(values).__name__}")
    return values


def _methods(methods) -> dict[str, Calibrator]:
    """Row label -> an unfitted template, from names, calibrators, or a mapping of labels to either."""
    if isinstance(methods, (str, Calibrator)):
        methods = [methods]
    items = methods.items() if isinstance(methods, Mapping) else ((None, m) for m in methods)
    templates = {}
    for label, method in items:
        template = get_calibrator(method)
        label = label if label is not None else (method if isinstance(method, str) else template.name)
        if label in templates or label == "uncalibrated":
            raise ValueError(f"two rows would be labelled {label!r}: pass a dict of labels to methods")
        templates[label] = template
    if not templates:
        raise ValueError("methods is empty")
    return templates


def _fitted(template: Calibrator, logits: Tensor, target: Tensor, held: Tensor, fold: int) -> tuple[Calibrator, float]:
    """A copy of `template` fitted on the rows outside `held` (by their indices: a calibrator that reads its rows a
    block at a time holds no copy of them), and the fit's seconds."""
    calibrator = copy.deepcopy(template)
    start = time.perf_counter()
    try:
        calibrator.fit(logits, target, rows=(~held).nonzero().squeeze(1))
    except ValueError as e:
        raise ValueError(f"{template.name} on the rows outside fold {fold}: {e}") from None
    return calibrator, time.perf_counter() - start


def _fit_fold(template: Calibrator, logits: Tensor, target: Tensor, held: Tensor, fold: int) -> tuple[Tensor, float]:
    """The probabilities of the rows `held` from a copy of `template` fitted on the other rows, and the fit's
    seconds."""
    calibrator, seconds = _fitted(template, logits, target, held, fold)
    return calibrator(logits[held]), seconds


def cross_fit(method: str | Calibrator, logits: Tensor, target: Tensor, fold_of: Tensor) -> tuple[Tensor, list[float]]:
    """Out-of-fold probabilities: for each fold, a fresh copy of `method` fitted on the other folds' rows gives the
    probabilities of this fold's rows. Returns the (N, C) probabilities and the seconds of each fit. A calibrator
    with nothing to fit (e.g. `TemperatureScaling(2.0)`) is used as it is on every fold.

    Parameters
    ----------
    method : str | Calibrator
        A method name or an unfitted calibrator (copied for each fold, never fitted itself).
    logits : Tensor
        (N, C) held-out logits.
    target : Tensor
        (N,) class ids.
    fold_of : Tensor
        (N,) fold id of each row, e.g. from `stratified_folds`.

    Examples
    --------
    >>> _ = torch.manual_seed(0); z = torch.randn(300, 3); y = torch.distributions.Categorical(logits=z).sample()
    >>> probs, seconds = cross_fit("temperature", 2 * z, y, stratified_folds(y, 3))
    >>> probs.shape, len(seconds)
    (torch.Size([300, 3]), 3)
    """
    template = get_calibrator(method)
    probs = torch.empty(logits.shape, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32,
                        device=logits.device)
    seconds = []
    fold_of = fold_of.to(logits.device)
    for fold in torch.unique(fold_of).tolist():
        held = fold_of == fold
        probs[held], fit_s = _fit_fold(template, logits, target, held, fold)
        seconds.append(fit_s)
    return probs, seconds


def _out_of_fold_state(calibrators: list[Calibrator], logits: Tensor, target: Tensor, fold_of: Tensor,
                       n_bins: int) -> tuple[CalibrationState, int]:
    """The counters of the out-of-fold probabilities (row i from `calibrators[fold_of[i]]`) and the number of rows
    whose probabilities are not finite. Inputs of one block of rows (`row_blocks`: small inputs) are scored with one
    update of all rows in their order, as the pooled probabilities at once; larger ones fold by fold, a block of the
    fold's rows at a time: the memory of one block of probabilities, not of all N x C (several GB at 200,000 x
    1,000 rows), and one call of a calibrator per block (a top-label calibrator's call loops over its classes)."""
    n, n_classes = logits.shape
    state = CalibrationState(n_classes, n_bins, device=logits.device, classwise=n_classes <= CLASSWISE_MAX_CLASSES)
    if len(row_blocks(n, n_classes)) == 1:
        if len(calibrators) == 1:
            probs = calibrators[0](logits)
        else:
            probs = torch.empty(logits.shape, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32,
                                device=logits.device)
            for fold, calibrator in enumerate(calibrators):
                held = fold_of == fold
                probs[held] = calibrator(logits[held])
        state.update(probs, target)
        return state, int((~probs.isfinite().all(1)).sum())
    unscored = 0
    for fold, calibrator in enumerate(calibrators):
        rows_of_fold = (fold_of == fold).nonzero().squeeze(1) if len(calibrators) > 1 else None
        count = n if rows_of_fold is None else len(rows_of_fold)
        for part in row_blocks(count, n_classes):
            rows = part if rows_of_fold is None else rows_of_fold[part]
            probs = calibrator(logits[rows])
            unscored += int((~probs.isfinite().all(1)).sum())
            state.update(probs, target[rows])
    return state, unscored


def _score(state: CalibrationState, ci: float | None, n_boot: int, seed: int) -> dict[str, float]:
    """One table row: each of `COLUMNS`, with its interval columns when `ci` is given."""
    metrics = with_error_rate(state.metrics(ci=ci, n_boot=n_boot, seed=seed))
    return {key: metrics[key] for name in COLUMNS for key in (name, f"{name}_lo", f"{name}_hi") if key in metrics}


def _bar_visible() -> bool:
    """Whether a progress bar would be seen: in a notebook or a terminal, unless fastprogress's bars are off
    (fastprogress's own test counts any stdout, so a bar would fill a log file or a pipe)."""
    return not fastprogress.NO_BAR and (fastprogress.IN_NOTEBOOK or sys.stdout.isatty())


def _check_not_probabilities(logits: Tensor) -> None:
    """A ValueError naming probabilities when every row of `logits` is non-negative and sums to 1 (within the
    tolerance of probabilities everywhere, `SUM_TOLERANCE`): softmax of probabilities squeezes every row towards
    uniform, so a table on them would be silently wrong."""
    if bool((logits >= 0).all()) and bool(((logits.double().sum(1) - 1).abs() <= SUM_TOLERANCE).all()):
        raise ValueError("logits look like probabilities (every row is non-negative and sums to 1): pass logits, "
                         "or the log of the probabilities (probabilities.log(); a softmax of those is the "
                         "probabilities again)")


def compare_on_logits(
    logits: Tensor | np.ndarray,
    target: Tensor | np.ndarray,
    methods: Sequence[str | Calibrator] | Mapping[str, str | Calibrator] = DEFAULT_METHODS,
    folds: int = 5,
    seed: int = 0,
    n_bins: int = 15,
    ci: float | None = 0.95,
    n_boot: int = 1000,
    progress: bool = True,
) -> pd.DataFrame:
    """Cross-fitted comparison of calibrators on held-out logits: one row per method, the uncalibrated model first.

    The rows are split into `folds` stratified folds (seeded); each method is fitted on all folds but one and
    predicts the remaining fold, in turn, and the pooled out-of-fold probabilities of all rows are scored at once.
    So no row is scored by a calibrator that saw it, and every method is scored on the same rows as the
    uncalibrated model. Each calibrator is fitted on (folds - 1) / folds of the rows, so it is slightly worse than
    one fitted on all of them. A calibrator with nothing to fit (`TemperatureScaling(2.0)`) is scored as it is.
    Deterministic for a seed.

    Columns: `error_rate`, `ece` (top-label, `n_bins` equal-width bins), `smece` (smooth ECE), `classwise_ece` (NaN
    above `CLASSWISE_MAX_CLASSES` classes), `nll`, `brier`, `aurc`, `augrc` (from `CalibrationState`), each but
    `classwise_ece` followed by `<name>_lo` and `<name>_hi` when `ci` is given, then `n_unscored` (rows left out
    of the metrics: out-of-fold probabilities that are not finite; all rows of a skipped method), `fit_s` (mean
    seconds of one fit) and `may_change_prediction`. A method whose fits warned gets one `CalibrationWarning`
    summing them up. A method too costly for this many classes (see `Calibrator.skip_reason`, e.g. matrix scaling
    at 1,000 classes) is skipped before any fit, with a `CalibrationWarning` that says why, and its row is NaN.

    The intervals are `CalibrationState.metrics(ci=...)`'s (a percentile bootstrap over the rows, the normal
    interval for NLL and Brier) of each row's pooled out-of-fold probabilities, the same bootstrap seed for every
    row. They treat those probabilities as given: the variability of the fits themselves is not in them. Two rows
    are scored on the same rows, so intervals that overlap can still hide a real (paired) difference.

    Parameters
    ----------
    logits : Tensor | np.ndarray
        (N, C) held-out logits (log-probabilities will do: a calibrator sees the same softmax; probabilities
        themselves are refused with a ValueError that says to take their log).
    target : Tensor | np.ndarray
        (N,) class ids in [0, C).
    methods : sequence or mapping
        Method names (see `CALIBRATORS`), unfitted calibrators, or a mapping of row labels to either.
    folds : int
        Number of folds, at least 2; each fit needs at least C rows outside its fold.
    seed : int
        Seed of the fold assignment.
    n_bins : int
        Equal-width bins of the ECE columns (at most 1000 with `ci`).
    ci : float | None
        Level of the intervals (0.95); None for point estimates only (no bootstrap: faster).
    n_boot : int
        Bootstrap replicates per row of the table.
    progress : bool
        Show a progress bar (fastprogress, as fastai's) over the fits, methods x folds, in a notebook or a
        terminal (not into a pipe or a file).

    Examples
    --------
    >>> _ = torch.manual_seed(0); z = torch.randn(600, 3); y = torch.distributions.Categorical(logits=z).sample()
    >>> table = compare_on_logits(3 * z, y, methods=["temperature"], folds=3, progress=False)
    >>> list(table.index), bool(table.loc["temperature", "ece"] < table.loc["uncalibrated", "ece"])
    (['uncalibrated', 'temperature'], True)
    """
    logits, target = _as_tensor(logits, "logits"), _as_tensor(target, "target")
    templates = _methods(methods)
    if ci is not None:
        check_ci(ci, n_boot)
        if isinstance(n_bins, int) and n_bins > N_FINE:
            raise ValueError(f"n_bins={n_bins} is more than the {N_FINE} fine cells the intervals resample: pass "
                             f"n_bins <= {N_FINE}, or ci=None for no intervals")
    seed = check_seed(seed, allow_none=False)  # of the folds and of the bootstrap
    check_fit_input(logits, target, upcast=False)  # the bad-input errors of a fit, before any fold runs
    _check_not_probabilities(logits)
    n, n_classes = logits.shape
    fold_of = stratified_folds(target, folds, seed)  # checks folds
    check_folds(n, n_classes, folds)
    target = target.to(logits.device, torch.long)
    counts = torch.bincount(target.cpu(), minlength=n_classes)
    small = [k for k, c in enumerate(counts.tolist()) if 0 < c < folds]
    if small:
        warnings.warn(f"{len(small)} classes have fewer rows than folds={folds} (first: class {small[0]} with "
                      f"{int(counts[small[0]])}): some folds are fitted without them", CalibrationWarning,
                      stacklevel=2)
    fold_of = fold_of.to(logits.device)
    fit_rows = n - int(torch.bincount(fold_of).max())
    skipped = {label: reason for label, template in templates.items()
               if (reason := template.skip_reason(fit_rows, n_classes)) is not None}
    for label, reason in skipped.items():
        warnings.warn(f"{label}: skipped, {reason}", CalibrationWarning, stacklevel=2)
    score = dict(ci=ci, n_boot=n_boot, seed=seed)
    rows = {"uncalibrated": _row([_Softmax()], logits, target, fold_of, n_bins, score, [0.0], False)}
    jobs = [(label, fold) for label in templates if label not in skipped for fold in range(folds)]
    bar = progress_bar(jobs, leave=False) if progress and jobs and _bar_visible() else None
    fitted, seconds, caught = [], [], []
    for label, fold in bar if bar is not None else jobs:
        template = templates[label]
        if bar is not None:
            bar.comment = f"{label}, fold {fold + 1}/{folds}"
        if fold == 0:
            fitted, seconds, caught = [], [], []
        with warnings.catch_warnings(record=True) as fold_caught:
            warnings.simplefilter("always")
            calibrator, fit_s = _fitted(template, logits, target, fold_of == fold, fold)
        fitted.append(calibrator)
        seconds.append(fit_s)
        caught.extend(fold_caught)
        if fold == folds - 1:
            # Scored once all folds are fitted, in the rows' order (see `_out_of_fold_state`); the calibrators'
            # warnings while scoring go with the fits'.
            with warnings.catch_warnings(record=True) as scoring_caught:
                warnings.simplefilter("always")
                rows[label] = _row(fitted, logits, target, fold_of, n_bins, score, seconds,
                                   template.may_change_prediction)
            caught.extend(scoring_caught)
            _rewarn(label, caught, folds)
    for label in templates:
        if label in skipped:
            rows[label] = {"n_unscored": n, "fit_s": math.nan,
                           "may_change_prediction": templates[label].may_change_prediction}
    table = pd.DataFrame.from_dict({label: rows[label] for label in ["uncalibrated", *templates]}, orient="index")
    table = table[[c for c in rows["uncalibrated"]]]
    table.index.name = "method"
    table.attrs.update(folds=folds, seed=seed, n=n, n_classes=n_classes, ci=ci, skipped=skipped)
    return table


def _rewarn(label: str, caught: list[warnings.WarningMessage], folds: int) -> None:
    """The fits' warnings of one method: other warnings as they were, CalibrationWarnings as one summary."""
    messages = calibration_messages(caught)
    if messages:
        warnings.warn(f"{label}: {len(messages)} warning(s) over {folds} fits, e.g. {messages[0]}",
                      CalibrationWarning, stacklevel=3)


def _row(calibrators: list[Calibrator], logits: Tensor, target: Tensor, fold_of: Tensor, n_bins: int, score: dict,
         seconds: list[float], may_change: bool) -> dict:
    """One table row: the metrics of the rows whose out-of-fold probabilities are finite, how many were not, the
    fit time."""
    state, unscored = _out_of_fold_state(calibrators, logits, target, fold_of, n_bins)
    return {**_score(state, **score), "n_unscored": unscored, "fit_s": sum(seconds) / len(seconds),
            "may_change_prediction": may_change}


def __getattr__(name: str):
    # The math layer's comparison had the top-level name too, with another first argument (issue 16).
    if name == "compare_calibrators":
        warn_renamed("fastai_ls.calibration.compare.compare_calibrators",
                     "fastai_ls.compare_calibrators (or fastai_ls.calibration.compare.compare_on_logits)")
        return compare_on_logits
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
