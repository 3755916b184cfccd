"""Predictions of a fastai learner as rows: (rows, C) class scores on the loss's class axis, (rows,) class ids."""

from __future__ import annotations

from torch import Tensor

from fastai_ls.tensor_input import plain

__all__ = ["class_axis_of", "class_rows"]


def class_axis_of(loss_func: object, ndim: int) -> int:
    """The class axis of `ndim`-dimensional predictions for `loss_func`: its `class_axis` (or fastai's `axis`), and
    always 1 for (N, C) predictions."""
    if ndim <= 2:
        return 1
    return getattr(loss_func, "class_axis", getattr(loss_func, "axis", 1))


def class_rows(pred: Tensor, target: Tensor, loss_func: object = None) -> tuple[Tensor, Tensor]:
    """(rows, C) predictions and (rows,) class ids from (N, C, ...) or, per `loss_func`'s class axis, (N, ..., C)
    predictions and their (N, ...) targets: one row per position. Shapes only, so no host synchronisation.

    >>> import torch
    >>> [tuple(t.shape) for t in class_rows(torch.zeros(2, 5, 7), torch.zeros(2, 7, dtype=torch.long))]
    [(14, 5), (14,)]
    """
    pred, target = plain(pred), plain(target)
    axis = class_axis_of(loss_func, pred.dim())
    n_classes = pred.shape[axis]
    rows = pred.movedim(axis, -1).reshape(-1, n_classes)
    if target.numel() != rows.shape[0]:
        raise ValueError(f"need one class id per prediction row: predictions {tuple(pred.shape)} (classes on axis "
                         f"{axis}), targets {tuple(target.shape)}")
    return rows, target.reshape(-1)
