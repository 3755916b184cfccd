"""The columns a `CalibrationCallback` adds to fastai's progress table: one `CalibrationMetric` per name, which way
each is better (for fastai's trackers), and the names a callback's `history` has."""

from __future__ import annotations

import difflib
import math

import numpy as np
from fastai.callback.core import Callback
from fastai.learner import Learner, ValueMetric

from fastai_ls.calibration.state import INTERVAL_COLUMNS, INTERVAL_NAMES, METRIC_NAMES

__all__ = ["CalibrationMetric", "HISTORY_COLUMNS", "METRIC_COMPARISONS", "LOWER_IS_BETTER", "check_metric_names",
           "remove_columns"]

# Every metric, then the lower and upper limit of each metric that has an interval (NaN when `ci=None`).
HISTORY_COLUMNS = ("epoch",) + METRIC_NAMES + INTERVAL_COLUMNS
# The metrics that are better when lower. `n` (rows scored), `confidence` (mean top-label probability) and the
# standard errors `nll_se`, `brier_se` measure no quality: they are "higher", fastai's own guess for a name without
# "loss" or "error"; to find the best-calibrated epoch, monitor `ece` or `nll`.
LOWER_IS_BETTER = ("n_invalid", "ece", "mce", "rmsce", "ece_debiased", "adaptive_ece", "smece", "ks_error",
                   "classwise_ece", "overconfidence", "underconfidence", "nll", "brier", "aurc", "augrc")
# Which way is better for each column, as fastai's trackers compare (np.less: lower is better). An interval's limits
# go the way of their metric.
METRIC_COMPARISONS = {name: np.less if name in LOWER_IS_BETTER else np.greater for name in METRIC_NAMES}
METRIC_COMPARISONS |= {column: METRIC_COMPARISONS[column.rsplit("_", 1)[0]] for column in INTERVAL_COLUMNS}


class CalibrationMetric(ValueMetric):
    """One calibration metric of a `CalibrationCallback` as a fastai metric: a progress-table column.

    The callback makes one for each name in its `metrics`; a user never needs to.

    Parameters
    ----------
    cb : CalibrationCallback
        The callback whose validation passes the column reports.
    metric_name : str
        The column's name, one of `METRIC_NAMES` or `INTERVAL_COLUMNS`.
    """

    def __init__(self, cb: Callback, metric_name: str):
        """Column `metric_name` of `cb`."""
        super().__init__(func=None, metric_name=metric_name)
        self.cb = cb

    @property
    def comp(self):
        """Which way is better, as fastai's trackers compare: np.less (lower is better) or np.greater."""
        return METRIC_COMPARISONS[self.metric_name]

    @property
    def value(self) -> float:
        """The metric of the validation pass that just ended; NaN if that pass had no labels to score."""
        # With `Recorder(train_metrics=True)` fastai also asks after training, when there is no training value.
        learn = self.cb.learn
        if learn is not None and getattr(learn, "training", False):
            return math.nan
        return self.cb.pass_value(self.metric_name)


def check_metric_names(metrics, ci: float | None) -> tuple[str, ...]:
    """The column names, in order and without repeats; a ValueError names an unknown one (with the closest name).

    >>> check_metric_names(("ece", "nll", "ece"), ci=0.95)
    ('ece', 'nll')
    """
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    for m in metrics:
        if m not in METRIC_NAMES + INTERVAL_COLUMNS:
            close = difflib.get_close_matches(str(m).lower(), METRIC_NAMES + INTERVAL_COLUMNS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown calibration metric {m!r}{hint}; the metrics are {', '.join(METRIC_NAMES)}, "
                             f"and the interval limits <metric>_lo and <metric>_hi of {', '.join(INTERVAL_NAMES)}")
    if ci is None and any(m in INTERVAL_COLUMNS for m in metrics):
        raise ValueError("interval columns need a confidence level: pass ci=0.95 (or another level)")
    return tuple(dict.fromkeys(metrics))


def remove_columns(learn: Learner, drop) -> None:
    """Take the calibration columns `m` with `drop(m)` out of `learn.metrics` (the other metrics keep their order).

    >>> remove_columns(learn, lambda m: m.cb is cb)  # doctest: +SKIP
    """
    metrics = getattr(learn, "metrics", None)
    if metrics is not None and any(isinstance(m, CalibrationMetric) and drop(m) for m in metrics):
        learn.metrics = [m for m in metrics if not (isinstance(m, CalibrationMetric) and drop(m))]
