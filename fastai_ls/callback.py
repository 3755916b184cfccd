"""`CalibrationCallback`: track confidence against accuracy on the validation set during `fit`, and plot it.

The callback is a thin shell around `CalibrationState` (fastai_ls/calibration/state.py): one `update` per validation
batch on the model's device, one `all_reduce` and one read-back per validation pass.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd
import torch
from fastai.callback.core import Callback
from fastai.distributed import DistributedDL
from fastai.learner import ValueMetric
from fastai.torch_core import TensorMultiCategory
from torch import Tensor, nn

from fastai_ls.calibration.intervals import check_ci
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
    METRIC_NAMES,
    CalibrationState,
    check_n_bins,
)
from fastai_ls.predictions import class_axis_of, class_rows
from fastai_ls.tensor_input import plain

if TYPE_CHECKING:  # matplotlib is imported only when a plot is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["CalibrationCallback", "CalibrationMetric", "HISTORY_COLUMNS"]

# Every metric, then the lower and upper limit of each metric that has an interval (NaN when `ci=None`).
HISTORY_COLUMNS = ("epoch",) + METRIC_NAMES + INTERVAL_COLUMNS
# Losses whose targets are not single class ids: the callback refuses them at `before_fit`.
_NOT_CLASS_ID_LOSSES = (nn.BCEWithLogitsLoss, nn.BCELoss, nn.MultiLabelSoftMarginLoss, nn.MultiLabelMarginLoss,
                        nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.KLDivLoss, nn.GaussianNLLLoss,
                        nn.PoissonNLLLoss)


class CalibrationMetric(ValueMetric):
    """One calibration metric of a `CalibrationCallback` as a fastai metric (a progress-table column)."""

    def __init__(self, cb: CalibrationCallback, metric_name: str):
        super().__init__(func=None, metric_name=metric_name)
        self.cb = cb

    @property
    def value(self) -> float:
        # With `Recorder(train_metrics=True)` fastai also asks after training, when there is no training value.
        learn = getattr(self.cb, "learn", None)
        if learn is not None and getattr(learn, "training", False):
            return math.nan
        return self.cb.last_metrics.get(self.metric_name, math.nan)


class CalibrationCallback(Callback):
    """Record calibration metrics of every validation pass; `metrics` become progress-table columns.

    >>> cb = CalibrationCallback(n_bins=15, metrics=('ece', 'nll'))  # learn.fit_one_cycle(4, cbs=cb); cb.history
    >>> cb.name
    'calibration'

    In `fit`, each epoch's validation pass adds one row to `history` and one state to `states`; both restart with
    every `fit`, like `learn.recorder.values`. Any other validation pass (`learn.validate()`, `learn.get_preds()`,
    also on another `dl`, and also when another callback runs one inside a fit) only replaces `state` and
    `last_metrics`, so it never adds to, resets or double counts in the history. Only validation batches are seen,
    with hard labels, so MixUp/CutMix in training do not matter.

    Classwise ECE needs 3 * C * n_bins counters and per-batch work in proportion to the predictions' size; by default
    (`classwise=None`) it is kept for up to `CLASSWISE_MAX_CLASSES` classes and is NaN above (a language model's
    vocabulary), where it mostly measures the calibration of p ~ 0 anyway.

    Intervals (`ci`): `history` has `<metric>_lo`/`<metric>_hi` columns, `report()` a table of estimate, lower and
    upper per metric. A bootstrap costs up to ~0.5 s, so the intervals are computed when first read, once per
    epoch, not in the training loop, unless an interval column is a progress-table column (then at each epoch's
    end). The same seed gives the same intervals either way.
    """

    order = 45  # after MixedPrecision (10, fp32 preds) and DistributedTrainer (11, DistributedDL); before Recorder (50)
    run_train = False

    def __init__(
        self,
        n_bins: int = 15,  # equal-width bins for ECE, MCE, RMSCE, classwise ECE and the reliability diagram
        metrics: Sequence[str] = ("ece",),  # progress-table columns: any of `METRIC_NAMES` or `INTERVAL_COLUMNS`
        n_fine: int = 1000,  # fine bins behind adaptive and smooth ECE, KS, AURC, AUGRC (their resolution)
        classwise: bool | None = None,  # classwise ECE; None: only with at most `CLASSWISE_MAX_CLASSES` classes
        ci: float | None = 0.95,  # level of the intervals in `history` and `report()`; None for none
        n_boot: int = 1000,  # bootstrap replicates per interval
        seed: int | None = 0,  # seed of the bootstrap: the same seed gives the same intervals
    ):
        self.n_bins, self.n_fine = check_n_bins(n_bins), check_n_bins(n_fine, "n_fine")
        self.classwise = classwise
        if ci is not None:
            check_ci(ci, n_boot)
        self.ci, self.n_boot, self.seed = ci, n_boot, seed
        metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
        unknown = [m for m in metrics if m not in METRIC_NAMES + INTERVAL_COLUMNS]
        if unknown:
            raise ValueError(f"unknown calibration metrics {unknown}; choose from {METRIC_NAMES + INTERVAL_COLUMNS}")
        if ci is None and any(m in INTERVAL_COLUMNS for m in metrics):
            raise ValueError("interval columns need a confidence level: pass ci=0.95 (or another level)")
        self._eager_intervals = any(m in INTERVAL_COLUMNS for m in metrics)
        self.metric_names = tuple(dict.fromkeys(metrics))
        self._metrics = [CalibrationMetric(self, m) for m in self.metric_names]
        self.state: CalibrationState | None = None  # the last completed validation pass, on the CPU
        self.states: list[CalibrationState] = []  # one per epoch of the last fit, on the CPU
        self.last_metrics: dict[str, float] = {}
        self._rows: list[dict] = []
        self._pass: CalibrationState | None = None
        self._new_fit, self._in_fit, self._warned_invalid, self._sharded = False, False, False, False
        self._depth = 0  # how many fits (fastai's own or those around validate/get_preds) are running

    # --- events --------------------------------------------------------------------------------------------------

    def before_fit(self):
        check_class_id_targets(self.learn)
        # Replace this callback's columns (and those of callbacks since removed) so repeated fits add none twice.
        kept = [m for m in self.learn.metrics
                if not (isinstance(m, CalibrationMetric) and (m.cb is self or m.cb not in self.learn.cbs))]
        self.learn.metrics = kept + self._metrics
        # fastai fires before_fit/after_fit around `validate()` and `get_preds()` too, and another callback may run
        # those inside a fit: only the outermost fit may start or end the recording. A fit that raised never fired
        # its after_fit; validate/get_preds hold `learn.lock`, so a before_fit without it is a new outermost fit.
        if not _in_validation_context(self.learn):
            self._depth = 0
        self._depth += 1
        if self._depth == 1:
            self._new_fit, self._in_fit = True, False

    def before_train(self):
        # Only a real fit trains, so the history restarts here rather than around a bare validation pass.
        if self._new_fit and not hasattr(self.learn, "lr_finder"):
            self.states, self._rows = [], []
            self._new_fit, self._in_fit = False, True

    def before_validate(self):
        self._pass = None  # allocated at the first batch, when the number of classes is known
        self.last_metrics = {}
        # Only a pass over shards is summed over processes: after `distrib_ctx`, `get_preds` on any rank sees the
        # whole data set, with the process group still up.
        self._sharded = isinstance(self.learn.dl, DistributedDL)

    def after_batch(self):
        if len(self.yb) == 0:  # `get_preds` on an unlabelled test set: nothing to score against
            return
        probs, target, rows_per_item = self._rows_of_batch(self.pred, self.yb[0])
        if self._pass is None:
            n_classes = probs.shape[1]
            classwise = n_classes <= CLASSWISE_MAX_CLASSES if self.classwise is None else self.classwise
            self._pass = CalibrationState(n_classes, self.n_bins, self.n_fine, device=probs.device,
                                          classwise=classwise)
        weight = _padding_weight(self.learn.dl, target.shape[0] // rows_per_item, rows_per_item, probs.device)
        self._pass.update(probs, target, weight=weight, ignore_index=getattr(self.learn.loss_func, "ignore_index",
                                                                             None), check_weight=False)

    def after_validate(self):
        if self._pass is None:
            return
        state = self._pass.all_reduce() if self._sharded else self._pass
        state, self._pass = state.to("cpu"), None  # the one host synchronisation of the pass
        self.state, self.last_metrics = state, self._metrics_of(state)
        n_bad = float(state.scalar("n_bad_target"))
        if n_bad:
            raise ValueError(f"{n_bad:.0f} validation targets are not class ids in [0, {state.n_classes})")
        if self.last_metrics["n_invalid"] and not self._warned_invalid:
            self._warned_invalid = True
            warnings.warn(f"{self.last_metrics['n_invalid']:.0f} validation predictions were not finite (NaN/inf); "
                          "they are left out of the calibration metrics and counted in `n_invalid`", stacklevel=2)
        if self._in_fit and self._depth == 1:
            self.states.append(state)
            self._rows.append({"epoch": self.epoch, **self.last_metrics})

    def after_fit(self):
        # Not also in after_cancel_fit: fastai fires after_fit after it.
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0:
            self._in_fit = False

    # --- results -------------------------------------------------------------------------------------------------

    @property
    def history(self) -> pd.DataFrame:
        """One row per epoch of the last fit: `epoch`, every metric of `METRIC_NAMES`, and the limits of the
        intervals (`INTERVAL_COLUMNS`, NaN when `ci` is None). Intervals not yet computed are computed here."""
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
        """The equal-width bins of an epoch (default the last): lo, hi, count, confidence, accuracy, gap and the
        Wilson interval of the accuracy (accuracy_lo, accuracy_hi)."""
        return bin_frame(self.state_of(epoch))

    def plot_reliability(self, epoch: int = -1, ax: Axes | None = None, title: str | None = None) -> Figure:
        """Reliability diagram of an epoch (default the last); returns the matplotlib figure."""
        return plot_reliability(self.state_of(epoch), ax=ax, title=title, ci=self.ci or 0.95)

    def plot_smooth_reliability(self, epoch: int = -1, ax: Axes | None = None, title: str | None = None) -> Figure:
        """Smooth reliability diagram with bootstrap band and confidence density; returns the figure."""
        return plot_smooth_reliability(self.state_of(epoch), ax=ax, title=title, ci=self.ci or 0.95,
                                       n_boot=self.n_boot, seed=self.seed)

    def plot_risk_coverage(self, epoch: int = -1, ax: Axes | None = None, title: str | None = None) -> Figure:
        """Risk-coverage plot of an epoch (default the last); returns the figure."""
        return plot_risk_coverage(self.state_of(epoch), ax=ax, title=title)

    def plot_history(self) -> Figure:
        """ECE, NLL and accuracy over the epochs of the last fit; returns the matplotlib figure."""
        return plot_history(self.history)

    def state_of(self, epoch: int = -1) -> CalibrationState:
        """The state of an epoch of the last fit (default the last), or of the last pass outside a fit."""
        if not self.states:
            if self.state is None:
                raise ValueError("no validation pass recorded yet")
            return self.state
        return self.states[epoch]

    # --- per batch: shapes and dtypes only, never tensor values (no host synchronisation) --------------------------

    def _rows_of_batch(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, int]:
        """(rows, C) probabilities and (rows,) targets; `rows_per_item` > 1 for dense (N, C, d1, ...) predictions."""
        if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
            raise TypeError("CalibrationCallback needs one prediction tensor and one target tensor per batch")
        if target.is_floating_point() or target.dtype == torch.bool:
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


def check_class_id_targets(learn) -> None:
    """Raise a ValueError if the learner's targets are clearly not single class ids (multi-label, regression)."""
    loss_func = learn.loss_func
    inner = getattr(loss_func, "func", loss_func)  # fastai's `BaseLoss` wraps the torch loss in `.func`
    if isinstance(inner, _NOT_CLASS_ID_LOSSES):
        raise ValueError(f"CalibrationCallback needs single-label classification; the loss {type(inner).__name__} "
                         "is for multi-label or regression targets")
    try:  # one item of the validation set, without its batch transforms; skipped for datasets that cannot do it
        target = learn.dls.valid_ds[0][-1]
    except Exception:
        return
    if isinstance(target, TensorMultiCategory):
        raise ValueError("CalibrationCallback needs single-label classification; the targets are multi-label "
                         "(TensorMultiCategory)")
    is_float = target.is_floating_point() if isinstance(target, Tensor) else isinstance(target, float)
    if is_float or (not isinstance(target, Tensor) and not isinstance(target, numbers.Integral)):
        raise ValueError(f"CalibrationCallback needs integer class-id targets; the validation set yields "
                         f"{type(target).__name__} targets (regression or soft labels?)")
