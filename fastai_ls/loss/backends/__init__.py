"""The loss's execution paths, one backend each (`base.Backend`), chosen once per call by `choose_backend`:

- `reference`: torch operations, any target, differentiable to any order (`reference.py`);
- `C kernel`: float32 logits on the CPU, a compiled kernel (`c_kernel.py`, `fused_cpu.c`);
- `Triton`: float32 and half-precision logits on CUDA (`triton.py`);
- `blockwise`: torch operations on blocks of rows, for everything else (`blockwise.py`).

`fused_family_loss` runs the calibration-loss family (focal and adaptive focal, label-smoothed or not, AdaFocal, MbLS,
MaxSup, LogitNorm, the confidence penalty, each with an optional z-loss; `family.py`) on the same backends.

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
from fastai_ls.loss.backends.family import SMOOTHED_KINDS, check_family_params
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
                      weight: Tensor | None = None, ignore_index: int = -100, reduction: str = "mean", *,
                      eps: float = 0.0, z_loss: float = 0.0) -> Tensor:
    """A loss of the calibration family, its gradient computed with it in one read of each logit row (the focal
    losses with label smoothing sweep the row once more while it is in cache).

    Parameters
    ----------
    kind : str
        'focal' (-(1 - p_y)^gamma log p_y), 'adaptive_focal' (the same with gamma = gamma_below where
        p_y < threshold, else gamma_above, not differentiated; FLSD-53 by default),
        'margin' (MbLS: CE + alpha / C sum_k relu(z_max - z_k - margin)), 'maxsup' (CE + alpha (z_max - mean_k z_k)),
        'logitnorm' (CE of z / (tau (||z||_2 + 1e-7))), 'confidence_penalty' (CE - beta H(p)) or 'ada_focal'
        (AdaFocal: gamma = gammas[bin of p_y], not differentiated; -(1 - p_y)^gamma log p_y where gamma >= switch,
        else -(1 + p_y)^|gamma| log p_y).
    input : Tensor
        Logits, (N, C) or (N, C, d1, ..., dk), the class axis 1. Never written to.
    target : Tensor
        Integer class ids with the input's shape minus the class axis.
    params : Mapping[str, float]
        The loss's parameters, exactly: focal {'gamma'}, adaptive_focal {'threshold', 'gamma_below',
        'gamma_above'} (each may be left out: FLSD-53's 0.2, 5 and 3), margin {'margin', 'alpha'}, maxsup {'alpha'},
        logitnorm {'tau'}, confidence_penalty {'beta'}, ada_focal {'switch' (default 0.2), 'gammas' (a (B,) float
        tensor), 'edges' (None, the default: B equal-width bins; or a (B + 1,) tensor of edges from 0 to 1, bins
        (e_b, e_b+1])}.
    weight : Tensor or None, default None
        Per-class weights (C,): the row's loss is multiplied by w_y, and 'mean' divides by the sum of w_y over the
        kept rows. Not differentiated.
    ignore_index : int, default -100
        Rows whose id equals this contribute nothing (loss, divisor, gradient).
    reduction : str, default 'mean'
        'mean', 'sum' or 'none' (one loss per position).
    eps : float, default 0.0
        Label smoothing in [0, 1), for 'focal' and 'adaptive_focal' only: the loss becomes
        -sum_c w_c q'_c (1 - p_c)^gamma_c log p_c with q' = (1 - eps) onehot(y) + eps / C, each class's gamma_c
        chosen from its own p_c.
    z_loss : float, default 0.0
        lambda >= 0 of the z-loss lambda w_y logsumexp(x)^2, on the raw logits (for LogitNorm too); 0 leaves it out.

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
    input, target, eps, ignore_index = check_arguments(input, target, eps, weight, reduction, ignore_index,
                                                       "uniform", None, z_loss)
    if eps and kind not in SMOOTHED_KINDS:
        raise ValueError(f"eps (label smoothing) is for the focal losses {SMOOTHED_KINDS}, not {kind!r}")
    if target.is_floating_point():
        raise ValueError(f"the fused {kind} loss needs integer class-id targets, got {target.dtype}")
    spec = RowLoss(float(eps), float(z_loss), kind, params)
    return choose_backend(input, target, weight, None, spec).loss(input, target, spec, weight, reduction,
                                                                 ignore_index)
