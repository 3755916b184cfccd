"""The calibration-loss family under hostile input: every path of a loss (fused on class ids, torch operations for
probability targets, z-losses, smoothing and AdaFocal) reports the same thing for the same input, including where
the input has no finite answer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastai_ls import (
    AdaFocalLoss,
    AdaptiveFocalLoss,
    ConfidencePenaltyLoss,
    FocalLoss,
    LabelSmoothingCrossEntropy,
    LogitNormLoss,
    MarginLabelSmoothing,
    MaxSupLoss,
)

CLASSES = [FocalLoss, AdaptiveFocalLoss, AdaFocalLoss, MarginLabelSmoothing, MaxSupLoss, LogitNormLoss,
           ConfidencePenaltyLoss]


def minus_inf_on_the_true_class(dtype=torch.float64):
    x = torch.randn(3, 4, dtype=dtype, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2])
    x[0, 0] = -math.inf
    return x, y


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_infinite_row_loss_is_nan_on_every_path_as_for_label_smoothing(cls, dtype):
    # p_y = 0: the row's loss is +inf, which the label-smoothing loss and the fused kernels report as NaN. The torch
    # path (probability targets, z-losses, smoothing, AdaFocal) reported +inf for the same row.
    x, y = minus_inf_on_the_true_class(dtype)
    assert math.isnan(LabelSmoothingCrossEntropy(eps=0.0, reduction="none")(x, y)[0].item())
    for target in (y, F.one_hot(y, 4).to(dtype)):
        for module in (cls(reduction="none"), cls(reduction="none", z_loss=1e-3)):
            loss = module(x, target)
            assert math.isnan(loss[0].item()), (module, target.dtype, loss)
            assert loss[1:].isfinite().all()
    assert math.isnan(FocalLoss(eps=0.1)(x, y).item())
