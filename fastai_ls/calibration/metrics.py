"""Calibration metrics computed from a state's counters: (bins, 3) CPU float64 tensors of count, sum of
confidence and number correct per bin. Each formula lives here once; `CalibrationState.metrics` reads them."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["binned_errors", "max_error", "rms_error", "equal_mass_bins", "aurc"]


def binned_errors(bins: Tensor, n: float) -> tuple[float, float, float]:
    """ECE and its over- and under-confident parts: sum_m w_m |acc_m - conf_m| = sum_m |correct_m - conf_m| / n."""
    gap = bins[:, 1] - bins[:, 2]
    return float(gap.abs().sum() / n), float(gap.clamp_min(0).sum() / n), float((-gap).clamp_min(0).sum() / n)


def max_error(bins: Tensor) -> float:
    count = bins[:, 0]
    nonempty = count > 0
    return float(((bins[nonempty, 1] - bins[nonempty, 2]) / count[nonempty]).abs().max())


def rms_error(bins: Tensor, n: float) -> float:
    count = bins[:, 0]
    nonempty = count > 0
    return math.sqrt(float(((bins[nonempty, 1] - bins[nonempty, 2]) ** 2 / count[nonempty]).sum() / n))


def equal_mass_bins(fine: Tensor, n_bins: int) -> Tensor:
    """Merge fine bins into `n_bins` bins of about equal count (Mukhoti et al. 2020's adaptive ECE). A fine bin is
    never split, so the equal-mass edges are exact to the fine grid's width."""
    count = fine[:, 0]
    total = count.sum()
    middle = count.cumsum(0) - count / 2  # a fine bin goes wherever the middle of its mass falls
    group = (middle * n_bins / total).floor().long().clamp_(0, n_bins - 1)
    return torch.zeros(n_bins, 3, dtype=fine.dtype).index_add_(0, group, fine)


def harmonic(x: Tensor) -> Tensor:
    """H(x) = sum_{i<=x} 1/i, extended to real x >= 0 by the digamma function."""
    return torch.digamma(x + 1) + 0.5772156649015329


def aurc(fine: Tensor) -> float:
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
    terms = (errors_before - errors * before / c) * (harmonic(before + count) - harmonic(before)) + errors
    return float(terms[nonempty].sum() / count.sum())
