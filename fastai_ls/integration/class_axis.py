"""Predictions of a fastai learner as rows: (rows, C) class scores on the loss's class axis, (rows,) class ids."""

from __future__ import annotations

from torch import Tensor

from fastai_ls.validation import is_class_id_dtype, plain

__all__ = ["class_axis_of", "class_rows", "probability_rows"]


def class_axis_of(loss_func: object, ndim: int) -> int:
    """The class axis of `ndim`-dimensional predictions for `loss_func`.

    Parameters
    ----------
    loss_func : object
        The learner's loss; its `class_axis` (fastai_ls's losses) or `axis` (fastai's flattened losses) is read, 1 if
        it has neither.
    ndim : int
        The predictions' number of dimensions; (N, C) predictions (`ndim` <= 2) always have their classes on axis 1.

    Examples
    --------
    >>> from fastai.losses import CrossEntropyLossFlat
    >>> class_axis_of(CrossEntropyLossFlat(axis=-1), 3), class_axis_of(CrossEntropyLossFlat(axis=-1), 2)
    (-1, 1)
    """
    if ndim <= 2:
        return 1
    return getattr(loss_func, "class_axis", getattr(loss_func, "axis", 1))


def class_rows(pred: Tensor, target: Tensor, loss_func: object = None) -> tuple[Tensor, Tensor]:
    """(rows, C) predictions and (rows,) class ids: one row per position of dense predictions.

    Shapes only, never values, so no host synchronisation. A ValueError if the targets do not hold one class id per
    prediction row.

    Parameters
    ----------
    pred : Tensor
        (N, C) or dense (N, C, d1, ...) predictions, or, per `loss_func`'s class axis, (N, d1, ..., C).
    target : Tensor
        The class ids: (N,), or (N, d1, ...) for dense predictions (segmentation masks, token ids).
    loss_func : object, optional
        The learner's loss, for its class axis (`class_axis_of`); None: axis 1.

    Examples
    --------
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


def probability_rows(pred: Tensor, target: Tensor, loss_func: object) -> tuple[Tensor, Tensor, int]:
    """(rows, C) probabilities and (rows,) class ids of one batch, and the rows per item (> 1 for dense (N, C, d1,
    ...) predictions), as `CalibrationCallback` scores them. The probabilities are the loss's `activation` of the
    predictions (a calibrator's, once applied); a loss without one is taken for cross-entropy on logits.

    Shapes and dtypes only, never values, so no host synchronisation. A TypeError or ValueError, naming the
    callback, for anything but one prediction tensor and one tensor of class ids per prediction row.

    Parameters
    ----------
    pred : Tensor
        The model's output for the batch.
    target : Tensor
        The batch's targets.
    loss_func : object
        The learner's loss: its activation and class axis.

    Examples
    --------
    >>> import torch
    >>> probs, ids, per_item = probability_rows(torch.zeros(2, 5, 7), torch.zeros(2, 7, dtype=torch.long), None)
    >>> tuple(probs.shape), float(probs[0].sum()), per_item
    ((14, 5), 1.0, 7)
    """
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        raise TypeError("CalibrationCallback needs one prediction tensor and one target tensor per batch")
    if not is_class_id_dtype(target.dtype):
        raise ValueError(f"CalibrationCallback needs integer class-id targets, got {target.dtype} "
                         "(multi-label, soft or regression targets have no top-label calibration)")
    # Plain tensors: fastai's subclasses (TensorCategory, TensorImage...) cost a Python dispatch on every op.
    pred = plain(pred)
    activation = getattr(loss_func, "activation", None)
    probs = activation(pred) if callable(activation) else pred.float().softmax(class_axis_of(loss_func, pred.dim()))
    try:
        probs, target = class_rows(probs, target, loss_func)
    except ValueError as e:
        raise ValueError(f"CalibrationCallback {e}") from None
    return probs, target, probs.shape[0] // max(pred.shape[0], 1)
