"""Streaming calibration statistics: tensors in, tensors out, no fastai needed.

A `CalibrationState` is one flat float64 vector of counters on the predictions' device, seen through named views.
Updating it from a batch checks the input as the functions do (`checks.py`, which reads values); without those
checks (`check=False`, the callback's per-batch path) it launches a fixed sequence of kernels and never waits for
the device. Merging two states is `+`, and a distributed reduction is one `all_reduce` of `state.data`. Every
metric is then computed from the counters, so a metric has exactly one implementation whether it is asked for by a
test, the callback or the CLI.

Bins of top-label confidence are equal-width and closed on the right, ((m-1)/M, m/M], as in Guo et al. 2017;
a confidence of exactly 0 goes to the first bin and exactly 1 to the last. Besides the M bins the state keeps a
fine grid of K (default 1000) equal-width cells: it determines every top-label metric up to the cell width 1/K
(adaptive and smooth ECE, KS error, AURC, AUGRC, `metrics.py`) and their bootstrap intervals (`intervals.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    import pandas as pd

from fastai_ls._deprecation import warn_renamed
from fastai_ls.calibration.counters import N_FINE, CounterVector
from fastai_ls.calibration.counting import batch_sums, bin_of, checked_batch
from fastai_ls.calibration.estimates import (
    INTERVAL_COLUMNS,
    INTERVAL_NAMES,
    METRIC_NAMES,
    NORMS,
    read_counters,
    state_bin_table,
    state_ece,
    state_intervals,
    state_metrics,
)
from fastai_ls.calibration.risk_coverage import risk_coverage_curve

__all__ = ["CalibrationState", "METRIC_NAMES", "INTERVAL_NAMES", "INTERVAL_COLUMNS", "NORMS",
           "CLASSWISE_MAX_CLASSES", "N_FINE"]

# Above this many classes `CalibrationCallback` leaves classwise ECE out by default: its counters and per-batch work
# grow with C, and at large C it mostly measures how well p ~ 0 is calibrated.
CLASSWISE_MAX_CLASSES = 1000
class CalibrationState(CounterVector):
    """Additive counters of top-label confidence against accuracy, per class and over the whole data set.

    The classwise bins cost 3 * C * M counters and, per batch, a few float64 temporaries the size of the
    predictions; with `classwise=False` they are left out (`classwise_ece` is then NaN).

    Parameters
    ----------
    n_classes : int
        C, the size of the class axis.
    n_bins : int
        M equal-width bins for ECE, MCE, RMSCE, debiased and classwise ECE and the reliability diagram.
    n_fine : int
        K fine equal-width cells behind adaptive and smooth ECE, KS error, AURC, AUGRC, the risk-coverage curve and
        the bootstrap; their resolution in confidence is 1/K. Intervals need K >= M.
    device : torch.device or str, optional
        Where the counters live (the predictions' device).
    data : Tensor, optional
        An existing flat float64 vector with this layout (e.g. a saved state).
    classwise : bool
        Keep per-class bins for classwise ECE.

    Examples
    --------
    >>> state = CalibrationState(n_classes=3, n_bins=3)
    >>> state.update(torch.tensor([[.25, .20, .55], [.55, .05, .40], [.10, .30, .60], [.90, .05, .05]]),
    ...              torch.tensor([0, 1, 2, 0]))
    >>> round(state.metrics()['ece'], 4)
    0.2
    """

    # --- the per-batch update: no host synchronisation --------------------------------------------------------------

    def update(
        self,
        preds: Tensor,
        target: Tensor,
        weight: Tensor | None = None,
        activation: Callable[[Tensor], Tensor] | None = None,
        ignore_index: int | None = None,
        check: bool = True,
    ) -> None:
        """Add a batch to the counters; without `check`, without waiting for the device.

        Rows with a non-finite probability count in `n_invalid`, rows whose target is out of range (and not
        `ignore_index`) in `n_bad_target`; neither enters any other counter. The counters never join an autograd
        graph: predictions that require grad (a live model's outputs) are read detached. Updates from several
        threads at once are safe: each adds its whole batch under the state's lock, and what reads the state
        meanwhile (`metrics`, `+`, pickling) sees whole batches only.

        Parameters
        ----------
        preds : Tensor
            (N, C) probabilities, or logits if `activation` is given. With `check`, the probabilities must be rows
            of non-negative values summing to 1 within 2% (a ValueError otherwise: logits are refused), and rows
            that miss 1 by more than 1e-3 are divided by their sums, with a warning (`checks.py`, as for
            `calibration_metrics`).
        target : Tensor
            (N,) or (N, 1) class ids, any integer dtype.
        weight : Tensor, optional
            (N,) finite, non-negative row weights of any real dtype (e.g. 0/1 to drop padding duplicates); a row counts
            as its weight.
        activation : callable, optional
            Maps `preds` to probabilities over axis 1 (e.g. ``lambda z: z.softmax(1)``).
        ignore_index : int, optional
            Rows whose target equals this are skipped silently.
        check : bool
            Check the values of the probabilities (see `preds`) and of `weight` (a ValueError for a negative or
            non-finite one). The checks read the values on the host, a synchronisation on a GPU;
            `CalibrationCallback` turns them off in its per-batch path, for the softmax outputs and the 0/1
            weights it makes itself. Unchecked bfloat16 rows are divided by their sums.

        Examples
        --------
        >>> state = CalibrationState(n_classes=2)
        >>> state.update(torch.tensor([[.8, .2], [.3, .7]]), torch.tensor([0, 0]), weight=torch.tensor([1., 2.]))
        >>> float(state.scalar('n')), float(state.scalar('correct'))
        (3.0, 1.0)
        """
        probs, target, weight, ignore_index = checked_batch(preds, target, weight, activation, ignore_index, check,
                                                            self.n_classes, self.device)
        scalars, cells, counters, p, y, keep = batch_sums(probs, target, weight, ignore_index, self.n_bins,
                                                          self.n_fine)
        top = self.data[self._slices["bins"].start:self._slices["fine"].stop].view(-1, 3)
        p64, class_cells = self._class_cells(p) if self.classwise else (None, None)
        # The in-place additions, and only they, under the lock: two threads adding into the same counters at once
        # lose counts (index_add_ reads, adds and writes back without atomics on a CPU).
        with self._lock:
            self.scalars.add_(scalars)
            top.index_add_(0, cells.reshape(-1), counters.repeat_interleave(2, 0))
            if self.classwise:
                self._add_class_bins(p64, class_cells, y[:, None], keep)

    def _class_cells(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """Each p_ik in float64 and the index of its class bin in the flattened (C * M) class bins, (rows, C) both."""
        # Contiguous, so that the flattening in `_add_class_bins` is a view: predictions may come transposed or
        # sliced (a column-major array from numpy, a model's `x.T`), and elementwise results keep their strides.
        p64 = p.to(torch.float64).contiguous()
        return p64, bin_of(p64, self.n_bins).add_(self._class_offset)

    def _add_class_bins(self, p64: Tensor, cells: Tensor, y: Tensor, keep: Tensor) -> None:
        """Bin every p_ik against 1[y_i = k] (Kull et al. 2019), one counter at a time: a stacked (rows, C, 3)
        float64 source would take 24 bytes per probability, 6.6 GB for a batch of 4608 tokens over 60k classes.
        Changes `p64` in place."""
        bins = self.class_bins.view(-1, 3)
        bins[:, 0].index_add_(0, cells.view(-1), keep[:, None].expand_as(p64).reshape(-1))
        bins[:, 1].index_add_(0, cells.view(-1), p64.mul_(keep[:, None]).view(-1))
        # 1[y_i = k] is non-zero only in the target's own column.
        bins[:, 2].index_add_(0, cells.gather(1, y).squeeze(1), keep)

    # --- metrics (read the counters: call once per epoch, not per batch) -------------------------------------------

    def bin_table(self, ci: float = 0.95) -> dict[str, Tensor]:
        """Per equal-width bin: lo, hi, count, mean confidence, accuracy, gap = confidence - accuracy and
        accuracy_lo/accuracy_hi, the Wilson interval of the accuracy at level `ci` (all NaN for empty bins), as
        float64 CPU tensors. For weighted rows the intervals take each bin's weight in effective rows (`n_eff`
        of `metrics`), so scaling every weight changes none of them."""
        return state_bin_table(self, ci)

    def metrics(self, ci: float | None = None, n_boot: int = 1000, seed: int | None = 0) -> dict[str, float]:
        """Every metric of `METRIC_NAMES` as Python floats (NaN where no row was counted); with `ci`, also
        `<name>_lo` and `<name>_hi` for every metric of `INTERVAL_NAMES` (see `intervals`).

        Without `ci` this is cheap (about a millisecond at 1000 fine cells); with it, it costs the bootstrap
        (at most about 0.5 s for 1000 replicates, benchmarks/bench_intervals.py). A ValueError if the counters
        cannot be those of any predictions (NaN, infinity, counts that disagree: a `data` vector that is not a
        state's, or row weights whose squares overflow).

        Parameters
        ----------
        ci : float, optional
            Confidence level of the intervals, e.g. 0.95; None for point estimates only.
        n_boot : int
            Bootstrap replicates.
        seed : int, optional
            Seed of the bootstrap's generator: the same seed gives the same intervals. None draws a fresh one.

        Examples
        --------
        >>> state = CalibrationState(n_classes=2)
        >>> state.update(torch.tensor([[.9, .1], [.6, .4], [.2, .8]]), torch.tensor([0, 1, 1]))
        >>> m = state.metrics(ci=0.95, n_boot=200)
        >>> m['accuracy'], m['accuracy_lo'] <= m['accuracy'] <= m['accuracy_hi']
        (0.6666666666666666, True)
        """
        return state_metrics(self, ci, n_boot, seed)

    def intervals(self, ci: float = 0.95, n_boot: int = 1000, seed: int | None = 0) -> dict[str, tuple[float, float]]:
        """(lower, upper) confidence limits of every metric of `INTERVAL_NAMES` at level `ci`.

        A percentile bootstrap for the metrics of the two histograms (`intervals.py`: a replicate is one
        multinomial draw of the n rows over the state's (cell, correct or not) categories, and a resampled row
        carries its cell's mean confidence, an error within the cell width 1/n_fine); the normal interval
        mean -+ z * standard error for NLL and Brier. Percentile intervals are for the metric as estimated: where
        the estimator is biased (binned ECE of a calibrated model) they do not cover 0. NaN without rows.

        Weighted rows count as Kish's effective number of rows, (sum of weights)^2 / sum of squared weights: the
        number of rows for 0/1 weights, and the same whatever scale the weights have.

        Parameters
        ----------
        ci : float
            Confidence level, strictly between 0 and 1.
        n_boot : int
            Bootstrap replicates (>= 2; 1000 for reported intervals, fewer for a quick look).
        seed : int, optional
            Seed of numpy's generator: the same seed gives the same intervals; None draws a fresh one.
        """
        return state_intervals(self, ci, n_boot, seed)

    def risk_coverage(self) -> dict[str, Tensor]:
        """The risk-coverage curve read from the fine grid, one point per non-empty cell, most confident first:
        threshold, coverage, risk (errors / accepted) and generalized_risk (errors / n); see `risk_coverage.py`."""
        s, _, fine, _ = read_counters(self)
        if s["n"] <= 0:
            raise ValueError("no rows counted: the risk-coverage curve is empty")
        return risk_coverage_curve(fine)

    def ece(self, norm: str = "l1") -> float:
        """Top-label calibration error over the equal-width bins: 'l1' (ECE) or 'l2' (RMSCE). ('max' still gives
        the MCE for one release, with a FutureWarning: use `mce()`.)"""
        if norm == "max":
            warn_renamed("CalibrationState.ece(norm='max')", "CalibrationState.mce()")
        return state_ece(self, norm)

    def report(self, ci: float | None = 0.95, n_boot: int = 1000, seed: int | None = 0) -> pd.DataFrame:
        """`metrics(ci=...)` as a table: one row per metric (index `metric`), columns estimate, lower, upper (NaN
        where a metric has no interval) and interval (how it was made).

        Parameters
        ----------
        ci : float | None
            Level of the intervals; None for estimates only.
        n_boot : int
            Bootstrap replicates of the bootstrapped metrics.
        seed : int | None
            Seed of the bootstrap (None: a fresh one).

        Examples
        --------
        >>> state = CalibrationState(n_classes=2)
        >>> state.update(torch.tensor([[.8, .2], [.3, .7], [.6, .4]]), torch.tensor([0, 0, 1]))
        >>> float(state.report(ci=None).loc["ece", "estimate"])  # (|0.8 - 1| + |0.7 - 0| + |0.6 - 0|) / 3
        0.5
        """
        from fastai_ls.calibration.report import report_frame  # pandas, only when a table is asked for

        return report_frame(self.metrics(ci=ci, n_boot=n_boot, seed=seed), ci)

    def mce(self) -> float:
        """Top-label maximum calibration error: the largest |accuracy - confidence| of a non-empty equal-width bin
        (Naeini et al. 2015); NaN with no rows counted."""
        return state_ece(self, "max")
