"""The calibration-loss family on a CUDA device (skipped without one): the same loss and gradient as on the CPU,
and a number of host synchronizations that does not grow with the batch (the argument checks' one read, never one
per row)."""

from __future__ import annotations

import warnings

import pytest
import torch

from fastai_ls import (
    AdaFocalLoss,
    AdaptiveFocalLoss,
    ConfidencePenaltyLoss,
    FocalLoss,
    LogitNormLoss,
    MarginLabelSmoothing,
    MaxSupLoss,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CLASSES = [FocalLoss, AdaptiveFocalLoss, AdaFocalLoss, MarginLabelSmoothing, MaxSupLoss, LogitNormLoss,
           ConfidencePenaltyLoss]


def case(n_rows, n_classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, n_classes, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, n_classes, (n_rows,), generator=g)
    y[::7] = -100
    return x, y, torch.rand(n_classes, generator=g, dtype=torch.float64) + 0.1


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_loss_and_gradient_equal_the_cpu_ones(cls, reduction):
    x, y, w = case(64)
    results = []
    for device in ("cpu", "cuda"):
        xd = x.to(device).requires_grad_()
        loss = cls(weight=w, reduction=reduction).to(device)(xd, y.to(device))
        (grad,) = torch.autograd.grad(loss.sum(), xd)
        results.append((loss.cpu(), grad.cpu()))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-10)


def synchronizations(cls, n_rows):
    x, y, w = case(n_rows)
    module = cls(weight=w).cuda()
    x, y = x.cuda().requires_grad_(), y.cuda()
    module(x, y).backward()  # warm up: lazy initialisation may synchronize once
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            module(x, y).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return len([c for c in caught if "synchroniz" in str(c.message).lower()])


@pytest.mark.parametrize("cls", CLASSES)
def test_cuda_synchronizations_do_not_grow_with_the_batch(cls):
    few = synchronizations(cls, 8)
    assert few <= 2
    assert synchronizations(cls, 4096) == few
