"""One model's best post-hoc calibrator, chosen and scored by cross-fitting on its held-out logits, and the paired
per-row differences of two models on the same rows, as trained and after each one's best calibrator."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from fastai_ls.calibration.calibrators import CalibrationWarning, TemperatureScaling, stratified_folds
from fastai_ls.calibration.calibrators.base import calibration_messages
from fastai_ls.calibration.compare import compare_on_logits, cross_fit
from fastai_ls.calibration.scores import paired_difference, row_scores
from fastai_ls.calibration.state import CalibrationState

__all__ = ["Calibrated", "best_method", "calibrate_learner", "PAIRED", "paired_differences"]

# The per-row scores whose differences pair up row by row, as they are named in the tables.
PAIRED = ("error_rate", "nll", "brier")


def best_method(table: pd.DataFrame, tolerance: float = 1e-4) -> str:
    """The row of a `compare_calibrators` table with the lowest cross-fitted NLL, 'uncalibrated' included; of rows
    within `tolerance` of it, the first (the simpler method, in `CALIBRATORS` order: ensemble temperature scaling
    that puts all its weight on one temperature is temperature scaling).

    NLL is a proper scoring rule: it cannot be lowered by predicting anything but the probabilities one believes,
    whereas ECE alone can (predicting every row's confidence as the overall accuracy gives ECE 0).

    Parameters
    ----------
    table : pandas.DataFrame
        A `compare_calibrators` table.
    tolerance : float
        NLL differences (nats per row) smaller than this count as ties.

    Returns
    -------
    str

    Examples
    --------
    >>> nll = pd.DataFrame({"nll": [0.3, 0.20004, 0.2]}, index=["uncalibrated", "temperature", "ets"])
    >>> best_method(nll), best_method(nll, tolerance=0)
    ('temperature', 'ets')
    """
    nll = table["nll"]
    return str(nll.index[nll <= nll.min() + tolerance][0])


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


def calibrate_learner(logits: Tensor, target: Tensor, methods: list[str], folds: int = 5, seed: int = 0,
                      ci: float = 0.95) -> Calibrated:
    """Compare calibrators on held-out logits by cross-fitting (`compare_calibrators`: no row is scored by a
    calibrator fitted on it), and keep the best one's out-of-fold probabilities.

    Parameters
    ----------
    logits : Tensor
        (N, C) held-out logits.
    target : Tensor
        (N,) their class ids.
    methods : list of str
        Calibration methods (names of `CALIBRATORS`).
    folds : int, default 5
        Stratified folds.
    seed : int, default 0
        Seed of the folds and of the bootstrap intervals.
    ci : float, default 0.95
        Confidence level of the table's intervals.

    Returns
    -------
    Calibrated

    Examples
    --------
    >>> calibrate_learner(logits, target, ["temperature", "dirichlet"]).best  # doctest: +SKIP
    'temperature'
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CalibrationWarning)
        table = compare_on_logits(logits, target, methods=methods, folds=folds, seed=seed, ci=ci)
        temperature = TemperatureScaling().fit(logits, target).temperature
    best = best_method(table)
    before = TemperatureScaling(1.0)(logits)  # the model's own probabilities, as compare_calibrators scores them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)  # the same fits as in the table, which reported them
        after = before if best == "uncalibrated" else \
            cross_fit(best, logits, target, stratified_folds(target, folds, seed))[0]
    state = CalibrationState(logits.shape[1])
    state.update(after, target)
    messages = calibration_messages(caught)
    return Calibrated(table, best, state, temperature, list(dict.fromkeys(messages)), before, after, target)


def paired_scores(probs: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Each row's error (0 or 1), NLL and Brier score in float64, named as in the tables (`PAIRED`).

    Parameters
    ----------
    probs : Tensor
        (N, C) probabilities.
    target : Tensor
        (N,) class ids.

    Returns
    -------
    dict of str to Tensor

    Examples
    --------
    >>> paired_scores(torch.tensor([[0.75, 0.25], [0.5, 0.5]]), torch.tensor([0, 1]))["error_rate"].tolist()
    [0.0, 1.0]
    """
    scores = row_scores(probs.double(), target)
    return {"error_rate": 1 - scores["correct"], "nll": scores["nll"], "brier": scores["brier"]}


def paired_differences(first: Calibrated, second: Calibrated, ci: float = 0.95) -> pd.DataFrame:
    """`second` minus `first`, row by row on the same held-out rows: the mean difference of each row's error, NLL
    and Brier score with its normal interval (`paired_difference`), for the models as trained and after each
    one's best calibrator. Pairing removes what the rows share, so these intervals are narrower than the two
    models' intervals side by side, and a difference whose interval excludes 0 is resolved by these rows.

    Parameters
    ----------
    first : Calibrated
        One model's calibration (the one subtracted).
    second : Calibrated
        The other model's, on the same rows (same targets, in the same order).
    ci : float, default 0.95
        Confidence level.

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
        a, b = (paired_scores(getattr(model, stage), first.target) for model in (first, second))
        for metric in PAIRED:
            estimate, lower, upper = paired_difference(a[metric], b[metric], ci)
            rows[(stage, metric)] = {"estimate": estimate, "lower": lower, "upper": upper}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(["stage", "metric"])
