"""Top-label calibration metrics computed from histogram counters.

Every function takes `(..., cells, 3)` CPU float64 tensors of count, sum of confidence and number correct per cell
(the equal-width `bins` or the `fine` grid of a `CalibrationState`) and returns a `(...)` tensor: one value per
leading index. A state's own counters are a batch of one; a bootstrap's replicates are a batch of `n_boot`
(`intervals.py`), so the point estimate and its interval come from the same formula.

Weights: a row counts as its weight (the callback's 0/1 padding weights, or a caller's). Empty histograms give NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastai_ls.calibration.risk_coverage import augrc, aurc
from fastai_ls.calibration.smooth import smooth_ece

__all__ = ["top_label_metrics", "TOP_LABEL_NAMES", "binned_errors", "max_error", "rms_error", "debiased_rms_error",
           "equal_mass_bins", "ks_error"]

# The metrics that `top_label_metrics` returns: everything that the two histograms determine.
TOP_LABEL_NAMES = ("accuracy", "confidence", "ece", "mce", "rmsce", "ece_debiased", "adaptive_ece", "smece",
                   "ks_error", "overconfidence", "underconfidence", "aurc", "augrc")


def top_label_metrics(bins: Tensor, fine: Tensor, cells: Tensor | None = None,
                      n_cells: int | None = None) -> dict[str, Tensor]:
    """Every metric of `TOP_LABEL_NAMES` from the equal-width bins `(..., M, 3)` and the fine grid `(..., K, 3)`
    of the same rows; adaptive ECE uses as many equal-mass bins as there are equal-width ones.

    Empty cells change none of these metrics, so `fine` may hold only some of the grid's `n_cells` cells, those
    listed in `cells` (a bootstrap keeps only the cells with rows: its replicates can fill no other).

    Parameters
    ----------
    bins : Tensor
        `(..., M, 3)` float64 counters per equal-width bin: count, sum of confidence, number correct.
    fine : Tensor
        `(..., K, 3)` the same counters on the fine grid (or on the cells listed in `cells`).
    cells : Tensor, optional
        Indices of the fine cells that `fine` holds, increasing; None: all.
    n_cells : int, optional
        K, the size of the fine grid, when `fine` holds only some cells.

    Examples
    --------
    >>> bins, fine = torch.tensor([[2., 1.5, 1.]]), torch.tensor([[0., 0., 0.], [2., 1.5, 1.]])
    >>> {k: round(float(v), 3) for k, v in top_label_metrics(bins, fine).items() if k in ('accuracy', 'ece')}
    {'accuracy': 0.5, 'ece': 0.25}
    """
    n = bins[..., 0].sum(-1)
    ece, over, under = binned_errors(bins)
    return {
        "accuracy": bins[..., 2].sum(-1) / n, "confidence": bins[..., 1].sum(-1) / n,
        "ece": ece, "mce": max_error(bins), "rmsce": rms_error(bins), "ece_debiased": debiased_rms_error(bins),
        "adaptive_ece": binned_errors(equal_mass_bins(fine, bins.shape[-2]))[0],
        "smece": smooth_ece(fine, cells, n_cells)[0],
        "ks_error": ks_error(fine), "overconfidence": over, "underconfidence": under,
        "aurc": aurc(fine), "augrc": augrc(fine),
    }


def binned_errors(bins: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ECE (Naeini et al. 2015; Guo et al. 2017) and its over- and under-confident parts:
    sum_m w_m |acc_m - conf_m| = sum_m |correct_m - confidence sum_m| / n, split by the sign of the gap.

    Parameters
    ----------
    bins : Tensor
        `(..., M, 3)` float64 counters per bin: count, sum of confidence, number correct.
    """
    n = bins[..., 0].sum(-1)
    gap = bins[..., 1] - bins[..., 2]
    return gap.abs().sum(-1) / n, gap.clamp_min(0).sum(-1) / n, (-gap).clamp_min(0).sum(-1) / n


def _bin_gaps(bins: Tensor) -> tuple[Tensor, Tensor]:
    """conf_m - acc_m per bin (0 in empty bins) and which bins hold rows."""
    count = bins[..., 0]
    nonempty = count > 0
    return torch.where(nonempty, (bins[..., 1] - bins[..., 2]) / count.clamp_min(1e-300), 0.0), nonempty


def max_error(bins: Tensor) -> Tensor:
    """MCE: the largest |acc_m - conf_m| over the bins that hold rows (a bin of one row can set it).

    Parameters
    ----------
    bins : Tensor
        `(..., M, 3)` float64 counters per bin: count, sum of confidence, number correct.
    """
    gap, nonempty = _bin_gaps(bins)
    return torch.where(nonempty, gap.abs(), -torch.inf).amax(-1)


def rms_error(bins: Tensor) -> Tensor:
    """RMS calibration error: sqrt(sum_m w_m (acc_m - conf_m)^2), the plug-in l2 error (biased upwards).

    Parameters
    ----------
    bins : Tensor
        `(..., M, 3)` float64 counters per bin: count, sum of confidence, number correct.
    """
    gap, _ = _bin_gaps(bins)
    return ((bins[..., 0] * gap * gap).sum(-1) / bins[..., 0].sum(-1)).sqrt()


def debiased_rms_error(bins: Tensor) -> Tensor:
    """Debiased l2 calibration error (Kumar, Liang & Ma 2019, "Verified Uncertainty Calibration"): per bin with
    n_m >= 2 rows, (acc_m - conf_m)^2 - acc_m (1 - acc_m) / (n_m - 1), weighted by n_m / n, summed, clipped at 0,
    square root; bins with fewer than 2 rows add 0. The subtracted term is the variance that noise in acc_m adds to
    the plug-in estimate, so a calibrated model scores about 0 where RMSCE and ECE stay positive. It estimates the
    l2 error: compare it with `rms_error`, not with ECE.

    Parameters
    ----------
    bins : Tensor
        `(..., M, 3)` float64 counters per bin: count, sum of confidence, number correct.

    Examples
    --------
    >>> float(debiased_rms_error(torch.tensor([[100., 70., 70.], [100., 90., 90.]])))  # calibrated bins
    0.0
    """
    count = bins[..., 0]
    gap, _ = _bin_gaps(bins)
    acc = bins[..., 2] / count.clamp_min(1e-300)
    per_bin = torch.where(count >= 2, gap * gap - acc * (1 - acc) / (count - 1).clamp_min(1e-300), 0.0)
    return ((count * per_bin).sum(-1) / count.sum(-1)).clamp_min(0).sqrt()


def equal_mass_bins(fine: Tensor, n_bins: int) -> Tensor:
    """Merge fine cells into `n_bins` bins of about equal count (Mukhoti et al. 2020's adaptive ECE). A cell is
    never split, so the equal-mass edges are exact to the cell width, and a bin may be empty when one cell holds
    more than n / n_bins rows.

    Parameters
    ----------
    fine : Tensor
        `(..., K, 3)` float64 counters per cell: count, sum of confidence, number correct.
    n_bins : int
        How many bins to make.
    """
    count = fine[..., 0]
    total = count.sum(-1, keepdim=True)
    middle = count.cumsum(-1) - count / 2  # a cell goes wherever the middle of its mass falls
    group = (middle * n_bins / total).floor_().long().clamp_(0, n_bins - 1)
    out = fine.new_zeros(*fine.shape[:-2], n_bins)
    return torch.stack([out.scatter_add(-1, group, fine[..., i]) for i in range(3)], -1)


def ks_error(fine: Tensor) -> Tensor:
    """Kolmogorov-Smirnov calibration error (Gupta et al. 2021, "Calibration of Neural Networks using Splines"):
    with rows sorted by confidence, max_k |(1/n) sum_{i<=k} (a_i - c_i)|.

    The cumulative sum is read at the cell edges, so rows that share a cell are treated as tied: the value is the
    KS error of the confidences rounded to the cell edges. It differs from the row-sorted value by at most the
    largest excursion of the partial sum inside one cell, which is at most (rows in that cell) / n.

    Parameters
    ----------
    fine : Tensor
        `(..., K, 3)` float64 counters per cell: count, sum of confidence, number correct.

    Examples
    --------
    >>> round(float(ks_error(torch.tensor([[1., .9, 0.], [1., .6, 1.]]))), 4)  # partial sums -0.9, then -0.5
    0.45
    """
    residual = (fine[..., 2] - fine[..., 1]).cumsum(-1)
    return residual.abs().amax(-1) / fine[..., 0].sum(-1)
