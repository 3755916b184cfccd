"""Top-label calibration (Gupta & Ramdas, ICLR 2022): recalibrate only the confidence of the predicted class, with
one binary curve per predicted class, and share the rest of the mass among the other classes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastai_ls.calibration.calibrators.base import Calibrator, row_blocks
from fastai_ls.validation import check_int

__all__ = ["TopLabelCalibrator", "spread_rest", "MARGIN"]

# The other classes stay at most (1 - MARGIN) times the calibrated confidence, so the predicted class stays the
# strict argmax (a tie would let `argmax` pick another class).
MARGIN = 1e-4


def lowest_confidence(n_classes: int) -> float:
    """The smallest top confidence h for which the other classes can share 1 - h with none above (1 - MARGIN) h.

    Parameters
    ----------
    n_classes : int
        C.

    Examples
    --------
    >>> round(lowest_confidence(10), 6)
    0.100009
    """
    return 1 / (1 + (n_classes - 1) * (1 - MARGIN))


def spread_rest(probs: Tensor, top: Tensor, confidence: Tensor) -> Tensor:
    """(N, C) probabilities that give column `top` (N,) the `confidence` (N,) and share 1 - confidence among the
    other classes in proportion to `probs`, none above (1 - MARGIN) * confidence (what a class would get above
    that cap goes to the others, again in proportion).

    Parameters
    ----------
    probs : Tensor
        (N, C) probabilities whose proportions the other classes keep.
    top : Tensor
        (N,) the predicted class of each row.
    confidence : Tensor
        (N,) its calibrated probability, at least `lowest_confidence(C)`.

    Examples
    --------
    >>> probs = torch.tensor([[.5, .45, .05]], dtype=torch.float64)
    >>> spread_rest(probs, torch.tensor([0]), torch.tensor([.4], dtype=torch.float64)).round(decimals=5).tolist()
    [[0.4, 0.39996, 0.20004]]
    """
    n_classes = probs.shape[1]
    is_top = F.one_hot(top, n_classes).bool()
    others = probs.masked_fill(is_top, 0)
    total = others.sum(1, keepdim=True)
    share = torch.where(total > 0, others / total.clamp_min(torch.finfo(probs.dtype).tiny),
                        (~is_top).to(probs.dtype) / (n_classes - 1))
    rest = share * (1 - confidence)[:, None]
    cap = (confidence * (1 - MARGIN))[:, None]
    # Each round works on the rows that still have mass above the cap only (at 1,000 classes a few rows can take
    # hundreds of rounds; the others are done after the first).
    active = torch.arange(len(rest), device=rest.device)
    for _ in range(n_classes):
        row_rest, row_cap = rest[active], cap[active]
        excess = (row_rest - row_cap).clamp_min(0).sum(1, keepdim=True)
        over = excess[:, 0] > 0
        if not bool(over.any()):
            break
        active, row_rest, row_cap, excess = active[over], row_rest[over], row_cap[over], excess[over]
        row_rest = row_rest.minimum(row_cap)
        free = (row_rest < row_cap) & ~is_top[active]
        weight = torch.where(free, row_rest, 0)
        weight_sum = weight.sum(1, keepdim=True)
        even = free.to(probs.dtype) / free.sum(1, keepdim=True).clamp_min(1)
        rest[active] = row_rest + excess * torch.where(weight_sum > 0, weight / weight_sum.clamp_min(1e-300), even)
    return torch.where(is_top, confidence[:, None], rest.minimum(cap))


class TopLabelCalibrator(Calibrator):
    """The top-label scheme: the predicted class k = argmax z and its confidence c = max softmax(z) are kept apart;
    a binary curve per predicted class, fitted on the held-out rows predicted k (outcome 1[y = k]), maps c to the
    calibrated confidence h; predicted classes with fewer than `min_rows` held-out rows share a curve fitted on all
    rows. The other classes share 1 - h in proportion to their probabilities, capped just below h
    (`spread_rest`), and h is kept at least `lowest_confidence(C)` (just above 1 / C), so the predicted class never
    changes. Subclasses give the curve (`_new_curve`): an object with `fit(score, outcome)` and `__call__(score)`.

    Parameters
    ----------
    min_rows : int
        Held-out rows a predicted class needs for a curve of its own.
    """

    form = "top-label"
    may_change_prediction = False
    upcasts_in_blocks = True

    def __init__(self, min_rows: int = 50):
        """A top-label calibrator to fit."""
        super().__init__()
        self.min_rows = check_int(min_rows, "min_rows")
        self.pooled = None
        self.curves: list | None = None

    def _new_curve(self):
        raise NotImplementedError

    def _fit(self, z: Tensor, y: Tensor) -> None:
        # The curves see (N,) confidences only: the float64 softmax is taken block by block, never of all rows.
        confidence = torch.empty(len(z), dtype=torch.float64, device=z.device)
        predicted = torch.empty(len(z), dtype=torch.long, device=z.device)
        for rows in row_blocks(*z.shape):
            probs = z[rows].double().softmax(1)
            confidence[rows], predicted[rows] = probs.amax(1), probs.argmax(1)
        correct = (predicted == y).double()
        self.pooled = self._new_curve().fit(confidence, correct)
        counts = torch.bincount(predicted, minlength=z.shape[1]).tolist()
        self.curves = [self._new_curve().fit(confidence[predicted == k], correct[predicted == k])
                       if counts[k] >= self.min_rows else None for k in range(z.shape[1])]

    def _probs(self, z: Tensor) -> Tensor:
        # In float64, as the curves were fitted: float32 confidences near 1 would round to 1.0 and lose the curves'
        # resolution there, where an over-confident model puts most of its rows.
        probs = z.double().softmax(1)
        confidence, predicted = probs.amax(1), probs.argmax(1)
        calibrated = self.pooled(confidence)
        for k, curve in enumerate(self.curves):
            if curve is not None:
                rows = predicted == k
                calibrated[rows] = curve(confidence[rows])
        calibrated = calibrated.clamp(lowest_confidence(z.shape[1]), 1)
        return spread_rest(probs, predicted, calibrated)

    def _params_repr(self) -> str:
        own = sum(curve is not None for curve in self.curves)
        return f"n_classes={self.n_classes}, own curves={own}"
