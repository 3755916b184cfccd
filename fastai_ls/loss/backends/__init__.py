"""The loss's execution paths, one backend each (`base.Backend`), chosen once per call by `choose_backend`:

- `reference`: torch operations, any target, differentiable to any order (`reference.py`);
- `C kernel`: float32 logits on the CPU, a compiled kernel (`c_kernel.py`, `fused_cpu.c`);
- `Triton`: float32 and half-precision logits on CUDA (`triton.py`);
- `blockwise`: torch operations on blocks of rows, for everything else (`blockwise.py`).

`fused_family_loss` runs the calibration-loss family (focal, FLSD-53, MbLS, MaxSup, LogitNorm, the confidence
penalty; `family.py`) on the same backends.

The last three are fused: they compute the gradient with the loss, through the autograd Function of `autograd.py`,
which receives the backend.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch  # noqa: F401 (the doctest examples use it)
from torch import Tensor

from fastai_ls.loss.backends import c_kernel, triton
from fastai_ls.loss.backends.base import Backend, RowLoss
from fastai_ls.loss.backends.blockwise import BLOCKWISE
from fastai_ls.loss.backends.family import check_family_params
from fastai_ls.loss.backends.reference import REFERENCE
from fastai_ls.loss.checks import check_arguments, has_forward_tangent, under_functorch_transform

__all__ = ["Backend", "RowLoss", "choose_backend", "fused_family_loss"]

LABEL_SMOOTHING = RowLoss()


def choose_backend(input: Tensor, target: Tensor, weight: Tensor | None, fused: bool | None,
                   spec: RowLoss = LABEL_SMOOTHING) -> Backend:
    """The backend that computes the loss of `input` against `target` (checked arguments): the reference one for
    probability targets, for `fused=False`, under `torch.func` transforms and for forward-mode AD's dual tensors (the
    fused Function has no functorch rules and no forward derivative: its kernels read data pointers); else the first
    fused backend that takes the logits."""
    if fused is False or target.is_floating_point() or under_functorch_transform() \
            or has_forward_tangent(input, weight):
        return REFERENCE
    if c_kernel.accepts(input):
        return c_kernel.C_KERNEL
    if triton.accepts(input):
        return triton.TRITON
    return BLOCKWISE


def fused_family_loss(kind: str, input: Tensor, target: Tensor, params: Mapping[str, float],
                      weight: Tensor | None = None, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """A loss of the calibration family, its gradient computed with it in one read of each logit row.

    Parameters
    ----------
    kind : str
        'focal' (-(1 - p_y)^gamma log p_y, without label smoothing: `fastai_ls.focal_loss` computes the smoothed
        form), 'adaptive_focal' (FLSD-53: gamma 5 where p_y < 0.2, else 3, not differentiated),
        'margin' (MbLS: CE + alpha / C sum_k relu(z_max - z_k - margin)), 'maxsup' (CE + alpha (z_max - mean_k z_k)),
        'logitnorm' (CE of z / (tau (||z||_2 + 1e-7))) or 'confidence_penalty' (CE - beta H(p)).
    input : Tensor
        Logits, (N, C) or (N, C, d1, ..., dk), the class axis 1. Never written to.
    target : Tensor
        Integer class ids with the input's shape minus the class axis.
    params : Mapping[str, float]
        The loss's parameters, exactly: focal {'gamma'}, adaptive_focal {}, margin {'margin', 'alpha'},
        maxsup {'alpha'}, logitnorm {'tau'}, confidence_penalty {'beta'}.
    weight : Tensor or None, default None
        Per-class weights (C,): the row's loss is multiplied by w_y, and 'mean' divides by the sum of w_y over the
        kept rows. Not differentiated.
    ignore_index : int, default -100
        Rows whose id equals this contribute nothing (loss, divisor, gradient).
    reduction : str, default 'mean'
        'mean', 'sum' or 'none' (one loss per position).

    Returns
    -------
    Tensor
        The loss, float32 for half-precision logits, else the logits' dtype.

    Examples
    --------
    >>> x, y = torch.tensor([[1., 8., 1.], [1., 1., 8.]]), torch.tensor([1, 2])
    >>> round(fused_family_loss('maxsup', x, y, {'alpha': 0.1}).item(), 4)
    0.4685
    """
    params = check_family_params(kind, params)
    input, target, _, ignore_index = check_arguments(input, target, 0.0, weight, reduction, ignore_index, "uniform",
                                                     None)
    if target.is_floating_point():
        raise ValueError(f"the fused {kind} loss needs integer class-id targets, got {target.dtype}")
    spec = RowLoss(kind=kind, params=params)
    return choose_backend(input, target, weight, None, spec).loss(input, target, spec, weight, reduction,
                                                                 ignore_index)
