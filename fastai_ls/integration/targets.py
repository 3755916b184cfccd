"""Whether a learner's targets are class ids, the only targets a `CalibrationCallback` can score: checked once
before a fit, from the loss and one validation item."""

from __future__ import annotations

import numpy as np
import torch
from fastai.learner import Learner
from fastai.torch_core import TensorMultiCategory
from fastai.vision.core import PILBase, PILMask
from torch import nn

from fastai_ls.integration.fastai_compat import inner_loss

__all__ = ["check_class_id_targets"]

# Losses whose targets are not single class ids.
_NOT_CLASS_ID_LOSSES = (nn.BCEWithLogitsLoss, nn.BCELoss, nn.MultiLabelSoftMarginLoss, nn.MultiLabelMarginLoss,
                        nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.KLDivLoss, nn.GaussianNLLLoss,
                        nn.PoissonNLLLoss)


def check_class_id_targets(learn: Learner) -> None:
    """Raise a ValueError if the learner's targets are clearly not class ids.

    Refused: a multi-label or regression loss (`BCEWithLogitsLossFlat`, `MSELossFlat`...), and a first validation
    item whose target is multi-label (`TensorMultiCategory`), floating point, boolean, or an image other than a mask
    (image-to-image regression). Accepted: integer class ids, one per item or dense (`PILMask` from `MaskBlock` and
    `SegmentationDataLoaders`, token ids). A target this cannot judge before batching is left to the check that
    every validation batch gets (integer dtype, one target per prediction row).

    Parameters
    ----------
    learn : Learner
        The learner; its `loss_func` and the last element of `dls.valid_ds[0]` (item transforms not yet applied) are
        read, nothing is changed.

    Examples
    --------
    >>> check_class_id_targets(unet_learner(dls, resnet18, pretrained=False))  # masks pass  # doctest: +SKIP
    """
    inner = inner_loss(learn.loss_func)
    if isinstance(inner, _NOT_CLASS_ID_LOSSES):
        raise ValueError(f"CalibrationCallback needs single-label classification; the loss {type(inner).__name__} "
                         "is for multi-label or regression targets")
    try:  # one item of the validation set, without its batch transforms; skipped for datasets that cannot do it
        target = learn.dls.valid_ds[0][-1]
    except Exception:
        return
    problem = _not_class_ids(target)
    if problem:
        raise ValueError(f"CalibrationCallback needs integer class-id targets; the validation set yields "
                         f"{type(target).__name__} targets ({problem})")


def _not_class_ids(target: object) -> str | None:
    """Why one dataset target is certainly not class ids, or None (class ids, or a type only its batch can tell)."""
    if isinstance(target, TensorMultiCategory):
        return "multi-label: use a single-label loss and CategoryBlock"
    if isinstance(target, PILMask):  # a segmentation mask: one class id per pixel
        return None
    if isinstance(target, PILBase):
        return "an image is a regression target"
    dtype = getattr(target, "dtype", None)  # tensors, NumPy arrays and scalars
    if isinstance(dtype, torch.dtype):
        kind = "b" if dtype == torch.bool else "f" if dtype.is_floating_point or dtype.is_complex else "i"
    elif isinstance(dtype, np.dtype):
        kind = dtype.kind
    else:
        kind = "b" if isinstance(target, bool) else "f" if isinstance(target, (float, complex)) else "i"
    if kind == "b":
        return "booleans: make them class ids, e.g. with CategoryBlock"
    return "regression or soft labels?" if kind in "fc" else None
