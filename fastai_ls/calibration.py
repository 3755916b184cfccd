"""Streaming calibration statistics: tensors in, tensors out, no fastai needed.

A `CalibrationState` is one flat float64 vector of counters on the predictions' device, seen through named views.
Updating it from a batch launches a fixed sequence of kernels and never waits for the device, merging two states is
`+`, and a distributed reduction is one `all_reduce` of `state.data`. Every metric is then computed from the
counters, so a metric has exactly one implementation whether it is asked for by a test, the callback or the CLI.

Bins of top-label confidence are equal-width and closed on the right, ((m-1)/M, m/M], as in Guo et al. 2017;
a confidence of exactly 0 goes to the first bin and exactly 1 to the last.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["CalibrationState", "calibration_error", "calibration_metrics", "METRIC_NAMES", "NORMS"]

NORMS = ("l1", "l2", "max")
# The metrics a state reports, in the order of `CalibrationCallback.history`'s columns (after `epoch`).
METRIC_NAMES = ("n", "n_invalid", "accuracy", "confidence", "ece", "mce", "rmsce", "adaptive_ece", "classwise_ece",
                "overconfidence", "underconfidence", "nll", "brier", "aurc")
_SCALARS = ("n", "confidence", "correct", "nll", "brier", "n_invalid", "n_bad_target")


def check_n_bins(n_bins: int, name: str = "n_bins") -> int:
    """`n_bins` if it is an int >= 1, else a ValueError."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral) or n_bins < 1:
        raise ValueError(f"{name} must be an int >= 1, got {n_bins!r}")
    return int(n_bins)


def _as_probabilities(x: Tensor) -> Tensor:
    """Half-precision probabilities in float32 (float64 stays float64), so sums and bin edges are exact enough."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class CalibrationState:
    """Additive counters of top-label confidence against accuracy, per class and over the whole data set.

    >>> state = CalibrationState(n_classes=3, n_bins=3)
    >>> state.update(torch.tensor([[.25, .20, .55], [.55, .05, .40], [.10, .30, .60], [.90, .05, .05]]),
    ...              torch.tensor([0, 1, 2, 0]))
    >>> round(state.metrics()['ece'], 4)
    0.2
    """

    def __init__(
        self,
        n_classes: int,  # C, the size of the class axis
        n_bins: int = 15,  # M equal-width bins for ECE, MCE, RMSCE, classwise ECE and the reliability diagram
        n_fine: int = 1000,  # fine equal-width bins from which equal-mass bins and the risk-coverage curve are made
        device: torch.device | str | None = None,
        data: Tensor | None = None,  # an existing flat float64 vector with this layout (e.g. a saved state)
    ):
        self.n_classes = check_n_bins(n_classes, "n_classes")
        self.n_bins, self.n_fine = check_n_bins(n_bins), check_n_bins(n_fine, "n_fine")
        sizes = {"scalars": len(_SCALARS), "bins": 3 * self.n_bins, "fine": 3 * self.n_fine,
                 "class_bins": 3 * self.n_classes * self.n_bins}
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
        self._class_ids = torch.arange(self.n_classes, device=data.device)
        # Per column of [p_0 .. p_{C-1}, confidence, confidence] in `update`: bins per unit, last bin, first cell
        # (counting the cells, of 3 counters each, after the scalars: bins, then fine, then class_bins).
        n_cells = [self.n_bins] * self.n_classes + [self.n_bins, self.n_fine]
        first = [self.n_bins + self.n_fine + k * self.n_bins for k in range(self.n_classes)] + [0, self.n_bins]
        self._cell_scale = torch.tensor(n_cells, dtype=torch.float64, device=data.device)
        self._cell_last = torch.tensor(n_cells, device=data.device) - 1
        self._cell_offset = torch.tensor(first, device=data.device)

    # --- named views of `data` (writes through them update the state) ---------------------------------------------

    @property
    def scalars(self) -> Tensor:
        return self.data[self._slices["scalars"]]

    def scalar(self, name: str) -> Tensor:
        """One of the running sums: n, confidence, correct, nll, brier, n_invalid, n_bad_target."""
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
        """(C, M, 3): per class k, count, sum of p_k and number with target k per bin of p_k."""
        return self.data[self._slices["class_bins"]].view(self.n_classes, self.n_bins, 3)

    @property
    def device(self) -> torch.device:
        return self.data.device

    # --- building and combining states ------------------------------------------------------------------------------

    def empty_like(self, device: torch.device | str | None = None) -> CalibrationState:
        """A zero state with the same layout."""
        return CalibrationState(self.n_classes, self.n_bins, self.n_fine, device or self.device)

    def same_layout(self, other: CalibrationState) -> bool:
        return (self.n_classes, self.n_bins, self.n_fine) == (other.n_classes, other.n_bins, other.n_fine)

    def __add__(self, other: CalibrationState) -> CalibrationState:
        if not isinstance(other, CalibrationState) or not self.same_layout(other):
            return NotImplemented
        return CalibrationState(self.n_classes, self.n_bins, self.n_fine, data=self.data + other.data.to(self.device))

    def __iadd__(self, other: CalibrationState) -> CalibrationState:
        if not isinstance(other, CalibrationState) or not self.same_layout(other):
            return NotImplemented
        self.data += other.data.to(self.device)
        return self

    def to(self, device: torch.device | str) -> CalibrationState:
        return CalibrationState(self.n_classes, self.n_bins, self.n_fine, data=self.data.to(device))

    def clone(self) -> CalibrationState:
        return CalibrationState(self.n_classes, self.n_bins, self.n_fine, data=self.data.clone())

    def all_reduce(self) -> CalibrationState:
        """Sum the state over all processes in place (one collective); a no-op unless torch.distributed runs."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.data, op=dist.ReduceOp.SUM)
        return self

    def __repr__(self) -> str:
        return f"CalibrationState(n_classes={self.n_classes}, n_bins={self.n_bins}, n_fine={self.n_fine}, " \
               f"device={self.device})"

    # --- the per-batch update: no host synchronisation --------------------------------------------------------------

    def update(
        self,
        preds: Tensor,  # (N, C) probabilities, or logits if `activation` is given
        target: Tensor,  # (N,) integer class ids
        weight: Tensor | None = None,  # (N,) 0/1 (or any non-negative) row weights, e.g. to drop padding duplicates
        activation: Callable[[Tensor], Tensor] | None = None,  # maps `preds` to probabilities over axis 1
        ignore_index: int | None = None,  # rows whose target equals this are skipped silently
    ) -> None:
        """Add a batch to the counters. Rows with a non-finite probability count in `n_invalid`, rows whose target
        is out of range (and not `ignore_index`) in `n_bad_target`; neither enters any other counter."""
        if preds.dim() != 2 or preds.shape[1] != self.n_classes:
            raise ValueError(f"preds must be (N, {self.n_classes}), got {tuple(preds.shape)}")
        if target.shape != preds.shape[:1] or target.is_floating_point() or target.dtype == torch.bool:
            raise ValueError(f"target must hold {preds.shape[0]} integer class ids, got {target.dtype} "
                             f"{tuple(target.shape)}")
        probs = _as_probabilities(activation(preds) if activation is not None else preds)
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
        y = torch.where(in_range, target, 0)[:, None]

        conf, hit = p.amax(1), p.argmax(1) == y[:, 0]  # not `max(1)`: its CPU kernel goes multi-threaded on tiny input
        p_y = p.gather(1, y).squeeze(1)
        # Probabilities do not carry the logits' range: the NLL of a true-class probability that underflowed to 0 is
        # capped at -log(tiny), about 87 nats in float32.
        nll = -p_y.clamp_min(torch.finfo(p.dtype).tiny).log()
        brier = (p * p).sum(1) - 2 * p_y + 1
        per_row = torch.stack([torch.ones_like(conf), conf, hit.to(conf.dtype), nll, brier], 1).to(f64)
        flags = torch.stack([invalid, bad_target], 1).to(f64)
        if weight is not None:
            flags = flags * weight.to(dev, f64)[:, None]
        # Weighted sums in the order of _SCALARS: n, confidence, correct, nll, brier, n_invalid, n_bad_target.
        self.scalars.add_(torch.cat([per_row * keep[:, None], flags], 1).sum(0))
        # All three histograms in one index_add_: the class bins bin p_ik against 1[y_i = k] (Kull et al. 2019), and
        # two extra columns bin the top-label confidence against correctness on the coarse and on the fine grid.
        # Bin ((m-1)/M, m/M] is ceil(x M) - 1 (0 for x = 0), computed rather than `bucketize`d: that CPU kernel goes
        # multi-threaded on a few hundred values and then waits for busy cores. A float32 value times M is exact in
        # float64, so the edges are exactly m/M.
        values = torch.cat([p, conf[:, None], conf[:, None]], 1).to(f64)
        hits = torch.cat([self._class_ids == y, hit[:, None], hit[:, None]], 1).to(f64)
        cells = (values * self._cell_scale).ceil_().long().sub_(1).clamp_(min=0)
        cells = torch.minimum(cells, self._cell_last).add_(self._cell_offset)
        counters = torch.stack([torch.ones_like(values), values, hits], 2) * keep[:, None, None]
        self.data[self._slices["scalars"].stop:].view(-1, 3).index_add_(0, cells.reshape(-1), counters.reshape(-1, 3))

    # --- metrics (read the counters: call once per epoch, not per batch) -------------------------------------------

    def bin_table(self) -> dict[str, Tensor]:
        """Per equal-width bin: lo, hi, count, mean confidence, accuracy and gap = confidence - accuracy
        (NaN for empty bins), as float64 CPU tensors."""
        bins = self.bins.detach().cpu()
        count, conf_sum, correct = bins.unbind(1)
        nonempty = count > 0
        conf = torch.where(nonempty, conf_sum / count.clamp_min(1e-300), math.nan)
        acc = torch.where(nonempty, correct / count.clamp_min(1e-300), math.nan)
        edges = torch.linspace(0, 1, self.n_bins + 1, dtype=torch.float64)
        return {"lo": edges[:-1], "hi": edges[1:], "count": count, "confidence": conf, "accuracy": acc,
                "gap": conf - acc}

    def metrics(self) -> dict[str, float]:
        """All calibration metrics as Python floats (NaN where no row was counted)."""
        s = {name: float(v) for name, v in zip(_SCALARS, self.scalars.detach().cpu().tolist())}
        n = s["n"]
        out = {"n": n, "n_invalid": s["n_invalid"]}
        if n <= 0:
            return {**out, **{name: math.nan for name in METRIC_NAMES if name not in out}}
        bins = self.bins.detach().cpu()
        ece, over, under = _binned_errors(bins, n)
        out.update(
            accuracy=s["correct"] / n, confidence=s["confidence"] / n, ece=ece, mce=_max_error(bins),
            rmsce=_rms_error(bins, n), adaptive_ece=_binned_errors(_equal_mass_bins(self.fine.detach().cpu(),
                                                                                    self.n_bins), n)[0],
            classwise_ece=self._classwise_ece(n), overconfidence=over, underconfidence=under,
            nll=s["nll"] / n, brier=s["brier"] / n, aurc=_aurc(self.fine.detach().cpu()))
        return out

    def ece(self, norm: str = "l1") -> float:
        """Top-label calibration error over the equal-width bins: 'l1' (ECE), 'l2' (RMSCE) or 'max' (MCE)."""
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        bins, n = self.bins.detach().cpu(), float(self.scalar("n"))
        if n <= 0:
            return math.nan
        return {"l1": lambda: _binned_errors(bins, n)[0], "l2": lambda: _rms_error(bins, n),
                "max": lambda: _max_error(bins)}[norm]()

    def _classwise_ece(self, n: float) -> float:
        per_class = self.class_bins.detach().cpu()  # (C, M, 3)
        return float((per_class[..., 2] - per_class[..., 1]).abs().sum((1,)).mean() / n)


# --- metric formulas on (bins, 3) CPU float64 counters: count, sum of confidence, number correct -----------------


def _binned_errors(bins: Tensor, n: float) -> tuple[float, float, float]:
    """ECE and its over- and under-confident parts: sum_m w_m |acc_m - conf_m| = sum_m |correct_m - conf_m| / n."""
    gap = bins[:, 1] - bins[:, 2]
    return float(gap.abs().sum() / n), float(gap.clamp_min(0).sum() / n), float((-gap).clamp_min(0).sum() / n)


def _max_error(bins: Tensor) -> float:
    count = bins[:, 0]
    nonempty = count > 0
    return float(((bins[nonempty, 1] - bins[nonempty, 2]) / count[nonempty]).abs().max())


def _rms_error(bins: Tensor, n: float) -> float:
    count = bins[:, 0]
    nonempty = count > 0
    return math.sqrt(float(((bins[nonempty, 1] - bins[nonempty, 2]) ** 2 / count[nonempty]).sum() / n))


def _equal_mass_bins(fine: Tensor, n_bins: int) -> Tensor:
    """Merge fine bins into `n_bins` bins of about equal count (Mukhoti et al. 2020's adaptive ECE). A fine bin is
    never split, so the equal-mass edges are exact to the fine grid's width."""
    count = fine[:, 0]
    total = count.sum()
    middle = count.cumsum(0) - count / 2  # a fine bin goes wherever the middle of its mass falls
    group = (middle * n_bins / total).floor().long().clamp_(0, n_bins - 1)
    return torch.zeros(n_bins, 3, dtype=fine.dtype).index_add_(0, group, fine)


def _harmonic(x: Tensor) -> Tensor:
    """H(x) = sum_{i<=x} 1/i, extended to real x >= 0 by the digamma function."""
    return torch.digamma(x + 1) + 0.5772156649015329


def _aurc(fine: Tensor) -> float:
    """Area under the risk-coverage curve (Geifman et al. 2019): the mean over k of the error rate of the k most
    confident rows. Rows that share a fine bin are taken in random order, and the value is the exact expectation
    over that order (the expected errors among the first i of a bin with c rows and e errors is e*i/c)."""
    count, correct = fine.flip(0)[:, 0], fine.flip(0)[:, 2]  # most confident first
    errors = count - correct
    nonempty = count > 0
    before = count.cumsum(0) - count  # K: rows ahead of the bin
    errors_before = errors.cumsum(0) - errors  # E
    # sum_{i=1..c} (E + e*i/c) / (K + i) = (E - e*K/c) (H(K + c) - H(K)) + e
    c = count.clamp_min(1e-300)
    terms = (errors_before - errors * before / c) * (_harmonic(before + count) - _harmonic(before)) + errors
    return float(terms[nonempty].sum() / count.sum())


def calibration_metrics(
    probs: Tensor,  # (N, C) probabilities
    target: Tensor,  # (N,) class ids
    n_bins: int = 15,  # equal-width bins
) -> dict[str, float]:
    """Every metric of `CalibrationState.metrics` for one set of predictions.

    >>> calibration_metrics(torch.tensor([[.9, .1], [.2, .8]]), torch.tensor([0, 0]))['accuracy']
    0.5
    """
    state = CalibrationState(probs.shape[1], n_bins, device=probs.device)
    state.update(probs, target)
    return state.metrics()


def calibration_error(
    probs: Tensor,  # (N, C) probabilities
    target: Tensor,  # (N,) class ids
    n_bins: int = 15,  # equal-width bins ((m-1)/M, m/M]
    norm: str = "l1",  # 'l1' (ECE), 'l2' (RMS calibration error) or 'max' (MCE)
) -> float:
    """Top-label calibration error; equals torchmetrics' `multiclass_calibration_error` unless a confidence lies
    exactly on a bin edge (torchmetrics bins [lo, hi) and puts 1.0 in an extra bin).

    >>> probs = torch.tensor([[.25, .20, .55], [.55, .05, .40], [.10, .30, .60], [.90, .05, .05]])
    >>> round(calibration_error(probs, torch.tensor([0, 1, 2, 0]), n_bins=3, norm='max'), 4)
    0.2333
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    state = CalibrationState(probs.shape[1], n_bins, n_fine=1, device=probs.device)
    state.update(probs, target)
    return state.ece(norm)
