"""fastai's trackers (`SaveModelCallback`, `EarlyStoppingCallback`, `ReduceLROnPlateau`) on calibration columns.

fastai guesses a tracker's direction from the monitored name: lower is better only for a name with "loss" or "error"
in it, the wrong way for ECE, NLL, Brier... Each `CalibrationMetric` declares its direction (`comp`, from
`METRIC_COMPARISONS`); before a fit, `align_trackers` turns round a tracker on such a column that still has fastai's
guess, `np.greater`. A `comp` the user chose otherwise (say `operator.gt`, to keep the highest ECE) is kept, and so
is `min_delta`'s meaning. `check_trackers` refuses, with what to change, a tracker that would fail in fastai's own
bare assert ("IndexError: tuple index out of range") or watch a column that is always NaN.
"""

from __future__ import annotations

from collections.abc import Iterable

from fastai.learner import Learner

from fastai_ls.integration.columns import METRIC_COMPARISONS, CalibrationMetric
from fastai_ls.integration.fastai_compat import prefixed_columns, sit_out, tracker_monitor, turn_tracker

__all__ = ["check_trackers", "align_trackers"]


def _column(monitor: str) -> str:
    """The column name without the `valid_` prefix of `Recorder(train_metrics=True)`."""
    return monitor[len("valid_"):] if monitor.startswith("valid_") else monitor


def _problems(learn: Learner, ours: set[str]) -> list[tuple[object, str]]:
    """Each tracker on a calibration metric that will not be a column of its own name, with what to change."""
    others = {m.name for m in learn.metrics if not isinstance(m, CalibrationMetric)}
    prefixed = prefixed_columns(learn)
    problems = []
    for tracker in learn.cbs:
        monitor = tracker_monitor(tracker)
        if monitor is None:
            continue
        kind, column = type(tracker).__name__, _column(monitor)
        if monitor.startswith("train_") and monitor[len("train_"):] in ours:
            problems.append((tracker, f"{kind} monitors {monitor!r}, which is NaN in every epoch: "
                                      "CalibrationCallback scores validation passes only"))
        elif column in METRIC_COMPARISONS and column not in ours | others:
            problems.append((tracker, f"{kind} monitors {monitor!r}, but no callback adds that column; add it "
                                      f"with CalibrationCallback(metrics=(..., {column!r}))"))
        elif column in ours and monitor != (want := f"valid_{column}" if prefixed else column):
            problems.append((tracker, f"{kind} monitors {monitor!r}, but the column is {want!r} (Recorder's "
                                      f"train_metrics={prefixed})"))
    return problems


def check_trackers(learn: Learner, ours: set[str], validating: bool) -> None:
    """Raise a ValueError naming the first tracker on a calibration metric that will not be a column of its name.

    Parameters
    ----------
    learn : Learner
        The learner, at `before_fit`.
    ours : set of str
        The columns the learner's calibration callbacks add.
    validating : bool
        Whether this is the fit fastai runs around `validate()`/`get_preds()`: there, such trackers also sit the
        pass out (fastai's own assert in their `before_fit` would keep `learn.lock` held for good).

    >>> check_trackers(learn, {"ece"}, validating=False)  # doctest: +SKIP
    """
    problems = _problems(learn, ours)
    if validating:
        for tracker, _ in problems:
            sit_out(tracker)
    if problems:
        raise ValueError(problems[0][1])


def align_trackers(learn: Learner, columns: Iterable[CalibrationMetric]) -> None:
    """Give each fastai tracker on one of `columns` the direction the column declares (`CalibrationMetric.comp`),
    where the tracker has fastai's guess.

    Parameters
    ----------
    learn : Learner
        The learner whose callbacks include the trackers.
    columns : iterable of CalibrationMetric
        The columns of one callback.

    >>> align_trackers(learn, cb._metrics)  # SaveModelCallback(monitor='ece') keeps the lowest ECE  # doctest: +SKIP
    """
    comps = {column.name: column.comp for column in columns}
    for tracker in learn.cbs:
        monitor = tracker_monitor(tracker)
        if monitor is not None and _column(monitor) in comps:
            turn_tracker(tracker, comps[_column(monitor)])
