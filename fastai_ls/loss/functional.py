"""`label_smoothing_cross_entropy`, the functional core: checks the arguments once, chooses a backend
(`backends/`), and runs it."""

from __future__ import annotations

import torch  # noqa: F401 (the doctest examples use it)
from torch import Tensor

from fastai_ls.loss.backends import RowLoss, choose_backend
from fastai_ls.loss.checks import check_arguments

__all__ = ["label_smoothing_cross_entropy"]


def label_smoothing_cross_entropy(
    input: Tensor,
    target: Tensor,
    eps: float = 0.1,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    smoothing: str = "uniform",
    *,
    fused: bool | None = None,
    z_loss: float = 0.0,
) -> Tensor:
    """Cross-entropy against label-smoothed targets; equals `F.cross_entropy(..., label_smoothing=eps)` for
    `smoothing='uniform'`. Half-precision logits are computed in float32 and the loss is float32.

    Parameters
    ----------
    input : Tensor
        Logits, (N, C) or (N, C, d1, ..., dk): the class axis is 1, as in PyTorch. Never written to.
    target : Tensor
        Class ids with the input's shape minus the class axis ((N,) or (N, d1, ..., dk)), of any integer dtype
        (uint64 ids must be below 2**63); or probabilities with the input's shape (smoothing is applied on top).
    eps : float, default 0.1
        Smoothing, in [0, 1): the share of the target mass spread over the classes. 0 is plain cross-entropy.
    weight : Tensor or None, default None
        Per-class weights (C,), finite and non-negative, PyTorch's convention: `w_c` weighs class c in both the
        true-class and the smoothing term, and 'mean' divides by the sum of `w_y` over the kept rows (NaN when
        that is 0, as in PyTorch). Not differentiated: a weight that requires grad raises, as in PyTorch.
    reduction : str, default 'mean'
        'mean', 'sum' or 'none' (one loss per position, the target's shape).
    ignore_index : int, default -100
        Integer targets equal to this contribute nothing, to the loss, the divisor or the gradient. Must fit in
        int64; probability targets take no ignore_index.
    smoothing : str, default 'uniform'
        'uniform': eps/C on every class (PyTorch, fastai, timm); 'others': 1-eps on the true class and
        eps/(C-1) on each other one (fairseq), the same as uniform smoothing with eps*C/(C-1).
    fused : bool or None, default None
        None: the fastest path for integer targets, the fused backends (`backends/`), which compute the gradient
        together with the loss when one will be taken, and the loss alone otherwise (under `torch.no_grad()`, as
        in fastai's validation and `get_preds`); backward with create_graph=True (second derivatives) gets the
        reference path's gradient. False: the reference path of torch operations, differentiable to any order.
        True: the fused kernels; an error for probability targets. Under
        `torch.func` transforms (grad, vmap...) and for forward-mode AD's dual tensors the reference path runs
        whatever `fused` says.
    z_loss : float, default 0.0
        The weight lambda of the z-loss lambda * lse^2 added to each row's loss (lse = log sum_c exp(x_c), as in
        PaLM and Liger's `lse_square_scale`): it keeps the logits' scale from drifting. Class weights multiply it by
        w_y (for probability targets by sum_c w_c q_c), like the true-class term. 0 leaves it out.

    Returns
    -------
    Tensor
        The loss, float32 for half-precision logits, else the logits' dtype: a scalar, or per position for 'none'.

    Examples
    --------
    >>> x, y = torch.tensor([[1., 8., 1.], [1., 1., 8.]]), torch.tensor([1, 2])
    >>> round(label_smoothing_cross_entropy(x, y, eps=0.05).item(), 4)
    0.2352
    >>> round(label_smoothing_cross_entropy(x, y, eps=0.05, smoothing='others').item(), 4)
    0.3518
    """
    input, target, eps, ignore_index = check_arguments(input, target, eps, weight, reduction, ignore_index, smoothing,
                                                       fused, z_loss)
    spec = RowLoss(eps, float(z_loss))
    return choose_backend(input, target, weight, fused, spec).loss(input, target, spec, weight, reduction,
                                                                  ignore_index)
