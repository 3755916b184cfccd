"""`CalibrationCallback`: record confidence against accuracy on every validation pass, during `fit` and outside it.

The callback is a thin shell around `CalibrationState` (fastai_ls/calibration/state.py): one `update` per validation
batch on the model's device, one `all_reduce` and one read-back per validation pass. Its columns live in
`columns.py`, the trackers on them in `trackers.py`, the target check in `targets.py`, and what it reads of fastai's
internals in `fastai_compat.py`; tables and figures take the states it records (`fastai_ls.calibration.plots`).
"""

from __future__ import annotations

import enum
import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
from fastai.learner import Learner

from fastai_ls.calibration.state import CLASSWISE_MAX_CLASSES, INTERVAL_COLUMNS, CalibrationState
from fastai_ls.integration.callback_views import DeprecatedViews
from fastai_ls.integration.class_axis import probability_rows
from fastai_ls.integration.columns import (
    HISTORY_COLUMNS,
    METRIC_COMPARISONS,
    CalibrationMetric,
    check_metric_names,
    remove_columns,
)
from fastai_ls.integration.fastai_compat import (
    AttachAwareCallback,
    finding_lr,
    in_validation_context,
    is_sharded,
    padding_weight,
)
from fastai_ls.integration.one_per_learner import put_back, replace_others
from fastai_ls.integration.targets import check_class_id_targets
from fastai_ls.integration.trackers import align_trackers, check_trackers
from fastai_ls.validation import check_ci, check_int, check_interval_grid, check_seed

__all__ = ["CalibrationCallback", "CalibrationMetric", "Phase", "HISTORY_COLUMNS", "METRIC_COMPARISONS",
           "check_class_id_targets"]


class Phase(enum.Enum):
    """Where the callback is in fastai's loop: what a validation pass that ends now is recorded as."""

    IDLE = "idle"  # in no fit: nothing runs
    STARTED = "started"  # a fit began and has not trained (validate(), get_preds(), lr_find, or before the first
    # training phase): a pass replaces `state` only
    RECORDING = "recording"  # a fit trains: each epoch's validation pass also adds a row to `history`


@dataclass
class _Pass:
    """One validation pass: its counters on the model's device (made at the first labelled batch), whether it
    reads one process's shard, and whether it had labels to score (known once it ended)."""

    counts: CalibrationState | None = None
    sharded: bool = False
    scored: bool = False


# The state of a callback pickled by the release before `Phase` that `Phase` and `_Pass` replace.
_OLD_FLAGS = ("_new_fit", "_in_fit", "_depth", "_scored", "_sharded", "_eager_intervals", "_pass")


class CalibrationCallback(DeprecatedViews, AttachAwareCallback):
    """Calibration metrics of every validation pass, counted on the model's device; `metrics` become columns.

    Parameters
    ----------
    n_bins : int, default 15
        Equal-width confidence bins for ECE, MCE, RMSCE, classwise ECE and the reliability diagram.
    metrics : str or sequence of str, default ('ece',)
        The progress-table columns (and so what `CSVLogger` writes and `SaveModelCallback`,
        `EarlyStoppingCallback`, `ReduceLROnPlateau` can monitor). Every metric lands in `history` and
        `last_metrics` either way. The names (`METRIC_NAMES`):

        - n (rows scored), n_invalid (rows left out: NaN/inf), accuracy, confidence (mean top-label probability);
        - ece, mce, rmsce (equal-width bins, L1/max/L2), ece_debiased, adaptive_ece (equal-mass bins), smece
          (smooth ECE), ks_error, classwise_ece, overconfidence, underconfidence;
        - nll, nll_se, brier, brier_se (with standard errors), aurc, augrc (selective classification).

        and the interval limits `<metric>_lo`, `<metric>_hi` (`INTERVAL_COLUMNS`, e.g. 'ece_hi', with `ci` set) of
        accuracy, confidence, ece, mce, rmsce, ece_debiased, adaptive_ece, smece, ks_error, overconfidence,
        underconfidence, nll, brier, aurc, augrc.
    n_fine : int, default 1000
        Fine equal-width bins behind adaptive and smooth ECE, the KS error, AURC and AUGRC, and the cells the
        bootstrap resamples.
    classwise : bool or None, default None
        Keep classwise ECE (3 * C * n_bins counters); None: for at most `CLASSWISE_MAX_CLASSES` classes, NaN above.
    ci : float or None, default 0.95
        Level of the intervals in `history`; None for none.
    n_boot : int, default 1000
        Bootstrap replicates per interval.
    seed : int or None, default 0
        Seed of the bootstrap: the same seed gives the same intervals.

    Attributes
    ----------
    history : pandas.DataFrame
        One row per epoch of the last fit, columns `HISTORY_COLUMNS`.
    states : list of CalibrationState
        The counters of each epoch of the last fit (on the CPU).
    state : CalibrationState or None
        The counters of the last scored validation pass, in a fit or not.
    last_metrics : dict of str to float
        The metrics of `state`; {} before the first scored pass.
    phase : Phase
        Where the callback is in fastai's loop.

    Examples
    --------
    >>> cb = CalibrationCallback(n_bins=15, metrics=('ece', 'nll'))
    >>> cb.name  # so `learn.calibration` once it is attached
    'calibration'
    >>> learn.fit_one_cycle(4, cbs=[cb, SaveModelCallback(monitor='ece')])  # doctest: +SKIP
    >>> plot_reliability(cb.state_of(-1))  # doctest: +SKIP

    Notes
    -----
    - Passes: each epoch of a `fit` adds a row to `history` and a state to `states` (both restart with every fit,
      like `learn.recorder.values`). Any other pass (`validate()`, `get_preds()`, on any `dl`, also one another
      callback runs inside a fit) only replaces `state` and `last_metrics`, and the rows keep the fit's epoch. A pass
      without labels (`predict`, an unlabelled `test_dl`) keeps the last scored state; its columns are NaN.
    - Targets: integer class ids, per item or per position of dense (N, C, d1, ...) predictions on the loss's class
      axis (masks, token ids); those equal to the loss's `ignore_index` are left out. Other targets are a ValueError
      at `before_fit` in `fit`, at the first labelled batch inside `validate()`/`get_preds()` (so the learner
      stays usable).
    - One per learner: a second one attached replaces the first, with a warning, and puts it back when it leaves.
      Its columns sit in `learn.metrics` only while it is attached.
    - Trackers on its columns compare the way each column declares (`trackers.py`).
    - Intervals are computed when first read, once per epoch, unless an interval column is in the progress table.
    """

    order = 45  # after MixedPrecision (10, fp32 preds) and DistributedTrainer (11, DistributedDL); before Recorder (50)
    run_train = False
    attribute_name = "calibration"

    def __init__(self, n_bins: int = 15, metrics: Sequence[str] | str = ("ece",), n_fine: int = 1000,
                 classwise: bool | None = None, ci: float | None = 0.95, n_boot: int = 1000, seed: int | None = 0):
        """Check the arguments; the counters are made at the first validation batch, once C is known."""
        self.n_bins, self.n_fine = check_int(n_bins, "n_bins"), check_int(n_fine, "n_fine")
        self.classwise = classwise
        if ci is not None:
            check_ci(ci, n_boot)
            check_interval_grid(self.n_bins, self.n_fine)  # else every epoch's intervals, and `history`, would fail
        self.ci, self.n_boot, self.seed = ci, n_boot, check_seed(seed)
        self.metric_names = check_metric_names(metrics, ci)
        self._metrics = [CalibrationMetric(self, m) for m in self.metric_names]
        self.state: CalibrationState | None = None
        self.states: list[CalibrationState] = []
        self.last_metrics: dict[str, float] = {}
        self.phase = Phase.IDLE
        self._rows: list[dict] = []
        self._pass = _Pass()  # the running pass, or the last one that ended
        self._outer: list[_Pass] = []  # the passes of the fits around a nested validate/get_preds, innermost last
        self._epoch: int | None = None  # the outermost fit's epoch, which `learn.epoch` loses to nested passes
        self._nested = False  # whether a nested pass ran since the fit's last after_epoch
        self._deferred: Exception | None = None  # an error of before_fit inside validate()/get_preds(), raised later
        self._warned_invalid = False

    def attach(self, learn: Learner) -> None:
        """Replace the learner's other CalibrationCallbacks while this one is attached (`one_per_learner.py`)."""
        replace_others(self, learn, CalibrationCallback)

    def detach(self, learn: Learner) -> None:
        """Take this callback's columns out (left, they would show a frozen value in every later fit) and put back
        the callbacks it replaced."""
        remove_columns(learn, lambda m: m.cb is self)
        put_back(self, learn)

    def __setstate__(self, state: dict) -> None:
        if "phase" not in state:  # exported (`learn.export()`) by a release that kept boolean flags, between fits
            state = {k: v for k, v in state.items() if k not in _OLD_FLAGS}
            state.update(phase=Phase.IDLE, _pass=_Pass(), _outer=[], _epoch=None, _nested=False, _deferred=None)
        super().__setstate__(state)

    # --- events --------------------------------------------------------------------------------------------------

    def before_fit(self):
        """Check targets and trackers, add the columns, align the trackers; start a fit or a nested pass."""
        self._deferred = None
        kept = [m for m in self.learn.metrics  # this callback's columns, and those of callbacks since removed, go
                if not (isinstance(m, CalibrationMetric) and (m.cb is self or m.cb not in self.learn.cbs))]
        self.learn.metrics = kept + self._metrics
        validating = in_validation_context(self.learn)
        try:
            ours = {name for cb in self.learn.cbs if isinstance(cb, CalibrationCallback) for name in cb.metric_names}
            check_trackers(self.learn, ours, validating)
            check_class_id_targets(self.learn)
            align_trackers(self.learn, self._metrics)
        except Exception as error:
            # fastai fires this while entering validate()/get_preds()'s context, lock taken and the `with` not yet
            # started: raised here, the lock would stay held. It is raised at the first labelled batch instead.
            if not validating:
                raise
            self._deferred = error
        if not validating:  # a new outermost fit (one that raised never fired its after_fit)
            self._outer, self._epoch, self._nested = [], None, False
            self.phase = Phase.STARTED
            _warn_if_calibrated(self.learn)
        elif self.phase is Phase.IDLE:
            self.phase = Phase.STARTED
        else:  # a pass inside a fit, which has just set `learn.epoch` to 0
            self._outer.append(self._pass)
            self._nested = True

    def before_epoch(self):
        """Note the fit's epoch, which the rows are labelled with."""
        if self._outermost:
            # A pass run by a callback before this one in this event has already set `learn.epoch` to 0.
            self._epoch = self._epoch + 1 if self._nested and self._epoch is not None else self.learn.epoch
            self._nested = False

    def before_train(self):
        """Start a new history at a fit's first training phase (`lr_find` records none)."""
        if self.phase is Phase.STARTED and not finding_lr(self.learn):
            self.states, self._rows = [], []
            self.phase = Phase.RECORDING

    def before_validate(self):
        """Start a pass; `state` and `last_metrics` keep the last scored pass until this one is scored."""
        # Only a pass over shards is summed over processes: after `distrib_ctx`, `get_preds` on any rank sees the
        # whole data set, with the process group still up.
        self._pass = _Pass(sharded=is_sharded(self.learn.dl))

    def after_batch(self):
        """Add the batch's predictions and targets to the pass's counters, on their device."""
        if len(self.yb) == 0:  # `predict`, or `get_preds` on an unlabelled test set: nothing to score against
            return
        if self._deferred is not None:
            error, self._deferred = self._deferred, None
            raise error
        probs, target, rows_per_item = probability_rows(self.pred, self.yb[0], self.learn.loss_func)
        if self._pass.counts is None:
            n_classes = probs.shape[1]
            classwise = n_classes <= CLASSWISE_MAX_CLASSES if self.classwise is None else self.classwise
            self._pass.counts = CalibrationState(n_classes, self.n_bins, self.n_fine, device=probs.device,
                                                 classwise=classwise)
        weight = padding_weight(self.learn.dl, target.shape[0] // rows_per_item, rows_per_item, probs.device)
        self._pass.counts.update(probs, target, weight=weight, check=False,
                                 ignore_index=getattr(self.learn.loss_func, "ignore_index", None))

    def after_validate(self):
        """Bring the pass's counters to the CPU (summed over processes if sharded): `state`, `last_metrics`, a row."""
        counts = self._pass.counts
        if counts is None:  # no labelled batch: `state` and `last_metrics` stay those of the last scored pass
            return
        state = (counts.all_reduce() if self._pass.sharded else counts).to("cpu")  # the pass's one host sync
        self._pass.counts, self._pass.scored = None, True
        self.state, self.last_metrics = state, self._metrics_of(state)
        n_bad = float(state.scalar("n_bad_target"))
        if n_bad:
            raise ValueError(f"{n_bad:.0f} validation targets are not class ids in [0, {state.n_classes})")
        if self.last_metrics["n_invalid"] and not self._warned_invalid:
            self._warned_invalid = True
            warnings.warn(f"{self.last_metrics['n_invalid']:.0f} validation predictions were not finite (NaN/inf); "
                          "they are left out of the calibration metrics and counted in `n_invalid`", stacklevel=2)
        if self.phase is Phase.RECORDING and self._outermost:
            self.states.append(state)
            self._rows.append({"epoch": self._epoch, **self.last_metrics})

    def after_epoch(self):
        """A pass run after this point still belongs to this epoch: `learn.epoch` is right at the next before_epoch."""
        if self._outermost:
            self._nested = False

    def after_fit(self):
        """End a nested pass (the fit's own pass again), or the recording at the end of the outermost fit."""
        self._deferred = None  # not also in after_cancel_fit: fastai fires after_fit after it
        if self._outer:
            self._pass = self._outer.pop()
        else:
            self.phase = Phase.IDLE

    @property
    def _outermost(self) -> bool:  # in a fit, and not in a pass nested in it
        return self.phase is not Phase.IDLE and not self._outer

    # --- results -------------------------------------------------------------------------------------------------

    def pass_value(self, name: str) -> float:
        """Metric `name` of the validation pass that just ended, NaN if it had no labels: a progress-table value."""
        return self.last_metrics.get(name, math.nan) if self._pass.scored else math.nan

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
        with_ci = any(m in INTERVAL_COLUMNS for m in self.metric_names) if intervals is None else intervals
        return state.metrics(ci=self.ci if with_ci else None, n_boot=self.n_boot, seed=self.seed)

    def state_of(self, epoch: int = -1) -> CalibrationState:
        """The counters of one epoch of the last fit, or of the last scored pass if no fit was recorded.

        Parameters
        ----------
        epoch : int, default -1
            Index into `states`, the epochs of the last fit (-1: the last).

        Examples
        --------
        >>> plot_reliability(cb.state_of(0))  # the first epoch's diagram  # doctest: +SKIP
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


def _warn_if_calibrated(learn: Learner) -> None:
    """Warn that a fit changes the model under a calibrator fitted to it (`apply_calibrator`)."""
    # Duck-typed (`posthoc.CalibratedActivation` holds `.calibrator`) so that the callback needs no post-hoc module.
    if getattr(vars(learn.loss_func).get("activation"), "calibrator", None) is not None:
        warnings.warn("a calibrator is applied to this learner (apply_calibrator): it was fitted to the model before "
                      "this fit, so CalibrationCallback scores, and get_preds returns, probabilities of a calibrator "
                      "that no longer fits the model. Fit it again after training, or call remove_calibrator(learn) "
                      "before training", stacklevel=3)
