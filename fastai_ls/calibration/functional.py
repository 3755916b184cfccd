"""Calibration metrics of predictions held in memory: one call, one `CalibrationState` behind it."""

from __future__ import annotations

from torch import Tensor

from fastai_ls.calibration.state import CalibrationState

__all__ = ["calibration_error", "calibration_metrics"]


def calibration_metrics(
    probs: Tensor,  # (N, C) probabilities
    target: Tensor,  # (N,) class ids
    n_bins: int = 15,  # equal-width bins
) -> dict[str, float]:
    """Every metric of `CalibrationState.metrics` for one set of predictions.

    >>> import torch
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

    >>> import torch
    >>> probs = torch.tensor([[.25, .20, .55], [.55, .05, .40], [.10, .30, .60], [.90, .05, .05]])
    >>> round(calibration_error(probs, torch.tensor([0, 1, 2, 0]), n_bins=3, norm='max'), 4)
    0.2333
    """
    state = CalibrationState(probs.shape[1], n_bins, n_fine=1, device=probs.device, classwise=False)
    state.update(probs, target)
    return state.ece(norm)
