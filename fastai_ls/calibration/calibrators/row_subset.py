"""A subset of the rows of (N, C) logits, read a block at a time, for fits on most of a large input without a copy
of it (the folds of a cross-fitted comparison)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RowSubset", "checked_rows"]


class RowSubset:
    """The rows `rows` of (N, C) `logits`, read a block at a time: `subset[i:j]` (or an index tensor) copies those
    rows only. A calibrator that upcasts in blocks (`Calibrator.upcasts_in_blocks`) fits on one when `fit` is given
    `rows`, so that fitting on most of a large input holds no copy of it.

    Parameters
    ----------
    logits : Tensor
        (N, C) logits, never written.
    rows : Tensor
        (M,) int64 indices of the rows, on the logits' device.

    Examples
    --------
    >>> subset = RowSubset(torch.arange(8.0).view(4, 2), torch.tensor([3, 1]))
    >>> subset.shape, subset[0:1].tolist()
    ((2, 2), [[6.0, 7.0]])
    """

    def __init__(self, logits: Tensor, rows: Tensor):
        """The view; see the class docstring."""
        self.logits, self.rows = logits, rows

    @property
    def shape(self) -> tuple[int, int]:
        """(M, C)."""
        return len(self.rows), self.logits.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """The logits' dtype."""
        return self.logits.dtype

    @property
    def device(self) -> torch.device:
        """The logits' device."""
        return self.logits.device

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: slice | Tensor) -> Tensor:
        return self.logits[self.rows[index]]


def checked_rows(rows: Tensor, n: int, device: torch.device) -> Tensor:
    """`rows` as int64 indices on `device`, or a ValueError unless it is a 1-D integer tensor of indices in [0, n)."""
    if not isinstance(rows, Tensor) or rows.dim() != 1 or rows.is_floating_point() or rows.is_complex() \
            or rows.dtype == torch.bool:
        got = f"{rows.dtype} {tuple(rows.shape)}" if isinstance(rows, Tensor) else type(rows).__name__
        raise ValueError(f"rows must be a 1-D tensor of integer row indices, got {got}")
    rows = rows.to(device, torch.long)
    if len(rows) and not (0 <= int(rows.min()) and int(rows.max()) < n):
        raise ValueError(f"rows must index the {n} rows of logits, got indices from {int(rows.min())} to "
                         f"{int(rows.max())}")
    return rows
