"""Isotonic regression: one-vs-rest with renormalisation, and top-label. One fitted curve, `IsotonicCurve`, serves
both: the least-squares non-decreasing fit of 0/1 outcomes on scores (pool adjacent violators), linearly
interpolated between its knots and clipped outside them, as scikit-learn's `IsotonicRegression(out_of_bounds=
'clip')` predicts."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fastai_ls.calibration.calibrators.base import Calibrator
from fastai_ls.calibration.calibrators.toplabel import TopLabelCalibrator

__all__ = ["IsotonicCurve", "IsotonicCalibration", "TopLabelIsotonic"]


class IsotonicCurve:
    """A non-decreasing map from scores in [0, 1] to probabilities, fitted by pool adjacent violators (PAV).

    Equal scores are pooled first (their outcomes averaged, weighted by count), then adjacent blocks whose means
    decrease are merged until the means increase. The knots are the first and last score of each block; between
    knots the curve is linear, outside them constant.

    >>> curve = IsotonicCurve().fit(torch.tensor([.125, .25, .375, .5]), torch.tensor([0., 1., 0., 1.]))
    >>> curve(torch.tensor([.125, .3125, .4375, .9])).tolist()
    [0.0, 0.5, 0.75, 1.0]
    """

    def __init__(self) -> None:
        """An unfitted curve."""
        self.knots_x: Tensor | None = None
        self.knots_y: Tensor | None = None

    def fit(self, score: Tensor, outcome: Tensor) -> IsotonicCurve:
        """Fit on scores and their outcomes; returns the curve.

        Parameters
        ----------
        score : Tensor
            (n,) scores, n >= 1.
        outcome : Tensor
            (n,) outcomes, 0 or 1 (any values in [0, 1] work: the fit is least squares).
        """
        x = score.detach().double().cpu().numpy()
        y = outcome.detach().double().cpu().numpy()
        order = np.argsort(x, kind="stable")
        x, y = x[order], y[order]
        unique_x, start = np.unique(x, return_index=True)
        count = np.diff(np.append(start, len(x))).astype(np.float64)
        total = np.add.reduceat(y, start)
        # A block of the solution can only end where the next score's mean outcome is higher (the last score of a
        # block is at most its mean, the first of the next at least that one's, which is higher): each maximal run
        # of non-increasing means lies within one block, and is pooled before the stack loop, which then runs
        # once per rise (at most once per positive outcome) rather than once per score.
        rises = np.flatnonzero(total[1:] * count[:-1] > total[:-1] * count[1:]) + 1
        run_start = np.concatenate([[0], rises])
        # Blocks as parallel stacks: sum of outcomes, number of rows, index of the first unique score.
        sums, sizes, firsts = [], [], []
        for i, s, n in zip(run_start.tolist(), np.add.reduceat(total, run_start).tolist(),
                           np.add.reduceat(count, run_start).tolist()):
            sums.append(s)
            sizes.append(n)
            firsts.append(i)
            # Merge while the previous block's mean is not below this one's (compared without dividing).
            while len(sums) > 1 and sums[-2] * sizes[-1] >= sums[-1] * sizes[-2]:
                s, n = sums.pop(), sizes.pop()
                firsts.pop()
                sums[-1] += s
                sizes[-1] += n
        lasts = firsts[1:] + [len(unique_x)]
        knots_x, knots_y = [], []
        for first, end, s, n in zip(firsts, lasts, sums, sizes):
            ends = (first,) if end - 1 == first else (first, end - 1)
            knots_x.extend(unique_x[i] for i in ends)
            knots_y.extend([s / n] * len(ends))
        self.knots_x = torch.tensor(knots_x, dtype=torch.float64)
        self.knots_y = torch.tensor(knots_y, dtype=torch.float64)
        return self

    def to(self, device: torch.device | str):
        """Move the curve to `device` (in place; returns the curve)."""
        if self.knots_x is not None:
            self.knots_x, self.knots_y = self.knots_x.to(device), self.knots_y.to(device)
        return self

    def __call__(self, score: Tensor) -> Tensor:
        """The curve at `score` (any shape), in the score's dtype and device."""
        kx, ky = self.knots_x.to(score), self.knots_y.to(score)
        if len(kx) == 1:
            return ky.expand_as(score).clone()
        right = torch.searchsorted(kx, score.contiguous()).clamp_(1, len(kx) - 1)
        x0, x1, y0, y1 = kx[right - 1], kx[right], ky[right - 1], ky[right]
        t = ((score - x0) / (x1 - x0)).clamp_(0, 1)
        return y0 + t * (y1 - y0)


class IsotonicCalibration(Calibrator):
    """Isotonic regression, one-vs-rest with renormalisation (Zadrozny & Elkan, "Transforming classifier scores
    into accurate multiclass probability estimates", KDD 2002), as scikit-learn's
    `CalibratedClassifierCV(method='isotonic')` does it.

    Multiclass form: one-vs-rest: for each class k an `IsotonicCurve` of 1[y = k] on the model's probability
    q_k = softmax(z)_k; the C outputs are divided by their sum (a row whose outputs are all 0 becomes uniform).
    With two classes only class 1 is fitted and p_0 = 1 - p_1, as in scikit-learn. Curves are flat and can reach
    0, so a held-out class never seen with a high enough score gets probability 0 (infinite NLL). It may change the
    predicted class.

    >>> _ = torch.manual_seed(0); z = torch.randn(1000, 3); y = torch.distributions.Categorical(logits=z).sample()
    >>> IsotonicCalibration().fit(4 * z, y)(4 * z).sum(1).allclose(torch.ones(1000))
    True
    """

    name = "isotonic"
    description = "isotonic regression per class, one-vs-rest, renormalised (Zadrozny & Elkan 2002)"
    form = "one-vs-rest"
    may_change_prediction = True
    per_class = True

    def __init__(self) -> None:
        """A one-vs-rest isotonic calibration to fit."""
        super().__init__()
        self.curves: list[IsotonicCurve] | None = None

    def _fit(self, z: Tensor, y: Tensor) -> None:
        q = z.softmax(1)
        fitted = [1] if z.shape[1] == 2 else range(z.shape[1])
        self.curves = [IsotonicCurve().fit(q[:, k], (y == k).double()) for k in fitted]

    def _probs(self, z: Tensor) -> Tensor:
        # The curves were fitted on float64 scores: evaluated on float32 ones, an over-confident model's
        # confidences near 1 (distinct knots in float64) would all round to 1.0 and take the last knot's value.
        q = z.double().softmax(1)
        if q.shape[1] == 2:
            p1 = self.curves[0](q[:, 1])
            return torch.stack([1 - p1, p1], 1)
        p = self._all_curves(q)
        total = p.sum(1, keepdim=True)
        return torch.where(total > 0, p / total.clamp_min(torch.finfo(p.dtype).tiny), 1 / p.shape[1])

    def _all_curves(self, q: Tensor) -> Tensor:
        """(N, C): curve k at column k of `q`, every curve at once (no loop over classes): the knots padded with
        +inf to one (C, K) table, as each `IsotonicCurve` interpolates and clips."""
        lengths = torch.tensor([len(curve.knots_x) for curve in self.curves], device=q.device)
        width = int(lengths.max())
        knots_x = torch.full((len(self.curves), width + 1), torch.inf, dtype=q.dtype, device=q.device)
        knots_y = torch.zeros_like(knots_x)
        for k, curve in enumerate(self.curves):  # C copies of a few knots each, not C passes over the rows
            knots_x[k, :len(curve.knots_x)] = curve.knots_x.to(q)
            knots_y[k, :len(curve.knots_y)] = curve.knots_y.to(q)
        score = q.T.contiguous()  # (C, N)
        # A single-knot curve reads its knot and the +inf pad after it: t = 0 gives the knot's value.
        right = torch.minimum(torch.searchsorted(knots_x, score).clamp_(min=1), lengths.clamp(min=2)[:, None] - 1)
        x0, x1 = knots_x.gather(1, right - 1), knots_x.gather(1, right)
        y0, y1 = knots_y.gather(1, right - 1), knots_y.gather(1, right)
        t = torch.where(x1.isinf(), 0.0, (score - x0) / (x1 - x0)).clamp_(0, 1)
        return (y0 + t * (y1 - y0)).T

    def _params_repr(self) -> str:
        return f"n_classes={self.n_classes}"


class TopLabelIsotonic(TopLabelCalibrator):
    """Top-label isotonic regression (Gupta & Ramdas, "Top-label calibration and multiclass-to-binary reductions",
    ICLR 2022), with the isotonic fit of Zadrozny & Elkan (KDD 2002).

    Multiclass form: top-label: for each predicted class k, an `IsotonicCurve` of 1[y = k] on the top confidence
    of the rows predicted k (classes with fewer than `min_rows` such rows share one curve fitted on all rows). The
    other classes share the rest of the mass (see `TopLabelCalibrator`): the predicted class never changes.

    Parameters
    ----------
    min_rows : int
        Held-out rows a predicted class needs for a curve of its own.

    Examples
    --------
    >>> _ = torch.manual_seed(0); z = torch.randn(2000, 3); y = torch.distributions.Categorical(logits=z).sample()
    >>> bool((TopLabelIsotonic().fit(4 * z, y)(4 * z).argmax(1) == z.argmax(1)).all())
    True
    """

    name = "top_label_isotonic"
    description = "isotonic regression of the top confidence per predicted class (Gupta & Ramdas 2022)"

    def _new_curve(self) -> IsotonicCurve:
        return IsotonicCurve()
