"""`CalibrationCallback`: track confidence against accuracy on the validation set during `fit`, and plot it.

The callback is a thin shell around `CalibrationState` (fastai_ls/calibration/state.py): one `update` per validation
batch on the model's device, one `all_reduce` and one read-back per validation pass.
"""

from __future__ import annotations

import difflib
import math
import numbers
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback
from fastai.callback.tracker import TrackerCallback
from fastai.distributed import DistributedDL
from fastai.learner import Learner, ValueMetric
from fastai.torch_core import TensorMultiCategory
from fastai.vision.core import PILBase, PILMask
from torch import Tensor, nn

from fastai_ls.calibration.intervals import check_ci, check_interval_grid, check_seed
from fastai_ls.calibration.plots import (
    bin_frame,
    plot_history,
    plot_reliability,
    plot_risk_coverage,
    plot_smooth_reliability,
)
from fastai_ls.calibration.report import report_frame
from fastai_ls.calibration.state import (
    CLASSWISE_MAX_CLASSES,
    INTERVAL_COLUMNS,
    INTERVAL_NAMES,
    METRIC_NAMES,
    CalibrationState,
    check_n_bins,
)
from fastai_ls.integration.class_axis import class_axis_of, class_rows
from fastai_ls.validation import is_class_id_dtype, plain

if TYPE_CHECKING:  # matplotlib is imported only when a plot is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["CalibrationCallback", "CalibrationMetric", "HISTORY_COLUMNS", "METRIC_COMPARISONS"]

# Every metric, then the lower and upper limit of each metric that has an interval (NaN when `ci=None`).
HISTORY_COLUMNS = ("epoch",) + METRIC_NAMES + INTERVAL_COLUMNS
# Losses whose targets are not single class ids: the callback refuses them at `before_fit`.
_NOT_CLASS_ID_LOSSES = (nn.BCEWithLogitsLoss, nn.BCELoss, nn.MultiLabelSoftMarginLoss, nn.MultiLabelMarginLoss,
                        nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.KLDivLoss, nn.GaussianNLLLoss,
                        nn.PoissonNLLLoss)
# Which way is better for each column, for fastai's trackers (SaveModelCallback, EarlyStoppingCallback,
# ReduceLROnPlateau). fastai guesses np.greater for every name without "loss" or "error" (REFERENCE.md §4): the wrong
# way for all the error-like columns, which `CalibrationCallback.before_fit` turns round. `n` (rows scored),
# `confidence` (mean top-label probability) and the standard errors `nll_se`, `brier_se` measure no quality: they
# keep np.greater, fastai's own guess, and a user who wants the best-calibrated epoch monitors `ece` or `nll`. An
# interval's limits go the way of their metric.
_LOWER_IS_BETTER = ("n_invalid", "ece", "mce", "rmsce", "ece_debiased", "adaptive_ece", "smece", "ks_error",
                    "classwise_ece", "overconfidence", "underconfidence", "nll", "brier", "aurc", "augrc")
METRIC_COMPARISONS = {name: np.less if name in _LOWER_IS_BETTER else np.greater for name in METRIC_NAMES}
METRIC_COMPARISONS |= {column: METRIC_COMPARISONS[column.rsplit("_", 1)[0]] for column in INTERVAL_COLUMNS}


class CalibrationMetric(ValueMetric):
    """One calibration metric of a `CalibrationCallback` as a fastai metric: a progress-table column.

    The callback makes one for each name in its `metrics`; a user never needs to.

    Parameters
    ----------
    cb : CalibrationCallback
        The callback whose validation passes the column reports.
    metric_name : str
        The column's name, one of `METRIC_NAMES`.
    """

    def __init__(self, cb: CalibrationCallback, metric_name: str):
        """Column `metric_name` of `cb`."""
        super().__init__(func=None, metric_name=metric_name)
        self.cb = cb

    @property
    def value(self) -> float:
        """The metric of the validation pass that just ended; NaN if that pass had no labels to score."""
        # With `Recorder(train_metrics=True)` fastai also asks after training, when there is no training value.
        learn = self.cb.learn
        if (learn is not None and getattr(learn, "training", False)) or not self.cb._scored:
            return math.nan
        return self.cb.last_metrics.get(self.metric_name, math.nan)


class CalibrationCallback(Callback):
    """Calibration metrics of every validation pass, counted on the model's device; `metrics` become columns.

    Parameters
    ----------
    n_bins : int, default 15
        Equal-width confidence bins for ECE, MCE, RMSCE, classwise ECE and the reliability diagram.
    metrics : str or sequence of str, default ('ece',)
        The metrics to add as columns to fastai's progress table, and so to `CSVLogger` and to what
        `SaveModelCallback`, `EarlyStoppingCallback` and `ReduceLROnPlateau` can monitor. Every metric is computed
        either way and lands in `history` and `last_metrics`. The names (`METRIC_NAMES`):

        - n (rows scored), n_invalid (rows left out: NaN/inf), accuracy, confidence (mean top-label probability);
        - ece, mce, rmsce (equal-width bins, L1/max/L2), ece_debiased, adaptive_ece (equal-mass bins), smece
          (smooth ECE), ks_error, classwise_ece, overconfidence, underconfidence;
        - nll, nll_se, brier, brier_se (with standard errors), aurc, augrc (selective classification).

        and the interval limits `<metric>_lo`, `<metric>_hi` (`INTERVAL_COLUMNS`, e.g. 'ece_hi', with `ci` set) of
        accuracy, confidence, ece, mce, rmsce, ece_debiased, adaptive_ece, smece, ks_error, overconfidence,
        underconfidence, nll, brier, aurc, augrc.
    n_fine : int, default 1000
        Fine equal-width bins behind adaptive and smooth ECE, the KS error, AURC and AUGRC: their resolution in
        confidence, and the cells the bootstrap resamples.
    classwise : bool or None, default None
        Keep classwise ECE. None keeps it for at most `CLASSWISE_MAX_CLASSES` classes and leaves it NaN above (a
        language model's vocabulary): it needs 3 * C * n_bins counters and per-batch work in proportion to the
        predictions' size, and at large C it mostly measures the calibration of p ~ 0.
    ci : float or None, default 0.95
        Level of the confidence intervals in `history` (`<metric>_lo`, `<metric>_hi`) and `report()`; None for none.
    n_boot : int, default 1000
        Bootstrap replicates per interval.
    seed : int or None, default 0
        Seed of the bootstrap: the same seed gives the same intervals.

    Attributes
    ----------
    history : pandas.DataFrame
        One row per epoch of the last fit, columns `HISTORY_COLUMNS`.
    states : list of CalibrationState
        The counters of each epoch of the last fit (on the CPU): what `bins`, `plot_reliability` and `state_of` read.
    state : CalibrationState or None
        The counters of the last scored validation pass, in a fit or not.
    last_metrics : dict of str to float
        The metrics of `state` (every name of `METRIC_NAMES`); {} before the first scored pass.

    Examples
    --------
    >>> from fastai.callback.tracker import SaveModelCallback
    >>> cb = CalibrationCallback(n_bins=15, metrics=('ece', 'nll'))
    >>> cb.name  # so `learn.calibration` once it is attached
    'calibration'
    >>> learn.fit_one_cycle(4, cbs=[cb, SaveModelCallback(monitor='ece')])  # doctest: +SKIP
    >>> cb.history[['epoch', 'ece', 'nll']]  # doctest: +SKIP

    Notes
    -----
    Passes: in `fit`, each epoch's validation pass adds one row to `history` and one state to `states`; both restart
    with every `fit`, like `learn.recorder.values`. Any other validation pass (`learn.validate()`,
    `learn.get_preds()`, on any `dl`, also when another callback runs one inside a fit) only replaces `state` and
    `last_metrics`, so it never adds to, resets or double counts in the history, and the rows keep the fit's epoch
    (fastai sets `learn.epoch` to 0 for such a pass). A pass without labels
    (`learn.predict(item)`, `get_preds` on an unlabelled `test_dl`) has nothing to score: `state` and `last_metrics`
    both keep the last scored pass, and that pass's columns are NaN. Only validation batches are seen, with hard
    labels, so MixUp/CutMix in training do not matter.

    Targets: integer class ids, one per item, or one per position of dense (N, C, d1, ...) predictions on the loss's
    class axis: segmentation masks (`MaskBlock`, `SegmentationDataLoaders`, `unet_learner`), token ids. Targets equal
    to the loss's `ignore_index` are left out. Multi-label, soft or regression targets are refused with a ValueError:
    at `before_fit` in `fit`; inside `validate()`/`get_preds()` at the first labelled batch, so that fastai releases
    `learn.lock` and the learner stays usable (`predict` still works).

    One per learner: a second CalibrationCallback (say `fit(cbs=...)` on `pets_learner()`, which has one) replaces
    the first while it is attached, with a warning, and puts it back when it leaves (at the end of that fit), so no
    column is there twice and `learn.calibration` is always the callback in `learn.cbs`.

    Columns: they sit in `learn.metrics` while the callback is attached and leave with it (after
    `learn.fit(n, cbs=cb)`, `learn.validate(cbs=cb)`, `learn.remove_cb(cb)`, also when a fit raised), so no later fit
    records a frozen value.

    Trackers: fastai's `TrackerCallback`s take a column without "loss" or "error" in its name for higher-is-better.
    For a tracker on one of this callback's columns (`monitor='ece'`, or `'valid_ece'` under
    `Recorder(train_metrics=True)`), `before_fit` sets the direction from `METRIC_COMPARISONS`: np.less for the
    error-like columns (ECE, NLL, Brier...), np.greater for `accuracy`, with `min_delta` keeping its meaning. A
    `comp=np.greater` on an error-like column is taken for fastai's guess and turned round; to keep the highest
    value anyway, pass another comparison, e.g. `comp=operator.gt`. A tracker on one of `METRIC_NAMES` that no
    callback adds as a column, on a `train_` column (always NaN) or on a misspelt prefix (`valid_ece` without
    `train_metrics`) is a ValueError at `before_fit` that says what to change (inside `validate()`/`get_preds()`,
    where fastai's own assert in the tracker would keep `learn.lock`, the tracker sits that pass out).

    Intervals (`ci`): `history` has `<metric>_lo`/`<metric>_hi` columns, `report()` a table of estimate, lower and
    upper per metric. A bootstrap costs up to ~0.5 s, so the intervals are computed when first read, once per
    epoch, not in the training loop, unless an interval column is a progress-table column (then at each epoch's
    end). The same seed gives the same intervals either way.
    """

    order = 45  # after MixedPrecision (10, fp32 preds) and DistributedTrainer (11, DistributedDL); before Recorder (50)
    run_train = False

    def __init__(
        self,
        n_bins: int = 15,
        metrics: Sequence[str] | str = ("ece",),
        n_fine: int = 1000,
        classwise: bool | None = None,
        ci: float | None = 0.95,
        n_boot: int = 1000,
        seed: int | None = 0,
    ):
        """Check the arguments; the counters are made at the first validation batch, once C is known."""
        self.n_bins, self.n_fine = check_n_bins(n_bins), check_n_bins(n_fine, "n_fine")
        self.classwise = classwise
        if ci is not None:
            check_ci(ci, n_boot)
            check_interval_grid(self.n_bins, self.n_fine)  # else every epoch's intervals, and `history`, would fail
        self.ci, self.n_boot, self.seed = ci, n_boot, check_seed(seed)
        metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
        for m in metrics:
            if m not in METRIC_NAMES + INTERVAL_COLUMNS:
                raise ValueError(_unknown_metric_message(m))
        if ci is None and any(m in INTERVAL_COLUMNS for m in metrics):
            raise ValueError("interval columns need a confidence level: pass ci=0.95 (or another level)")
        self._eager_intervals = any(m in INTERVAL_COLUMNS for m in metrics)
        self.metric_names = tuple(dict.fromkeys(metrics))
        self._metrics = [CalibrationMetric(self, m) for m in self.metric_names]
        self.state: CalibrationState | None = None  # the last scored validation pass, on the CPU
        self.states: list[CalibrationState] = []  # one per epoch of the last fit, on the CPU
        self.last_metrics: dict[str, float] = {}  # the metrics of `state`
        self._rows: list[dict] = []
        self._pass: CalibrationState | None = None
        self._new_fit, self._in_fit, self._warned_invalid, self._sharded = False, False, False, False
        self._scored = False  # whether the validation pass that just ended had labels to score
        self._deferred: Exception | None = None  # an error of before_fit inside validate()/get_preds(), raised later
        self._depth = 0  # how many fits (fastai's own or those around validate/get_preds) are running
        self._outer: list[tuple] = []  # the passes of the fits around a nested validate/get_preds, innermost last
        self._epoch: int | None = None  # the epoch of the outermost fit, which `learn.epoch` loses to nested passes
        self._nested = False  # whether a nested pass ran since the fit's last after_epoch

    @property
    def learn(self) -> Learner | None:
        """The learner this callback is attached to; fastai sets it in `add_cb` and clears it in `remove_cb`."""
        # Kept under the instance key fastai's plain attribute used, so pickles (`learn.export()`) look the same.
        return self.__dict__.get("learn")

    @learn.setter
    def learn(self, learn: Learner | None) -> None:
        # fastai's `remove_cb` sets `learn` to None, also when `fit(cbs=...)`/`validate(cbs=...)` take their callbacks
        # out again and when a fit raised: the moment this callback leaves, so its columns leave with it. Left in
        # `learn.metrics`, they would show its last value, frozen, in every later fit.
        old = self.__dict__.get("learn")
        if old is not None and old is not learn:
            _remove_columns(old, self)
            self._put_back_replaced(old)
        self.__dict__["learn"] = learn
        if learn is not None and learn is not old:
            self.__dict__.pop("_leaving_name", None)
            self._replace_others(learn)

    @property
    def name(self) -> str:
        """'calibration': fastai makes the attached callback `learn.calibration`."""
        # Read once by fastai's `remove_cb`, right after `learn` is cleared, to delete `learn.calibration`: after
        # putting back the callback this one replaced, that read gets a name the learner lacks, so that it stays.
        return self.__dict__.pop("_leaving_name", "calibration")

    def _replace_others(self, learn: Learner) -> None:
        """Take the learner's other CalibrationCallbacks out while this one is attached: two would add every column
        twice, and `learn.calibration` would name only one of them."""
        others = [cb for cb in getattr(learn, "cbs", ()) if isinstance(cb, CalibrationCallback) and cb is not self]
        if not others:
            return
        warnings.warn(f"this learner already has a CalibrationCallback (metrics {others[0].metric_names}): the new "
                      f"one (metrics {self.metric_names}) replaces it, and puts it back when it is removed (as "
                      "fit(cbs=...) does at the end of the fit); learn.calibration is the new one meanwhile",
                      stacklevel=4)
        for cb in others:
            learn.remove_cb(cb)
        self.__dict__["_replaced"] = others

    def _put_back_replaced(self, learn: Learner) -> None:
        """Attach again the callbacks this one replaced, now that it leaves `learn`."""
        replaced = self.__dict__.pop("_replaced", [])
        if not replaced:
            return
        for cb in replaced:
            if cb.learn is None and cb not in learn.cbs:
                cb.__dict__["learn"] = learn  # not through `learn.add_cb`: that would find this one and replace it
                learn.cbs.append(cb)
        learn.calibration = replaced[-1]
        self.__dict__["_leaving_name"] = "_calibration_left"

    # --- events --------------------------------------------------------------------------------------------------

    def before_fit(self):
        """Check the targets and trackers, add this callback's columns to `learn.metrics`, set trackers' direction."""
        self._deferred = None
        # Replace this callback's columns (and those of callbacks since removed) so repeated fits add none twice.
        kept = [m for m in self.learn.metrics
                if not (isinstance(m, CalibrationMetric) and (m.cb is self or m.cb not in self.learn.cbs))]
        self.learn.metrics = kept + self._metrics
        validating = _in_validation_context(self.learn)
        try:
            problems = _tracker_problems(self.learn)
            if validating:
                # fastai's own check in these trackers' before_fit (a bare assert) would fail with the lock held; a
                # callback's `run` comes back at after_fit.
                for tracker, _ in problems:
                    tracker.run = False
            if problems:
                raise ValueError(problems[0][1])
            check_class_id_targets(self.learn)
            self._align_trackers()
        except Exception as error:
            # Inside validate()/get_preds() fastai fires before_fit while it enters its context managers, with
            # `learn.lock` taken and the `with` not yet started: an error raised here would keep the lock for good and
            # hang every later predict/get_preds. It is raised at the first labelled batch instead, inside the `with`.
            if not validating:
                raise
            self._deferred = error
        # fastai fires before_fit/after_fit around `validate()` and `get_preds()` too, and another callback may run
        # those inside a fit: only the outermost fit may start or end the recording. A fit that raised never fired
        # its after_fit; validate/get_preds hold `learn.lock`, so a before_fit without it is a new outermost fit.
        if not validating:
            self._depth, self._outer, self._epoch, self._nested = 0, [], None, False
            _warn_if_calibrated(self.learn)
        elif self._depth:
            # A pass inside a fit: fastai's TrainEvalCallback has just set `learn.epoch` to 0, and this pass's
            # before_validate will start counters of its own. Keep the fit's pass (a callback may validate between its
            # last batch and its after_validate) for after_fit to put back.
            self._outer.append((self._pass, self._scored, self._sharded))
            self._nested = True
        self._depth += 1
        if self._depth == 1:
            self._new_fit, self._in_fit = True, False

    def before_epoch(self):
        """Note the fit's epoch, which the rows are labelled with."""
        if self._depth == 1:
            # A pass run by a callback before this one in this event has already set `learn.epoch` to 0.
            self._epoch = self._epoch + 1 if self._nested and self._epoch is not None else self.learn.epoch
            self._nested = False

    def before_train(self):
        """Start a new history at a fit's first training phase."""
        # Only a real fit trains, so the history restarts here rather than around a bare validation pass.
        if self._new_fit and not hasattr(self.learn, "lr_finder"):
            self.states, self._rows = [], []
            self._new_fit, self._in_fit = False, True

    def before_validate(self):
        """Start a pass."""
        # The counters are made at the first labelled batch, when the number of classes is known; `state` and
        # `last_metrics` keep the last scored pass until this one is scored.
        self._pass, self._scored = None, False
        # Only a pass over shards is summed over processes: after `distrib_ctx`, `get_preds` on any rank sees the
        # whole data set, with the process group still up.
        self._sharded = isinstance(self.learn.dl, DistributedDL)

    def after_batch(self):
        """Add the batch's predictions and targets to the pass's counters, on their device."""
        if len(self.yb) == 0:  # `predict`, or `get_preds` on an unlabelled test set: nothing to score against
            return
        if self._deferred is not None:
            error, self._deferred = self._deferred, None
            raise error
        probs, target, rows_per_item = self._rows_of_batch(self.pred, self.yb[0])
        if self._pass is None:
            n_classes = probs.shape[1]
            classwise = n_classes <= CLASSWISE_MAX_CLASSES if self.classwise is None else self.classwise
            self._pass = CalibrationState(n_classes, self.n_bins, self.n_fine, device=probs.device,
                                          classwise=classwise)
        weight = _padding_weight(self.learn.dl, target.shape[0] // rows_per_item, rows_per_item, probs.device)
        self._pass.update(probs, target, weight=weight, ignore_index=getattr(self.learn.loss_func, "ignore_index",
                                                                             None), check=False)

    def after_validate(self):
        """Bring the pass's counters to the CPU (summed over processes if sharded): `state`, `last_metrics`, a row."""
        if self._pass is None:  # no labelled batch: `state` and `last_metrics` stay those of the last scored pass
            return
        state = self._pass.all_reduce() if self._sharded else self._pass
        state, self._pass = state.to("cpu"), None  # the one host synchronisation of the pass
        self.state, self.last_metrics, self._scored = state, self._metrics_of(state), True
        n_bad = float(state.scalar("n_bad_target"))
        if n_bad:
            raise ValueError(f"{n_bad:.0f} validation targets are not class ids in [0, {state.n_classes})")
        if self.last_metrics["n_invalid"] and not self._warned_invalid:
            self._warned_invalid = True
            warnings.warn(f"{self.last_metrics['n_invalid']:.0f} validation predictions were not finite (NaN/inf); "
                          "they are left out of the calibration metrics and counted in `n_invalid`", stacklevel=2)
        if self._in_fit and self._depth == 1:
            self.states.append(state)
            self._rows.append({"epoch": self._epoch, **self.last_metrics})

    def after_epoch(self):
        """A pass run after this point (in after_epoch) still belongs to this epoch: `learn.epoch` is right again at
        the next before_epoch."""
        if self._depth == 1:
            self._nested = False

    def after_fit(self):
        """End the recording at the end of the outermost fit."""
        # Not also in after_cancel_fit: fastai fires after_fit after it.
        self._deferred = None
        if self._depth > 1 and self._outer:
            self._pass, self._scored, self._sharded = self._outer.pop()
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0:
            self._in_fit = False

    def _align_trackers(self) -> None:
        """Give fastai's trackers on this callback's columns the direction of `METRIC_COMPARISONS`."""
        for tracker in self.learn.cbs:
            column = _monitored_column(tracker)
            if column not in self.metric_names:
                continue
            want = METRIC_COMPARISONS.get(column)
            if want is None:
                warnings.warn(f"CalibrationCallback does not know whether a higher or a lower {column!r} is better; "
                              f"{type(tracker).__name__} keeps comp={tracker.comp}", stacklevel=2)
            elif want is np.less and tracker.comp is np.greater:
                tracker.comp, tracker.min_delta = np.less, -tracker.min_delta
                tracker.best = None  # a best kept from an earlier fit (reset_on_fit=False) was the worst one

    # --- results -------------------------------------------------------------------------------------------------

    @property
    def history(self) -> pd.DataFrame:
        """One row per epoch of the last fit: `epoch`, every metric of `METRIC_NAMES`, and the limits of the
        intervals (`INTERVAL_COLUMNS`, NaN when `ci` is None); together `HISTORY_COLUMNS`. Intervals not computed
        yet are computed here, once per epoch.

        >>> CalibrationCallback().history.columns[:5].tolist()
        ['epoch', 'n', 'n_invalid', 'accuracy', 'confidence']
        """
        if self.ci is not None:
            for row, state in zip(self._rows, self.states):
                if INTERVAL_COLUMNS[0] not in row:
                    row.update(self._metrics_of(state, intervals=True))
        return pd.DataFrame(self._rows, columns=list(HISTORY_COLUMNS))

    def _metrics_of(self, state: CalibrationState, intervals: bool | None = None) -> dict[str, float]:
        """The state's metrics, with intervals if asked (by default: if a progress-table column needs them)."""
        with_ci = self._eager_intervals if intervals is None else intervals
        return state.metrics(ci=self.ci if with_ci else None, n_boot=self.n_boot, seed=self.seed)

    def report(self, epoch: int = -1, ci: float | None = None) -> pd.DataFrame:
        """One row per metric of an epoch (default the last): estimate, lower, upper and how the interval was made.

        >>> cb.report().loc['ece', ['estimate', 'lower', 'upper']]  # doctest: +SKIP
        """
        level = self.ci if ci is None else ci
        metrics = self.state_of(epoch).metrics(ci=level, n_boot=self.n_boot, seed=self.seed)
        return report_frame(metrics, level)

    def risk_coverage(self, epoch: int = -1) -> pd.DataFrame:
        """The risk-coverage curve of an epoch (default the last), one row per non-empty fine cell, most confident
        first: threshold (rows above it accepted), coverage, risk (errors / accepted), generalized_risk
        (errors / all rows). AURC and AUGRC are the areas under the two risks."""
        return pd.DataFrame({k: v.numpy() for k, v in self.state_of(epoch).risk_coverage().items()})

    def bins(self, epoch: int = -1) -> pd.DataFrame:
        """The equal-width bins of one epoch: lo, hi, count, confidence, accuracy, gap = confidence - accuracy, and
        the Wilson interval of the accuracy (accuracy_lo, accuracy_hi).

        Parameters
        ----------
        epoch : int, default -1
            Index into the epochs of the last fit (-1: the last); outside a fit's history, the last scored pass.

        Examples
        --------
        >>> cb.bins()  # after learn.fit(...): one row per bin  # doctest: +SKIP
        """
        return bin_frame(self.state_of(epoch))

    def plot_reliability(self, epoch: int = -1, ax: Axes | None = None, title: str | None = None) -> Figure:
        """Reliability diagram of one epoch; returns the matplotlib figure.

        Parameters
        ----------
        epoch : int, default -1
            Index into the epochs of the last fit (-1: the last); outside a fit's history, the last scored pass.
        ax : matplotlib Axes or pair of Axes, optional
            None makes a figure with the counts in a panel below; a pair (diagram, panel) draws the same onto the
            caller's axes; one Axes gets the counts as an outline on a right-hand axis.
        title : str, optional
            Shown before the ECE in the title: "<title>: ECE x.xx%".

        Examples
        --------
        >>> fig = cb.plot_reliability(title='LS 0.1')  # doctest: +SKIP
        """
        return plot_reliability(self.state_of(epoch), ax=ax, title=title, ci=self.ci or 0.95)

    def plot_smooth_reliability(self, epoch: int = -1, ax: Axes | None = None, title: str | None = None) -> Figure:
        """Smooth reliability diagram with bootstrap band (none with `ci=None`) and confidence density; returns the
        figure. `ax` as for `plot_reliability`."""
        return plot_smooth_reliability(self.state_of(epoch), ax=ax, title=title, ci=self.ci, n_boot=self.n_boot,
                                       seed=self.seed)

    def plot_risk_coverage(self, epoch: int = -1, ax: Axes | None = None, title: str | None = None) -> Figure:
        """Risk-coverage plot of an epoch (default the last); returns the figure."""
        return plot_risk_coverage(self.state_of(epoch), ax=ax, title=title)

    def plot_history(self) -> Figure:
        """ECE, NLL and accuracy over the epochs of the last fit; returns the matplotlib figure.

        >>> fig = cb.plot_history()  # doctest: +SKIP
        """
        return plot_history(self.history)

    def state_of(self, epoch: int = -1) -> CalibrationState:
        """The counters of one epoch of the last fit, or of the last scored pass if no fit was recorded.

        Parameters
        ----------
        epoch : int, default -1
            Index into `states`, the epochs of the last fit (-1: the last).

        Examples
        --------
        >>> cb.state_of(0).metrics()['ece']  # the first epoch's ECE  # doctest: +SKIP
        """
        if not self.states:
            if self.state is None:
                raise ValueError("no validation pass recorded yet")
            return self.state
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) \
                or not -len(self.states) <= epoch < len(self.states):
            raise ValueError(f"epoch must be an int from {-len(self.states)} to {len(self.states) - 1}: the last fit "
                             f"recorded {len(self.states)} epochs, got {epoch!r}")
        return self.states[epoch]

    # --- per batch: shapes and dtypes only, never tensor values (no host synchronisation) --------------------------

    def _rows_of_batch(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, int]:
        """(rows, C) probabilities and (rows,) targets; `rows_per_item` > 1 for dense (N, C, d1, ...) predictions."""
        if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
            raise TypeError("CalibrationCallback needs one prediction tensor and one target tensor per batch")
        if not is_class_id_dtype(target.dtype):
            raise ValueError(f"CalibrationCallback needs integer class-id targets, got {target.dtype} "
                             "(multi-label, soft or regression targets have no top-label calibration)")
        # Plain tensors: fastai's subclasses (TensorCategory, TensorImage...) cost a Python dispatch on every op.
        pred, loss_func = plain(pred), self.learn.loss_func
        activation = getattr(loss_func, "activation", None)
        # A loss without an activation of its own is taken for cross-entropy on logits.
        probs = activation(pred) if callable(activation) else pred.float().softmax(class_axis_of(loss_func, pred.dim()))
        try:
            probs, target = class_rows(probs, target, loss_func)
        except ValueError as e:
            raise ValueError(f"CalibrationCallback {e}") from None
        return probs, target, probs.shape[0] // max(pred.shape[0], 1)


def _unknown_metric_message(name: object) -> str:
    """Why `name` is no column of the callback, with the closest name (case aside) and the names there are."""
    close = difflib.get_close_matches(str(name).lower(), METRIC_NAMES + INTERVAL_COLUMNS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (f"unknown calibration metric {name!r}{hint}; the metrics are {', '.join(METRIC_NAMES)}, and the interval "
            f"limits <metric>_lo and <metric>_hi of {', '.join(INTERVAL_NAMES)}")


def _warn_if_calibrated(learn: Learner) -> None:
    """Warn that a fit changes the model under a calibrator fitted to it (`apply_calibrator`)."""
    # Duck-typed (`posthoc.CalibratedActivation` holds `.calibrator`) so that the callback needs no post-hoc module.
    if getattr(vars(learn.loss_func).get("activation"), "calibrator", None) is not None:
        warnings.warn("a calibrator is applied to this learner (apply_calibrator): it was fitted to the model before "
                      "this fit, so CalibrationCallback scores, and get_preds returns, probabilities of a calibrator "
                      "that no longer fits the model. Fit it again after training, or call remove_calibrator(learn) "
                      "before training", stacklevel=3)


def _in_validation_context(learn) -> bool:
    """Whether `learn` is inside `validate()`/`get_preds()`: fastai holds `learn.lock` there, never in `fit`."""
    lock = getattr(learn, "lock", None)
    return lock is not None and lock.locked()


def _padding_weight(dl, n_items: int, rows_per_item: int, device: torch.device) -> Tensor | None:
    """0/1 row weights that drop the items `DistributedDL` repeats to pad the last shard; None if not distributed.

    Rank r reads [r * n_padded / ws, (r + 1) * n_padded / ws) of the padded index list, and `dl.i` has already
    grown by this batch, so the batch's first item sits at r * n_padded // ws + dl.i - n_items; only positions
    below `dl.n` are real. All Python integers: no device work to wait for."""
    if not isinstance(dl, DistributedDL) or not all(hasattr(dl, a) for a in ("i", "n", "n_padded")):
        return None
    start = dl.rank * dl.n_padded // dl.world_size + dl.i - n_items
    n_real = min(max(dl.n - start, 0), n_items)
    if n_real == n_items:
        return None
    keep = (torch.arange(n_items, device=device) < n_real).to(torch.float64)
    return keep.repeat_interleave(rows_per_item) if rows_per_item > 1 else keep


def _remove_columns(learn: Learner, cb: CalibrationCallback) -> None:
    """Take `cb`'s columns out of `learn.metrics` (the other metrics keep their order)."""
    metrics = getattr(learn, "metrics", None)
    if metrics is not None and any(isinstance(m, CalibrationMetric) and m.cb is cb for m in metrics):
        learn.metrics = [m for m in metrics if not (isinstance(m, CalibrationMetric) and m.cb is cb)]


def _monitored_column(cb: Callback) -> str | None:
    """The column a fastai tracker monitors, without the `valid_` prefix of `Recorder(train_metrics=True)`; None for
    any other callback."""
    if not isinstance(cb, TrackerCallback):
        return None
    monitor = cb.monitor
    return monitor[len("valid_"):] if monitor.startswith("valid_") else monitor


def _tracker_problems(learn: Learner) -> list[tuple[TrackerCallback, str]]:
    """Each fastai tracker on a calibration metric that will not be a column of its own name, with what to change.
    fastai's own check is a bare assert, which reaches the user as "IndexError: tuple index out of range"."""
    ours = {name for cb in learn.cbs if isinstance(cb, CalibrationCallback) for name in cb.metric_names}
    others = {m.name for m in learn.metrics if not isinstance(m, CalibrationMetric)}
    recorder = getattr(learn, "recorder", None)
    prefixed = recorder is not None and recorder.train_metrics and recorder.valid_metrics  # train_/valid_ columns
    problems = []
    for tracker in learn.cbs:
        column = _monitored_column(tracker)
        if column is None:
            continue
        kind, monitor = type(tracker).__name__, tracker.monitor
        if monitor.startswith("train_") and monitor[len("train_"):] in ours:
            problems.append((tracker, f"{kind} monitors {monitor!r}, which is NaN in every epoch: "
                                      "CalibrationCallback scores validation passes only"))
        elif column in METRIC_COMPARISONS and column not in ours | others:
            problems.append((tracker, f"{kind} monitors {monitor!r}, but no callback adds that column; add it "
                                      f"with CalibrationCallback(metrics=(..., {column!r}))"))
        elif column in ours and monitor != (want := f"valid_{column}" if prefixed else column):
            problems.append((tracker, f"{kind} monitors {monitor!r}, but the column is {want!r} (Recorder's "
                                      f"train_metrics={bool(prefixed)})"))
    return problems


def check_class_id_targets(learn: Learner) -> None:
    """Raise a ValueError if the learner's targets are clearly not class ids.

    Refused: a multi-label or regression loss (`BCEWithLogitsLossFlat`, `MSELossFlat`...), and a first validation
    item whose target is multi-label (`TensorMultiCategory`), floating point, boolean, or an image other than a mask
    (image-to-image regression). Accepted: integer class ids, one per item or dense (`PILMask` from `MaskBlock` and
    `SegmentationDataLoaders`, token ids). A target this cannot judge before batching is left to the check that
    every validation batch gets (integer dtype, one target per prediction row).

    Parameters
    ----------
    learn : Learner
        The learner; its `loss_func` and the last element of `dls.valid_ds[0]` (item transforms not yet applied) are
        read, nothing is changed.

    Examples
    --------
    >>> check_class_id_targets(unet_learner(dls, resnet18, pretrained=False))  # masks pass  # doctest: +SKIP
    """
    loss_func = learn.loss_func
    inner = getattr(loss_func, "func", loss_func)  # fastai's `BaseLoss` wraps the torch loss in `.func`
    if isinstance(inner, _NOT_CLASS_ID_LOSSES):
        raise ValueError(f"CalibrationCallback needs single-label classification; the loss {type(inner).__name__} "
                         "is for multi-label or regression targets")
    try:  # one item of the validation set, without its batch transforms; skipped for datasets that cannot do it
        target = learn.dls.valid_ds[0][-1]
    except Exception:
        return
    problem = _not_class_ids(target)
    if problem:
        raise ValueError(f"CalibrationCallback needs integer class-id targets; the validation set yields "
                         f"{type(target).__name__} targets ({problem})")


def _not_class_ids(target: object) -> str | None:
    """Why one dataset target is certainly not class ids, or None (class ids, or a type only its batch can tell)."""
    if isinstance(target, TensorMultiCategory):
        return "multi-label: use a single-label loss and CategoryBlock"
    if isinstance(target, PILMask):  # a segmentation mask: one class id per pixel
        return None
    if isinstance(target, PILBase):
        return "an image is a regression target"
    dtype = getattr(target, "dtype", None)  # tensors, NumPy arrays and scalars
    if isinstance(dtype, torch.dtype):
        kind = "b" if dtype == torch.bool else "f" if dtype.is_floating_point or dtype.is_complex else "i"
    elif isinstance(dtype, np.dtype):
        kind = dtype.kind
    else:
        kind = "b" if isinstance(target, bool) else "f" if isinstance(target, (float, complex)) else "i"
    if kind == "b":
        return "booleans: make them class ids, e.g. with CategoryBlock"
    return "regression or soft labels?" if kind in "fc" else None
