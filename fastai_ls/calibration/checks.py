"""What every calibration entry point accepts as predictions and class ids: the functions, `CalibrationState.update`,
and the `fastai-ls calibrate` command check their input here, so that all of them take the same rows with one
tolerance.

Probabilities are rows of non-negative values summing to 1. Rounding makes real ones miss 1 a little: float32 and
float16 softmax outputs by less than `SUM_ROUNDING` (1e-3), bfloat16 ones by about 3e-3, probabilities saved with
a few decimals (a CSV export, torchmetrics' own test inputs) by up to 1%. Rows within `SUM_TOLERANCE` (2%) of 1 are
accepted; where one misses by more than `SUM_ROUNDING`, every row is divided by its sum, with one warning giving
the largest miss. Beyond `SUM_TOLERANCE` a row is not a probability distribution (logits, scores, one class's
column) and the input is refused. The tolerance is of the values as written: a row of three 0.34s sums to 1.02,
whatever the dtype's rounding of 0.34 makes of its sum.
"""

from __future__ import annotations

import numbers
import warnings

import torch
from torch import Tensor

from fastai_ls.validation import upcast

__all__ = ["SUM_TOLERANCE", "SUM_ROUNDING", "checked_probabilities", "class_ids", "check_class_ids",
           "checked_ignore_index"]

# How far from 1 a row of probabilities may sum; beyond it the input is refused.
SUM_TOLERANCE = 0.02
# Rows that miss 1 by no more than this are used as they are; rows that miss by more are renormalised, with a
# warning. float32 softmax outputs miss by 4e-5 at 500,000 classes, float16 ones by 5e-4.
SUM_ROUNDING = 1e-3
_LOGITS_HINT = "for logits pass `logits.softmax(1)`"
# What a uint64 class id beyond int64's range becomes (`class_ids`).
_BEYOND_INT64 = torch.iinfo(torch.int64).max


def checked_probabilities(probs: Tensor, name: str = "probs", hint: str = _LOGITS_HINT,
                          stacklevel: int = 2) -> Tensor:
    """`probs`, renormalised if its rows miss 1 by more than `SUM_ROUNDING`, after a ValueError unless it is (N, C)
    floating point rows of non-negative values summing to 1 within `SUM_TOLERANCE`. Rows holding a NaN or an
    infinity are left to the caller, as they are. Reads the values: a host synchronisation on a GPU.

    Parameters
    ----------
    probs : Tensor
        (N, C) class probabilities.
    name : str
        What to call `probs` in messages.
    hint : str
        What the error message tells the user to do instead.
    stacklevel : int
        Where the renormalisation warning points: 2 is the caller of this function.

    Returns
    -------
    Tensor
        `probs` itself (not a copy) when no row needs renormalising, else the rows divided by their sums, in
        float32 (float64 for float64 input). The caller's tensor is never changed.

    Examples
    --------
    >>> checked_probabilities(torch.tensor([[2.0, -1.0]]))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: probs must hold probabilities in [0, 1], but 1 of 1 rows do not (first: row 0, values from -1 to 2)...
    >>> p = torch.tensor([[0.7, 0.3]])
    >>> checked_probabilities(p) is p
    True
    """
    if not isinstance(probs, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(probs).__name__}")
    if probs.dim() != 2 or probs.shape[1] == 0:
        hint_1d = " (for binary positive-class probabilities p pass torch.stack([1 - p, p], 1))" \
            if probs.dim() == 1 else ""
        raise ValueError(f"{name} must be (N, C) class probabilities with C >= 1, got shape {tuple(probs.shape)}"
                         f"{hint_1d}")
    if not probs.is_floating_point():
        raise ValueError(f"{name} must be floating point probabilities, got {probs.dtype}")
    rows = probs.detach()
    finite = rows.isfinite().all(1)
    sums = rows.sum(1, dtype=torch.float64)  # accumulated in float64 without a float64 copy of the rows
    miss = torch.where(finite, (sums - 1).abs(), 0.0)
    negative = finite & (rows.amin(1) < 0)
    if bool(negative.any()):
        i = int(negative.nonzero()[0, 0])
        raise ValueError(f"{name} must hold probabilities in [0, 1], but {int(negative.sum())} of {len(rows)} rows "
                         f"do not (first: row {i}, values from {float(rows[i].min()):.6g} to "
                         f"{float(rows[i].max()):.6g}); {hint}")
    # The sum of the values as stored may miss that of the values as written by their rounding to the dtype, at most
    # half its epsilon per unit of the sum (and the float64 sum's own rounding): without this slack a row of three
    # 0.34s was accepted in float32 and refused in float64 and float16.
    slack = max(torch.finfo(rows.dtype).eps / 2, 1e-12) * (1 + SUM_TOLERANCE)
    off = miss > SUM_TOLERANCE + slack
    if bool(off.any()):
        i = int(off.nonzero()[0, 0])
        # Enough digits to show what is wrong: a row summing to 1.0205 must not read as "1".
        raise ValueError(f"{name} must hold probabilities, rows summing to 1 within {SUM_TOLERANCE:g}, but "
                         f"{int(off.sum())} of {len(rows)} rows do not (first: row {i} sums to {float(sums[i]):.6g}); "
                         f"{hint}")
    worst = float(miss.max()) if len(rows) else 0.0
    if worst <= SUM_ROUNDING:
        return probs
    n_off = int((miss > SUM_ROUNDING).sum())
    warnings.warn(f"{name}: {n_off} of {len(rows)} rows miss a sum of 1 by up to {worst:.2g} (rounding, e.g. of "
                  f"half-precision or printed probabilities; accepted up to {SUM_TOLERANCE:g}): every row was "
                  "divided by its sum", stacklevel=stacklevel)
    rows = upcast(rows)
    return rows / torch.where(finite, sums, 1.0).to(rows.dtype)[:, None]


def class_ids(target: Tensor, n_rows: int, name: str = "probs") -> Tensor:
    """`target` as (N,) int64 class ids, from (N,) or (N, 1) integers of any dtype (fastai's tabular targets are
    (N, 1)); a ValueError that says what to pass otherwise. Reads shapes and dtypes only, never values.

    Parameters
    ----------
    target : Tensor
        The class ids.
    n_rows : int
        N, the rows of the predictions.
    name : str
        What to call the predictions in messages.

    Examples
    --------
    >>> class_ids(torch.tensor([[2], [0]], dtype=torch.int8), 2)
    tensor([2, 0])
    """
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a tensor, got {type(target).__name__}")
    shape = tuple(target.shape)
    one_hot = len(shape) == 2 and shape[0] == n_rows and shape[1] > 1
    if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
        what = "for one-hot or soft targets pass target.argmax(1)" if one_hot else \
            "pass target.long() if they hold whole numbers"
        raise ValueError(f"target must hold {n_rows} integer class ids, got {target.dtype} {shape}: {what}")
    if shape not in ((n_rows,), (n_rows, 1)):
        what = "one-hot targets? pass target.argmax(1)" if one_hot else \
            "pass target.reshape(-1)" if target.numel() == n_rows else f"one per row of {name}"
        raise ValueError(f"target must hold {n_rows} integer class ids, shape ({n_rows},) or ({n_rows}, 1), got "
                         f"{target.dtype} {shape}: {what}")
    # int64 for every integer dtype: gather takes no other, and uint16/32/64 have no comparison kernels on the CPU.
    ids = target.reshape(-1).long()
    if target.dtype == torch.uint64:
        # uint64 values from 2**63 on wrap around to negative int64s, where an ignore_index of -100 would skip
        # 2**64 - 100 silently: they become int64's largest value, which is out of range for any C.
        ids = torch.where(ids < 0, _BEYOND_INT64, ids)
    return ids


def checked_ignore_index(ignore_index: int | None) -> int | None:
    """`ignore_index` as a Python int (None stays None), after a ValueError unless it is an integer that an int64
    class id can equal: a bool or a float would match ids silently (True is class 1), and one beyond int64 was an
    OverflowError from the comparison.

    >>> checked_ignore_index(-100)
    -100
    >>> checked_ignore_index(1.5)
    Traceback (most recent call last):
    ValueError: ignore_index must be an int (a target value that marks rows to skip), got 1.5
    """
    if ignore_index is None:
        return None
    if isinstance(ignore_index, Tensor) and ignore_index.dim() == 0 and not ignore_index.is_floating_point() \
            and not ignore_index.is_complex() and ignore_index.dtype != torch.bool:
        ignore_index = int(ignore_index)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise ValueError(f"ignore_index must be an int (a target value that marks rows to skip), got {ignore_index!r}")
    info = torch.iinfo(torch.int64)
    if not info.min <= ignore_index <= info.max:
        raise ValueError(f"ignore_index must be an int64 value, in [-2**63, 2**63), got {ignore_index}")
    return int(ignore_index)


def check_class_ids(target: Tensor, n_classes: int, ignore_index: int | None = None) -> None:
    """A ValueError unless every value of the (N,) int64 `target` is a class id in [0, `n_classes`) or
    `ignore_index`. Reads the values: a host synchronisation on a GPU.

    Parameters
    ----------
    target : Tensor
        (N,) int64 class ids (`class_ids`).
    n_classes : int
        C.
    ignore_index : int, optional
        A target value that marks rows to skip; it need not be a class id.

    Examples
    --------
    >>> check_class_ids(torch.tensor([0, 3]), 3)
    Traceback (most recent call last):
    ValueError: 1 targets are not class ids in [0, 3) (e.g. 3)
    """
    ignore_index = checked_ignore_index(ignore_index)
    listed = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    bad = listed & ((target < 0) | (target >= n_classes))
    if bool(bad.any()):
        first = int(target[bad][0])
        raise ValueError(f"{int(bad.sum())} targets are not class ids in [0, {n_classes}) (e.g. "
                         f"{'one >= 2**63 - 1' if first == _BEYOND_INT64 else first})")
