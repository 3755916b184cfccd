"""Histogram binning (Zadrozny & Elkan, ICML 2001), top-label (Gupta & Ramdas, ICLR 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastai_ls.calibration.calibrators.toplabel import TopLabelCalibrator
from fastai_ls.validation import check_int

__all__ = ["HistogramCurve", "TopLabelHistogramBinning"]


class HistogramCurve:
    """A map from scores to the mean outcome of their bin. Bins are closed on the right, (e_{j-1}, e_j], the first
    reaching down to -inf and the last up to +inf.

    Equal-mass bins (Zadrozny & Elkan 2001; Gupta & Ramdas 2022's uniform-mass binning): `n_bins` bins (default
    one per `points_per_bin` rows) whose edges are order statistics of the scores, so each holds about the same
    number of rows (tied scores stay in one bin). Equal-width bins: `n_bins` (default 10) bins of width 1 / n_bins
    on [0, 1]; an empty one leaves its scores unchanged.

    Parameters
    ----------
    n_bins : int | None
        The number of bins; None for the defaults above.
    points_per_bin : int
        Rows per equal-mass bin when `n_bins` is None.
    equal_mass : bool
        Equal-mass (True) or equal-width (False) bins.

    Examples
    --------
    >>> curve = HistogramCurve(n_bins=2).fit(torch.tensor([.1, .2, .3, .4]), torch.tensor([0., 1., 1., 1.]))
    >>> curve(torch.tensor([.15, .35])).tolist()
    [0.5, 1.0]
    """

    def __init__(self, n_bins: int | None = None, points_per_bin: int = 50, equal_mass: bool = True):
        """An unfitted curve."""
        n_bins = None if n_bins is None else check_int(n_bins, "n_bins")
        points_per_bin = check_int(points_per_bin, "points_per_bin")
        self.n_bins, self.points_per_bin, self.equal_mass = n_bins, points_per_bin, bool(equal_mass)
        self.edges: Tensor | None = None
        self.values: Tensor | None = None

    def fit(self, score: Tensor, outcome: Tensor) -> HistogramCurve:
        """Fit on scores and their outcomes; returns the curve.

        Parameters
        ----------
        score : Tensor
            (n,) scores, n >= 1.
        outcome : Tensor
            (n,) outcomes, 0 or 1.
        """
        x, y = score.detach().double().cpu(), outcome.detach().double().cpu()
        if self.equal_mass:
            n_bins = self.n_bins or max(1, len(x) // self.points_per_bin)
            ordered = x.sort().values
            if n_bins > 2 * len(x):
                # Cuts closer than half a row apart fall on every row: each score is an edge (no loop, no tensor
                # of millions of cuts).
                edges = torch.unique(ordered)
            else:
                cuts = (torch.arange(1, n_bins, dtype=torch.float64) * len(x) / n_bins).round().long() - 1
                edges = torch.unique(ordered[cuts[cuts >= 0]])
        else:
            n_bins = self.n_bins or 10
            edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)[1:-1]
        bin_of = torch.searchsorted(edges, x)
        count = torch.bincount(bin_of, minlength=len(edges) + 1).double()
        total = torch.bincount(bin_of, weights=y, minlength=len(edges) + 1)
        self.edges = edges
        self.values = torch.where(count > 0, total / count.clamp_min(1), torch.nan)
        return self

    def to(self, device: torch.device | str):
        """Move the curve to `device` (in place; returns the curve)."""
        if self.edges is not None:
            self.edges, self.values = self.edges.to(device), self.values.to(device)
        return self

    def __call__(self, score: Tensor) -> Tensor:
        """The curve at `score` (any shape), in the score's dtype and device."""
        value = self.values.to(score)[torch.searchsorted(self.edges.to(score), score.contiguous())]
        return torch.where(value.isnan(), score, value)


class TopLabelHistogramBinning(TopLabelCalibrator):
    """Top-label histogram binning (Zadrozny & Elkan, "Obtaining calibrated probability estimates from decision
    trees and naive Bayesian classifiers", ICML 2001; top-label form: Gupta & Ramdas, "Top-label calibration and
    multiclass-to-binary reductions", ICLR 2022).

    Multiclass form: top-label: for each predicted class k, a `HistogramCurve` (equal-mass bins by default) of
    1[y = k] on the top confidence of the rows predicted k; the calibrated confidence is the accuracy of the row's
    bin. The other classes share the rest of the mass (see `TopLabelCalibrator`): the predicted class never
    changes. Rows in one bin get one confidence, so the confidences take few distinct values (a coarser ranking
    for selective classification).

    Parameters
    ----------
    n_bins : int | None
        Bins per predicted class; None for one per `points_per_bin` rows (equal mass) or 10 (equal width).
    points_per_bin : int
        Rows per equal-mass bin when `n_bins` is None (Gupta & Ramdas use 50).
    equal_mass : bool
        Equal-mass (True, as both papers) or equal-width (False, as netcal's `HistogramBinning`) bins.
    min_rows : int
        Held-out rows a predicted class needs for bins of its own.

    Examples
    --------
    >>> _ = torch.manual_seed(0); z = torch.randn(2000, 3); y = torch.distributions.Categorical(logits=z).sample()
    >>> bool((TopLabelHistogramBinning().fit(4 * z, y)(4 * z).argmax(1) == z.argmax(1)).all())
    True
    """

    name = "histogram"
    description = "histogram binning of the top confidence per predicted class (Zadrozny & Elkan 2001)"

    def __init__(self, n_bins: int | None = None, points_per_bin: int = 50, equal_mass: bool = True,
                 min_rows: int = 50):
        """A top-label histogram binning to fit."""
        super().__init__(min_rows)
        self.curve_options = {"n_bins": n_bins, "points_per_bin": points_per_bin, "equal_mass": equal_mass}
        HistogramCurve(**self.curve_options)  # checks the options now rather than at fit time

    def _new_curve(self) -> HistogramCurve:
        return HistogramCurve(**self.curve_options)
