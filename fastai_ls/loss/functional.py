"""`label_smoothing_cross_entropy`, the functional core: checks the arguments, then takes the reference path
(`formula.py`) or the fused one (`fused.py`)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastai_ls.loss.formula import (
    check_input,
    check_options,
    check_target,
    check_weight,
    reference_cross_entropy,
    uniform_eps,
)
from fastai_ls.loss.fused import fused_cross_entropy
from fastai_ls.tensor_input import plain

__all__ = ["label_smoothing_cross_entropy"]


def label_smoothing_cross_entropy(
    input: Tensor,  # logits, (N, C) or (N, C, d1, ..., dk): class axis 1, as in PyTorch
    target: Tensor,  # class ids (N,) / (N, d1, ...), or probabilities with the input's shape
    eps: float = 0.1,  # smoothing: the share of target mass spread over the classes
    weight: Tensor | None = None,  # per-class weights, PyTorch's convention (see README)
    reduction: str = "mean",  # 'mean', 'sum' or 'none'
    ignore_index: int = -100,  # integer targets equal to this contribute nothing
    smoothing: str = "uniform",  # 'uniform': eps/C on every class; 'others': eps/(C-1) on the wrong ones
    *,
    fused: bool | None = None,  # integer targets: gradient computed in forward (`fused.py`); None: when grad is taken
) -> Tensor:
    """Cross-entropy against label-smoothed targets; equals `F.cross_entropy(..., label_smoothing=eps)` for
    `smoothing='uniform'`. Half-precision logits are computed in float32 and the loss is float32.

    >>> x, y = torch.tensor([[1., 8., 1.], [1., 1., 8.]]), torch.tensor([1, 2])
    >>> round(label_smoothing_cross_entropy(x, y, eps=0.05).item(), 4)
    0.2352
    >>> round(label_smoothing_cross_entropy(x, y, eps=0.05, smoothing='others').item(), 4)
    0.3518
    """
    check_options(eps, reduction, smoothing, ignore_index)
    check_input(input)
    input = plain(input)
    target = plain(target) if isinstance(target, Tensor) else target
    n_classes = input.shape[1]
    check_weight(weight, n_classes)
    check_target(input, target, ignore_index)
    eps = uniform_eps(eps, smoothing, n_classes)
    if fused is None:  # the fused path only pays off when a gradient will be taken
        fused = input.requires_grad and torch.is_grad_enabled() and not target.is_floating_point()
    if fused:
        if target.is_floating_point():
            raise ValueError("fused=True needs integer class-id targets; probability targets use fused=False")
        return fused_cross_entropy(input, target, eps, weight, reduction, ignore_index)
    return reference_cross_entropy(input, target, eps, weight, reduction, ignore_index)
