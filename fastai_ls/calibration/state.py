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

import math
import numbers
import threading
from collections.abc import Callable

import torch
from torch import Tensor

from fastai_ls.calibration.checks import checked_ignore_index, checked_probabilities, class_ids
from fastai_ls.calibration.intervals import (
    BOOTSTRAP_NAMES,
    MAX_ROWS,
    bootstrap_metrics,
    check_ci,
    check_interval_grid,
    check_seed,
    normal_interval,
    percentile_intervals,
    wilson_interval,
)
from fastai_ls.calibration.metrics import binned_errors, max_error, rms_error, top_label_metrics
from fastai_ls.calibration.risk_coverage import risk_coverage_curve
from fastai_ls.calibration.scores import NLL_FLOOR, row_scores
from fastai_ls.validation import upcast

__all__ = ["CalibrationState", "check_n_bins", "METRIC_NAMES", "INTERVAL_NAMES", "INTERVAL_COLUMNS", "NORMS",
           "CLASSWISE_MAX_CLASSES", "N_FINE"]

NORMS = ("l1", "l2", "max")
# The metrics a state reports, in the order of `CalibrationCallback.history`'s columns (after `epoch`).
METRIC_NAMES = ("n", "n_invalid", "accuracy", "confidence", "ece", "mce", "rmsce", "ece_debiased", "adaptive_ece",
                "smece", "ks_error", "classwise_ece", "overconfidence", "underconfidence", "nll", "nll_se", "brier",
                "brier_se", "aurc", "augrc")
# The metrics with a confidence interval: a percentile bootstrap for those the histograms determine, the normal
# interval for NLL and Brier. Classwise ECE has none: the state keeps no per-row link between its class bins.
INTERVAL_NAMES = tuple(m for m in METRIC_NAMES if m in BOOTSTRAP_NAMES or m in ("nll", "brier"))
INTERVAL_COLUMNS = tuple(f"{m}_{end}" for m in INTERVAL_NAMES for end in ("lo", "hi"))
# Running sums; the squares give NLL's and Brier's standard errors, and the sum of squared row weights the
# effective number of rows of weighted data (Kish), which scales the intervals.
_SCALARS = ("n", "confidence", "correct", "nll", "brier", "n_invalid", "n_bad_target", "nll_sq", "brier_sq",
            "weight_sq")
# Above this many classes `CalibrationCallback` leaves classwise ECE out by default: its counters and per-batch work
# grow with C, and at large C it mostly measures how well p ~ 0 is calibrated (REFERENCE.md §3.1).
CLASSWISE_MAX_CLASSES = 1000
_LOGITS_HINT = "for logits pass `activation=lambda z: z.softmax(1)` (or `logits.softmax(1)`)"
# The fine grid's cells by default: a resolution of 0.001 in confidence.
N_FINE = 1000


def check_n_bins(n_bins: int, name: str = "n_bins") -> int:
    """`n_bins` if it is an int >= 1, else a ValueError."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral) or n_bins < 1:
        raise ValueError(f"{name} must be an int >= 1, got {n_bins!r}")
    return int(n_bins)


def _checked_weight(weight: Tensor, n_rows: int, check_values: bool) -> Tensor:
    """`weight` detached, after a ValueError for a wrong shape or dtype and (with `check_values`) for negative or
    non-finite values."""
    if not isinstance(weight, Tensor) or weight.shape != (n_rows,) or weight.is_complex():
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a real tensor of {n_rows} row weights, got {shape}")
    weight = weight.detach()
    if not weight.is_floating_point():
        # float64 for integer and bool weights: uint16/32/64 have no comparison kernels on the CPU, and they are
        # counted in float64 anyway.
        weight = weight.to(torch.float64)
    if check_values:
        bad = ~weight.isfinite()
        if bool(bad.any()):
            raise ValueError(f"weight must be finite: {int(bad.sum())} of {n_rows} row weights are NaN or infinite")
    if check_values and bool((weight < 0).any()):
        raise ValueError(f"weight must be non-negative: {int((weight < 0).sum())} of {n_rows} row weights are "
                         "negative")
    return weight


def _bin_of(x: Tensor, n_bins: int) -> Tensor:
    """Index of the bin ((m-1)/M, m/M] holding each float64 value of `x` (0 for x = 0, M - 1 for x >= 1).

    Computed rather than `bucketize`d: that CPU kernel goes multi-threaded on a few hundred values and then waits for
    busy cores. A float32 value times M is exact in float64, so the edges are exactly m/M."""
    return (x * n_bins).ceil_().long().sub_(1).clamp_(0, n_bins - 1)


class CalibrationState:
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

    def __init__(
        self,
        n_classes: int,
        n_bins: int = 15,
        n_fine: int = N_FINE,
        device: torch.device | str | None = None,
        data: Tensor | None = None,
        classwise: bool = True,
    ):
        """Zeroed counters (or `data`) for this layout; see the class docstring."""
        self.n_classes = check_n_bins(n_classes, "n_classes")
        self.n_bins, self.n_fine = check_n_bins(n_bins), check_n_bins(n_fine, "n_fine")
        self.classwise = bool(classwise)
        sizes = {"scalars": len(_SCALARS), "bins": 3 * self.n_bins, "fine": 3 * self.n_fine,
                 "class_bins": 3 * self.n_classes * self.n_bins if self.classwise else 0}
        self._slices, start = {}, 0
        for name, size in sizes.items():
            self._slices[name] = slice(start, start + size)
            start += size
        if data is None:
            data = torch.zeros(start, dtype=torch.float64, device=device)
        elif data.shape != (start,) or data.dtype != torch.float64:
            raise ValueError(f"data must be a float64 vector of length {start} for this layout, "
                             f"got {data.dtype} {tuple(data.shape)}")
        self.data = data
        # Made on the device (a factory, not a copy of Python data): a state may be created in the per-batch path.
        self._class_offset = torch.arange(self.n_classes, device=data.device) * self.n_bins if self.classwise else None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        """Everything but the lock, which cannot be pickled or copied (a saved learner holds its callback's
        states), with a copy of the counters taken under the lock: whole updates only, as for `metrics`."""
        with self._lock:
            data = self.data.clone()
        return {k: v for k, v in self.__dict__.items() if k != "_lock"} | {"data": data}

    def __setstate__(self, state: dict) -> None:
        """The pickled counters with a new lock; a state saved before `weight_sq` was counted (a learner exported
        with an earlier version) gets it as n, which it is for unweighted rows and the callback's 0/1 weights."""
        self.__dict__.update(state)
        self._lock = threading.Lock()
        n_old = self._slices["scalars"].stop
        if n_old == len(_SCALARS) - 1:  # weight_sq, the last scalar, is missing
            old = self.data
            self.__init__(self.n_classes, self.n_bins, self.n_fine, device=old.device, classwise=self.classwise)
            self.data[:n_old], self.data[n_old + 1:] = old[:n_old], old[n_old:]
            self.data[n_old] = old[_SCALARS.index("n")]

    # --- named views of `data` (writes through them update the state) ---------------------------------------------

    @property
    def scalars(self) -> Tensor:
        """The running sums in the order n, confidence, correct, nll, brier, n_invalid, n_bad_target, nll_sq,
        brier_sq (the last two of squared per-row values)."""
        return self.data[self._slices["scalars"]]

    def scalar(self, name: str) -> Tensor:
        """One of the running sums: n, confidence, correct, nll, brier, n_invalid, n_bad_target, nll_sq,
        brier_sq."""
        return self.scalars[_SCALARS.index(name)]

    @property
    def bins(self) -> Tensor:
        """(M, 3): count, sum of confidence and number correct per equal-width bin."""
        return self.data[self._slices["bins"]].view(self.n_bins, 3)

    @property
    def fine(self) -> Tensor:
        """(n_fine, 3): the same counters on the fine grid."""
        return self.data[self._slices["fine"]].view(self.n_fine, 3)

    @property
    def class_bins(self) -> Tensor:
        """(C, M, 3): per class k, count, sum of p_k and number with target k per bin of p_k ((0, M, 3) without
        `classwise`)."""
        return self.data[self._slices["class_bins"]].view(-1, self.n_bins, 3)

    @property
    def device(self) -> torch.device:
        """Where the counters live."""
        return self.data.device

    # --- building and combining states ------------------------------------------------------------------------------

    def same_layout(self, other: CalibrationState) -> bool:
        """Whether `other` has the same counters, so that the two can be added."""
        return self._layout() == other._layout()

    def _layout(self) -> tuple[int, int, int, bool]:
        return self.n_classes, self.n_bins, self.n_fine, self.classwise

    def _with_data(self, data: Tensor) -> CalibrationState:
        return CalibrationState(self.n_classes, self.n_bins, self.n_fine, data=data, classwise=self.classwise)

    def __add__(self, other: CalibrationState) -> CalibrationState:
        """The counters of both states' rows (on this state's device); a ValueError if the layouts differ."""
        if not isinstance(other, CalibrationState):
            return NotImplemented
        if not self.same_layout(other):
            names = ("n_classes", "n_bins", "n_fine", "classwise")
            differ = ", ".join(f"{name} {a!r} and {b!r}" for name, a, b in zip(names, self._layout(), other._layout())
                               if a != b)
            raise ValueError(f"cannot add calibration states with different counters: {differ}")
        return self._with_data(self._frozen(self.device).data + other._frozen(self.device).data)

    def to(self, device: torch.device | str) -> CalibrationState:
        """The same counters on `device`: a copy, or this state itself if they are there already."""
        with self._lock:
            data = self.data.to(device)
        # Not a second state over the same `data`: it would have a lock of its own, and updates through the two
        # could race.
        return self if data is self.data else self._with_data(data)

    def _frozen(self, device: torch.device | str = "cpu") -> CalibrationState:
        """A copy of the counters on `device`, taken under the lock: every reading (metrics, `+`) sees whole updates
        only, never the scalars of a batch whose bins another thread is still adding."""
        with self._lock:
            return self._with_data(self.data.to(device, copy=True))

    def all_reduce(self) -> CalibrationState:
        """Sum the state over all processes in place (one collective); a no-op unless torch.distributed runs."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            with self._lock:
                dist.all_reduce(self.data, op=dist.ReduceOp.SUM)
        return self

    def __repr__(self) -> str:
        return f"CalibrationState(n_classes={self.n_classes}, n_bins={self.n_bins}, n_fine={self.n_fine}, " \
               f"classwise={self.classwise}, device={self.device})"

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
        if not isinstance(preds, Tensor):
            raise TypeError(f"preds must be a tensor, got {type(preds).__name__}")
        if preds.dim() != 2 or preds.shape[1] != self.n_classes:
            raise ValueError(f"preds must be (N, {self.n_classes}), got {tuple(preds.shape)}")
        target = class_ids(target, preds.shape[0], "preds")
        ignore_index = checked_ignore_index(ignore_index)
        if weight is not None:
            weight = _checked_weight(weight, preds.shape[0], check)
        preds = preds.detach()  # a graph would keep every batch's activations alive through the counters
        probs = activation(preds) if activation is not None else preds
        name = "preds" if activation is None else "activation(preds)"
        # Shapes and dtypes, not values: checked also without `check`.
        if not isinstance(probs, Tensor) or probs.shape != preds.shape:
            got = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
            raise ValueError(f"{name} must be a tensor of preds' shape {tuple(preds.shape)}, one row of class "
                             f"probabilities per row of preds, got {got}")
        if not probs.is_floating_point():
            raise ValueError(f"{name} must be floating point probabilities, got {probs.dtype}")
        if check:  # stacklevel 3: the warning points at the caller of update
            probs = checked_probabilities(probs, name, _LOGITS_HINT, stacklevel=3)
        elif probs.dtype == torch.bfloat16:
            # bfloat16 softmax outputs (a bfloat16 model's) miss 1 by up to about 3e-3, and the check divides them
            # by their sums: unchecked, so is every bfloat16 row, without reading a value (and so without the check's
            # warning). Other dtypes' softmax outputs miss by less than SUM_ROUNDING and are taken as they are.
            probs = upcast(probs)
            sums = probs.sum(1, keepdim=True)
            probs = probs / torch.where(sums > 0, sums, 1.0)
        probs = upcast(probs)
        dev, f64 = self.device, torch.float64
        probs = probs if probs.device == dev else probs.to(dev)
        target = target if target.device == dev else target.to(dev)

        # Row flags. Every step below is a fixed sequence of kernels whatever the values: nothing waits for the device.
        finite = probs.isfinite().all(1)
        in_range = (target >= 0) & (target < self.n_classes)
        if ignore_index is None:
            invalid, bad_target, counted = ~finite, ~in_range, finite & in_range
        else:
            listed = target != ignore_index
            invalid, bad_target, counted = listed & ~finite, listed & ~in_range, listed & finite & in_range
        keep = counted.to(f64) if weight is None else weight.to(dev, f64) * counted  # each row's weight below
        p = torch.where(finite[:, None], probs, 0.0)  # 0 * NaN would still be NaN
        y = torch.where(in_range, target, 0)

        # Probabilities do not carry the logits' range: the NLL of a true-class probability that underflowed to 0 is
        # capped (NLL_FLOOR), at the same 87.3 nats in every dtype.
        scores = row_scores(p, y)
        conf = scores["confidence"]
        per_row = torch.stack([torch.ones_like(conf), *scores.values()], 1).to(f64)
        flags = torch.stack([invalid, bad_target], 1).to(f64)
        if weight is not None:
            flags = flags * weight.to(dev, f64)[:, None]
        squares = torch.cat([per_row[:, 3:], keep[:, None]], 1)  # nll, brier and the weight, to be squared
        squares = squares * squares
        squares[:, :2] *= keep[:, None]  # nll^2 and brier^2 weighted; weight^2 as it is
        # Weighted sums in the order of _SCALARS: n, confidence, correct, nll, brier, n_invalid, n_bad_target,
        # nll_sq, brier_sq, weight_sq.
        scalars = torch.cat([per_row * keep[:, None], flags, squares], 1).sum(0)
        # Top-label confidence against correctness on the coarse and the fine grid: the two histograms sit side by
        # side in `data`, so one index_add_ fills both (each kernel launch counts on a CPU).
        conf64 = conf.to(f64)
        cells = torch.stack([_bin_of(conf64, self.n_bins), _bin_of(conf64, self.n_fine) + self.n_bins], 1)
        counters = per_row[:, :3] * keep[:, None]  # count, confidence, correct
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
        return p64, _bin_of(p64, self.n_bins).add_(self._class_offset)

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
        check_ci(ci)
        s, rows, _, frozen = self._counters()
        bins = frozen.bins
        count, conf_sum, correct = bins.unbind(1)
        nonempty = count > 0
        conf = torch.where(nonempty, conf_sum / count.clamp_min(1e-300), math.nan)
        acc = torch.where(nonempty, correct / count.clamp_min(1e-300), math.nan)
        edges = torch.linspace(0, 1, self.n_bins + 1, dtype=torch.float64)
        acc_lo, acc_hi = wilson_interval(rows[:, 2], rows[:, 0], ci)
        return {"lo": edges[:-1], "hi": edges[1:], "count": count, "confidence": conf, "accuracy": acc,
                "gap": conf - acc, "accuracy_lo": acc_lo, "accuracy_hi": acc_hi}

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
        s, bins, fine, frozen = self._counters()  # in effective rows: the same ratios as the weighted sums
        n = s["n"]
        out = dict.fromkeys(METRIC_NAMES, math.nan) | {"n": n, "n_invalid": s["n_invalid"]}
        if n > 0:
            top = top_label_metrics(bins, fine)
            out.update({name: float(value) for name, value in top.items()})
            out.update(classwise_ece=frozen._classwise_ece(n), nll=s["nll"] / n, brier=s["brier"] / n,
                       nll_se=_standard_error(s["nll_sq"], s["nll"], n, s["n_eff"]),
                       brier_se=_standard_error(s["brier_sq"], s["brier"], n, s["n_eff"]))
        if ci is not None:
            for name, (lo, hi) in self._intervals(ci, n_boot, seed, out, bins, fine).items():
                out[f"{name}_lo"], out[f"{name}_hi"] = lo, hi
        return out

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
        _, bins, fine, frozen = self._counters()
        point = frozen.metrics()  # of the same counters as the bootstrap's, whatever other threads add meanwhile
        return self._intervals(ci, n_boot, seed, point, bins, fine)

    def _intervals(self, ci: float, n_boot: int, seed: int | None, point: dict[str, float], bins: Tensor,
                   fine: Tensor) -> dict[str, tuple[float, float]]:
        """The intervals from the point estimates and the histograms in effective rows (`_counters`)."""
        check_ci(ci, n_boot)
        check_seed(seed)
        check_interval_grid(self.n_bins, self.n_fine)
        if not float(bins[:, 0].sum()) >= 1:
            return dict.fromkeys(INTERVAL_NAMES, (math.nan, math.nan))
        replicates = bootstrap_metrics(bins, fine, n_boot, seed)
        limits = percentile_intervals(replicates, ci)
        for name, high in (("nll", math.inf), ("brier", 2.0)):  # NLL >= 0; Brier's sum over classes is in [0, 2]
            limits[name] = normal_interval(point[name], point[f"{name}_se"], ci, low=0.0, high=high)
        return {name: limits[name] for name in INTERVAL_NAMES}

    def risk_coverage(self) -> dict[str, Tensor]:
        """The risk-coverage curve read from the fine grid, one point per non-empty cell, most confident first:
        threshold, coverage, risk (errors / accepted) and generalized_risk (errors / n); see `risk_coverage.py`."""
        s, _, fine, _ = self._counters()
        if s["n"] <= 0:
            raise ValueError("no rows counted: the risk-coverage curve is empty")
        return risk_coverage_curve(fine)

    def ece(self, norm: str = "l1") -> float:
        """Top-label calibration error over the equal-width bins: 'l1' (ECE), 'l2' (RMSCE) or 'max' (MCE)."""
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        s, bins, _, _ = self._counters()
        if s["n"] <= 0:
            return math.nan
        return float({"l1": lambda: binned_errors(bins)[0], "l2": lambda: rms_error(bins),
                      "max": lambda: max_error(bins)}[norm]())

    def _classwise_ece(self, n: float) -> float:
        if not self.classwise:
            return math.nan
        per_class = self.class_bins.cpu()  # (C, M, 3)
        return float((per_class[..., 2] - per_class[..., 1]).abs().sum((1,)).mean() / n)

    def _counters(self) -> tuple[dict[str, float], Tensor, Tensor, CalibrationState]:
        """The running sums by name, with `n_eff`, the bins and fine cells in effective rows, and the copy of the
        state they were read from (`_frozen`), on the CPU; a ValueError if no predictions could have given these
        counters.

        Weighted rows count as Kish's effective number of rows n_eff = (sum w)^2 / sum w^2: the histograms are
        scaled by n_eff / sum w, which no ratio of them notices, but the row counts behind the debiased ECE, the
        bootstrap and the Wilson intervals do. n_eff is the number of rows for unweighted rows and 0/1 weights
        (the scale is then exactly 1), and scaling every weight changes neither it nor any metric."""
        state = self._frozen()
        bad = int((~state.data.isfinite()).sum())
        wrong = f"{bad} of them are NaN or infinite (row weights above about 1e150 overflow when squared: only " \
            "their ratios matter, so scale them down)" if bad else None
        s = {name: float(v) for name, v in zip(_SCALARS, state.scalars.tolist())}
        wrong = wrong or _inconsistency(s, state.bins, state.fine, state.class_bins)
        if wrong:
            # Besides a spoiled `data` vector, what `update(check=False)` (the callback's per-batch path) counts
            # unchecked gives such counters: scores that are not probabilities, e.g. from a loss whose
            # `activation` returns logits.
            raise ValueError(f"these calibration counters cannot come from any predictions: {wrong}; a `data` vector "
                             "must be a state's own (`state.data`), unchanged, and what `update(check=False)` counts "
                             "(as `CalibrationCallback` does) must be probabilities, rows of non-negative values "
                             "summing to 1, not logits (a loss's `activation` must return probabilities)")
        n, weight_sq = s["n"], s["weight_sq"]
        scale = n / weight_sq if n > 0 else 1.0  # exactly 1 for 0/1 weights: then sum w^2 = sum w, term by term
        s["n_eff"] = n * scale
        if s["n_eff"] > MAX_ROWS:
            raise ValueError(f"these calibration counters cannot come from any predictions: their effective number "
                             f"of rows is {s['n_eff']:.6g}, more than 2**53")
        if scale == 1.0:
            return s, state.bins, state.fine, state
        return s, state.bins * scale, state.fine * scale, state


# Per row of weight 1, the most that each running sum can add (NLL is capped at -log(NLL_FLOOR); a row may sum to
# 1 + SUM_ROUNDING, which the bounds leave room for).
_MOST_PER_ROW = {"confidence": 1.01, "correct": 1.0, "nll": -math.log(NLL_FLOOR), "brier": 2.01,
                 "nll_sq": math.log(NLL_FLOOR) ** 2, "brier_sq": 4.05}
_SLACK = 1e-6  # relative: sums of the same values in another order differ by far less


def _inconsistency(s: dict[str, float], bins: Tensor, fine: Tensor, class_bins: Tensor) -> str | None:
    """What makes these counters impossible (None if nothing does): negative counts, sums beyond what the counted
    rows can add, histograms that do not hold the n rows (e.g. a count of 1e300 put into a saved state)."""
    n, tiny = s["n"], 1e-300
    grids = {"bins": bins, "fine cells": fine, "class bins": class_bins.reshape(-1, 3)}
    if min(n, s["weight_sq"], *(float(g.min()) for g in grids.values() if g.numel())) < 0:
        return "a count or a sum of confidences is negative"
    if n > 0 and s["weight_sq"] <= 0:
        return "the squared row weights sum to 0 (weights below about 1e-150 underflow when squared: scale them up)"
    if s["weight_sq"] > n * n * (1 + _SLACK) + tiny:
        return f"the squared row weights sum to {s['weight_sq']:.6g}, more than the weights' sum squared ({n * n:.6g})"
    for name, most in _MOST_PER_ROW.items():
        if s[name] > most * n * (1 + _SLACK) + tiny:
            return f"{name} sums to {s[name]:.6g} over {n:.6g} rows, more than {most:.4g} per row"
    # Every counted row is in one bin, one fine cell and, for each class, one of that class's bins.
    totals = {"bins": bins[:, 0].sum().reshape(1), "fine cells": fine[:, 0].sum().reshape(1),
              "class bins": class_bins[..., 0].sum(1)}
    for name, grid in grids.items():
        far = (totals[name] - n).abs() > _SLACK * n + tiny
        if bool(far.any()):
            return f"the {name} hold {float(totals[name][far][0]):.6g} rows where n is {n:.6g}"
        if bool((grid[:, 1:] > grid[:, :1] * _MOST_PER_ROW["confidence"] + tiny).any()):
            return f"one of the {name} sums more confidence or correct rows than it holds rows"
    return None


def _standard_error(sum_sq: float, total: float, n: float, n_eff: float) -> float:
    """Standard error of a weighted mean from the running sums of the weighted values and squared values, the
    weights' sum `n` and the effective number of rows `n_eff` (NaN for n_eff < 2); for unweighted rows
    n_eff = n, and this is the standard error of a mean."""
    if not n_eff >= 2:
        return math.nan
    mean = total / n
    variance = max(sum_sq / n - mean * mean, 0.0) * n_eff / (n_eff - 1)
    return math.sqrt(variance / n_eff)
