"""Calibration metrics of predictions held in memory: one call, one `CalibrationState` behind it.

The functions check their input as `CalibrationState.update` does (`checks.py`), before anything is counted:
probabilities must be (N, C) rows of non-negative values that sum to 1 within `SUM_TOLERANCE` (2%; logits are
refused, not silently scored; rows that miss 1 by more than rounding are renormalised with a warning), a target out
of range is an error, and rows with a NaN or infinite probability are left out with a warning and counted in
`n_invalid`.
"""

from __future__ import annotations

import warnings

import torch  # noqa: F401  (the examples in the docstrings use it)
from torch import Tensor

from fastai_ls.calibration.checks import checked_probabilities
from fastai_ls.calibration.state import CLASSWISE_MAX_CLASSES, N_FINE, CalibrationState
from fastai_ls.validation import check_ci, check_class_ids, check_int, check_interval_grid, check_seed

__all__ = ["calibration_error", "calibration_metrics"]


def _state_of(probs: Tensor, target: Tensor, n_bins: int, ignore_index: int | None, classwise: bool | None,
              **kwargs) -> CalibrationState:
    check_int(n_bins, "n_bins")
    probs = checked_probabilities(probs, stacklevel=4)  # the warning points at the caller's line
    target = check_class_ids(target, probs.shape[0], probs.shape[1], ignore_index)
    if classwise is None:
        classwise = probs.shape[1] <= CLASSWISE_MAX_CLASSES
    state = CalibrationState(probs.shape[1], n_bins, device=probs.device, classwise=classwise, **kwargs)
    state.update(probs, target, ignore_index=ignore_index, check=False)  # checked above
    n_invalid = float(state.scalar("n_invalid"))
    if n_invalid:
        warnings.warn(f"{n_invalid:.0f} of {probs.shape[0]} predictions were not finite (NaN/inf); they are left out "
                      "of the calibration metrics and counted in `n_invalid`", stacklevel=3)
    return state


def calibration_metrics(
    probs: Tensor,
    target: Tensor,
    n_bins: int = 15,
    ci: float | None = None,
    n_boot: int = 1000,
    seed: int | None = 0,
    classwise: bool | None = None,
    ignore_index: int | None = None,
) -> dict[str, float]:
    """Every metric of `CalibrationState.metrics` for one set of predictions, with confidence intervals if `ci`.

    Parameters
    ----------
    probs : Tensor
        (N, C) probabilities: rows of non-negative values summing to 1 within 2% (a ValueError otherwise; pass
        ``logits.softmax(1)``); rows that miss 1 by more than 1e-3 are divided by their sums, with a warning.
        Rows with a NaN or infinite value are left out with a warning and counted in ``n_invalid``.
    target : Tensor
        (N,) or (N, 1) class ids in [0, C), any integer dtype; one out of range is a ValueError.
    n_bins : int
        Equal-width bins ((m-1)/M, m/M] for ECE, MCE, RMSCE, debiased and classwise ECE.
    ci : float, optional
        Confidence level of intervals (``<name>_lo``/``<name>_hi`` keys), e.g. 0.95; None for none.
    n_boot : int
        Bootstrap replicates for the intervals.
    seed : int, optional
        Seed of the bootstrap: the same seed gives the same intervals.
    classwise : bool, optional
        Compute classwise ECE (3 * C * n_bins counters). None: only up to `CLASSWISE_MAX_CLASSES` classes, as
        `CalibrationCallback` does (NaN above).
    ignore_index : int, optional
        Rows whose target equals this are skipped.

    Examples
    --------
    >>> calibration_metrics(torch.tensor([[.9, .1], [.2, .8]]), torch.tensor([0, 0]))['accuracy']
    0.5
    """
    if ci is not None:  # the interval options, before anything is counted
        check_ci(ci, n_boot)
        check_seed(seed)
        check_interval_grid(check_int(n_bins, "n_bins"), N_FINE)
    state = _state_of(probs, target, n_bins, ignore_index, classwise)
    return state.metrics(ci=ci, n_boot=n_boot, seed=seed)


def calibration_error(
    probs: Tensor,
    target: Tensor,
    n_bins: int = 15,
    norm: str = "l1",
    ignore_index: int | None = None,
) -> float:
    """Top-label calibration error over equal-width bins ((m-1)/M, m/M].

    Equals torchmetrics' `multiclass_calibration_error` unless a confidence lies exactly on a bin edge:
    torchmetrics bins [lo, hi) and puts a confidence of exactly 1.0 in an extra bin of its own, where it can set
    the MCE alone; here 1.0 is in the last bin, as in Guo et al. 2017. Input is checked as by
    `calibration_metrics`.

    Parameters
    ----------
    probs : Tensor
        (N, C) probabilities, checked as by `calibration_metrics`.
    target : Tensor
        (N,) or (N, 1) class ids, any integer dtype.
    n_bins : int
        Equal-width bins.
    norm : str
        'l1' (ECE), 'l2' (RMS calibration error) or 'max' (MCE).
    ignore_index : int, optional
        Rows whose target equals this are skipped.

    Examples
    --------
    >>> probs = torch.tensor([[.25, .20, .55], [.55, .05, .40], [.10, .30, .60], [.90, .05, .05]])
    >>> round(calibration_error(probs, torch.tensor([0, 1, 2, 0]), n_bins=3, norm='max'), 4)
    0.2333
    """
    state = _state_of(probs, target, n_bins, ignore_index, classwise=False, n_fine=1)
    return state.mce() if norm == "max" else state.ece(norm)  # 'max', as torchmetrics' `norm` names the MCE
