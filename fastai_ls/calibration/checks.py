"""What every calibration entry point accepts as probabilities: the functions, `CalibrationState.update`, and the
`fastai-ls calibrate` command check them here, so that all of them take the same rows with one tolerance (the class
ids beside them: `fastai_ls.validation.check_class_ids`).

Probabilities are rows of non-negative values summing to 1. Rounding makes real ones miss 1 a little: float32 and
float16 softmax outputs by less than `SUM_ROUNDING` (1e-3), bfloat16 ones by about 3e-3, probabilities saved with
a few decimals (a CSV export, torchmetrics' own test inputs) by up to 1%. Rows within `SUM_TOLERANCE` (2%) of 1 are
accepted; where one misses by more than `SUM_ROUNDING`, every row is divided by its sum, with one warning giving
the largest miss. Beyond `SUM_TOLERANCE` a row is not a probability distribution (logits, scores, one class's
column) and the input is refused. The tolerance is of the values as written: a row of three 0.34s sums to 1.02,
whatever the dtype's rounding of 0.34 makes of its sum.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from fastai_ls.validation import upcast

__all__ = ["SUM_TOLERANCE", "SUM_ROUNDING", "checked_probabilities"]

# How far from 1 a row of probabilities may sum; beyond it the input is refused.
SUM_TOLERANCE = 0.02
# Rows that miss 1 by no more than this are used as they are; rows that miss by more are renormalised, with a
# warning. float32 softmax outputs miss by 4e-5 at 500,000 classes, float16 ones by 5e-4.
SUM_ROUNDING = 1e-3
_LOGITS_HINT = "for logits pass `logits.softmax(1)`"


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

