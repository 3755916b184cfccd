"""What one batch adds to a `CalibrationState`: its input checks and the per-row sums, top-label cells and weights,
computed as a fixed sequence of kernels whatever the values (nothing here waits for the device)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fastai_ls.calibration.checks import checked_probabilities
from fastai_ls.calibration.scores import NLL_FLOOR, row_scores
from fastai_ls.validation import check_class_ids, checked_ignore_index, upcast

__all__ = ["SCALAR_NAMES", "NLL_FLOOR", "checked_batch", "batch_sums", "bin_of"]

# Running sums; the squares give NLL's and Brier's standard errors, and the sum of squared row weights the
# effective number of rows of weighted data (Kish), which scales the intervals.
SCALAR_NAMES = ("n", "confidence", "correct", "nll", "brier", "n_invalid", "n_bad_target", "nll_sq", "brier_sq",
                "weight_sq")
_LOGITS_HINT = "for logits pass `activation=lambda z: z.softmax(1)` (or `logits.softmax(1)`)"


def checked_weight(weight: Tensor, n_rows: int, check_values: bool) -> Tensor:
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


def bin_of(x: Tensor, n_bins: int) -> Tensor:
    """Index of the bin ((m-1)/M, m/M] holding each float64 value of `x` (0 for x = 0, M - 1 for x >= 1).

    Computed rather than `bucketize`d: that CPU kernel goes multi-threaded on a few hundred values and then waits for
    busy cores. A float32 value times M is exact in float64, so the edges are exactly m/M."""
    return (x * n_bins).ceil_().long().sub_(1).clamp_(0, n_bins - 1)


def checked_batch(preds: Tensor, target: Tensor, weight: Tensor | None, activation: Callable[[Tensor], Tensor] | None,
                  ignore_index: int | None, check: bool, n_classes: int,
                  device: torch.device) -> tuple[Tensor, Tensor, Tensor | None, int | None]:
    """(probs, target, weight, ignore_index) of a batch, checked as `CalibrationState.update` says: the probabilities
    detached, upcast and on `device`, the targets as int64 ids there; shapes and dtypes are checked also without
    `check`, values only with it."""
    if not isinstance(preds, Tensor):
        raise TypeError(f"preds must be a tensor, got {type(preds).__name__}")
    if preds.dim() != 2 or preds.shape[1] != n_classes:
        raise ValueError(f"preds must be (N, {n_classes}), got {tuple(preds.shape)}")
    target = check_class_ids(target, preds.shape[0], rows="preds")
    ignore_index = checked_ignore_index(ignore_index)
    if weight is not None:
        weight = checked_weight(weight, preds.shape[0], check)
    preds = preds.detach()  # a graph would keep every batch's activations alive through the counters
    probs = activation(preds) if activation is not None else preds
    name = "preds" if activation is None else "activation(preds)"
    if not isinstance(probs, Tensor) or probs.shape != preds.shape:
        got = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(f"{name} must be a tensor of preds' shape {tuple(preds.shape)}, one row of class "
                         f"probabilities per row of preds, got {got}")
    if not probs.is_floating_point():
        raise ValueError(f"{name} must be floating point probabilities, got {probs.dtype}")
    if check:  # stacklevel 4: the warning points at the caller of `CalibrationState.update`
        probs = checked_probabilities(probs, name, _LOGITS_HINT, stacklevel=4)
    elif probs.dtype == torch.bfloat16:
        # bfloat16 softmax outputs (a bfloat16 model's) miss 1 by up to about 3e-3, and the check divides them
        # by their sums: unchecked, so is every bfloat16 row, without reading a value (and so without the check's
        # warning). Other dtypes' softmax outputs miss by less than SUM_ROUNDING and are taken as they are.
        probs = upcast(probs)
        sums = probs.sum(1, keepdim=True)
        probs = probs / torch.where(sums > 0, sums, 1.0)
    probs = upcast(probs)
    probs = probs if probs.device == device else probs.to(device)
    target = target if target.device == device else target.to(device)
    return probs, target, weight, ignore_index


def batch_sums(probs: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int | None, n_bins: int,
               n_fine: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """What a checked batch (`checked_batch`) adds: (scalars, cells, counters, p, y, keep) with the weighted sums in
    the order of SCALAR_NAMES, each counted row's cell on the coarse and on the fine grid (the fine cells offset by
    `n_bins`: the two histograms sit side by side) and its (count, confidence, correct), the probabilities with
    invalid rows zeroed, the (N, 1) ids with bad ones at 0, and each row's weight (0 for rows not counted)."""
    n_classes, device, f64 = probs.shape[1], probs.device, torch.float64
    # Row flags. Every step below is a fixed sequence of kernels whatever the values: nothing waits for the device.
    finite = probs.isfinite().all(1)
    in_range = (target >= 0) & (target < n_classes)
    if ignore_index is None:
        invalid, bad_target, counted = ~finite, ~in_range, finite & in_range
    else:
        listed = target != ignore_index
        invalid, bad_target, counted = listed & ~finite, listed & ~in_range, listed & finite & in_range
    keep = counted.to(f64) if weight is None else weight.to(device, f64) * counted  # each row's weight below
    p = torch.where(finite[:, None], probs, 0.0)  # 0 * NaN would still be NaN
    y = torch.where(in_range, target, 0)

    # Probabilities do not carry the logits' range: the NLL of a true-class probability that underflowed to 0 is
    # capped (NLL_FLOOR), at the same 87.3 nats in every dtype.
    scores = row_scores(p, y)
    conf = scores["confidence"]
    per_row = torch.stack([torch.ones_like(conf), *scores.values()], 1).to(f64)
    flags = torch.stack([invalid, bad_target], 1).to(f64)
    if weight is not None:
        flags = flags * weight.to(device, f64)[:, None]
    squares = torch.cat([per_row[:, 3:], keep[:, None]], 1)  # nll, brier and the weight, to be squared
    squares = squares * squares
    squares[:, :2] *= keep[:, None]  # nll^2 and brier^2 weighted; weight^2 as it is
    scalars = torch.cat([per_row * keep[:, None], flags, squares], 1).sum(0)
    conf64 = conf.to(f64)
    cells = torch.stack([bin_of(conf64, n_bins), bin_of(conf64, n_fine) + n_bins], 1)
    counters = per_row[:, :3] * keep[:, None]  # count, confidence, correct
    return scalars, cells, counters, p, y, keep
