"""Calibration metrics of predictions held in memory: one call, one `CalibrationState` behind it.

The functions check their input the way `CalibrationCallback` does, before anything is counted: probabilities
must be (N, C) rows that sum to 1 (logits are refused, not silently scored), a target out of range is an error,
and rows with a NaN or infinite probability are left out with a warning and counted in `n_invalid`.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from fastai_ls.calibration.intervals import check_ci, check_interval_grid, check_seed
from fastai_ls.calibration.state import CLASSWISE_MAX_CLASSES, N_FINE, CalibrationState, check_n_bins

__all__ = ["calibration_error", "calibration_metrics", "check_probabilities"]


def _tolerance(dtype: torch.dtype) -> float:
    """How far from 1 a row of softmax output in `dtype` may sum: 1e-3, or 8 units in the last place of 1."""
    return max(1e-3, 8 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-3


def check_probabilities(probs: Tensor, target: Tensor, name: str = "probs",
                        ignore_index: int | None = None) -> None:
    """A ValueError unless `probs` is (N, C) with rows of probabilities (each in [0, 1], summing to 1 within the
    dtype's rounding; non-finite rows are left to the caller) and `target` holds N class ids in [0, C)
    (or `ignore_index`).

    Parameters
    ----------
    probs : Tensor
        (N, C) class probabilities.
    target : Tensor
        (N,) integer class ids.
    name : str
        What to call `probs` in the error message.
    ignore_index : int, optional
        A target value that marks rows to skip; it need not be a class id.

    >>> check_probabilities(torch.tensor([[2.0, -1.0]]), torch.tensor([0]))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: probs must hold probabilities (rows in [0, 1] that sum to 1 within 0.001), but the values range...
    """
    if not isinstance(probs, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{name} and target must be tensors, got {type(probs).__name__} and {type(target).__name__}")
    if probs.dim() != 2 or probs.shape[1] == 0:
        hint = " (for binary positive-class probabilities p pass torch.stack([1 - p, p], 1))" \
            if probs.dim() == 1 else ""
        raise ValueError(f"{name} must be (N, C) class probabilities with C >= 1, got shape {tuple(probs.shape)}"
                         f"{hint}")
    if not probs.is_floating_point():
        raise ValueError(f"{name} must be floating point probabilities, got {probs.dtype}")
    if target.dim() != 1 or target.shape[0] != probs.shape[0] or target.is_floating_point() \
            or target.dtype == torch.bool or target.is_complex():
        raise ValueError(f"target must hold {probs.shape[0]} integer class ids, got {target.dtype} "
                         f"{tuple(target.shape)}")
    rows = probs.detach()
    finite = rows.isfinite().all(1)
    if bool(finite.any()):
        valid = rows[finite].double()
        sums = valid.sum(1)
        tol = _tolerance(probs.dtype)
        if float(valid.min()) < -tol or float(valid.max()) > 1 + tol or float((sums - 1).abs().max()) > tol:
            # Enough digits to show what is wrong: a row summing to 1.002 must not read as "1".
            raise ValueError(
                f"{name} must hold probabilities (rows in [0, 1] that sum to 1 within {tol:.2g}), but the values "
                f"range over [{float(valid.min()):.6g}, {float(valid.max()):.6g}] and row sums over "
                f"[{float(sums.min()):.6g}, {float(sums.max()):.6g}]; for logits pass `logits.softmax(1)`")
    listed = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    bad = listed & ((target < 0) | (target >= probs.shape[1]))
    if bool(bad.any()):
        raise ValueError(f"{int(bad.sum())} targets are not class ids in [0, {probs.shape[1]}) (e.g. "
                         f"{int(target[bad][0])})")


def _state_of(probs: Tensor, target: Tensor, n_bins: int, ignore_index: int | None, classwise: bool | None,
              **kwargs) -> CalibrationState:
    check_n_bins(n_bins)
    check_probabilities(probs, target, ignore_index=ignore_index)
    if classwise is None:
        classwise = probs.shape[1] <= CLASSWISE_MAX_CLASSES
    state = CalibrationState(probs.shape[1], n_bins, device=probs.device, classwise=classwise, **kwargs)
    state.update(probs, target, ignore_index=ignore_index)
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
        (N, C) probabilities: rows in [0, 1] summing to 1 (a ValueError otherwise; pass ``logits.softmax(1)``).
        Rows with a NaN or infinite value are left out with a warning and counted in ``n_invalid``.
    target : Tensor
        (N,) class ids in [0, C), any integer dtype; one out of range is a ValueError.
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

    >>> calibration_metrics(torch.tensor([[.9, .1], [.2, .8]]), torch.tensor([0, 0]))['accuracy']
    0.5
    """
    if ci is not None:  # the interval options, before anything is counted
        check_ci(ci, n_boot)
        check_seed(seed)
        check_interval_grid(check_n_bins(n_bins), N_FINE)
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
        (N, C) probabilities (rows in [0, 1] summing to 1).
    target : Tensor
        (N,) class ids.
    n_bins : int
        Equal-width bins.
    norm : str
        'l1' (ECE), 'l2' (RMS calibration error) or 'max' (MCE).
    ignore_index : int, optional
        Rows whose target equals this are skipped.

    >>> probs = torch.tensor([[.25, .20, .55], [.55, .05, .40], [.10, .30, .60], [.90, .05, .05]])
    >>> round(calibration_error(probs, torch.tensor([0, 1, 2, 0]), n_bins=3, norm='max'), 4)
    0.2333
    """
    state = _state_of(probs, target, n_bins, ignore_index, classwise=False, n_fine=1)
    return state.ece(norm)
