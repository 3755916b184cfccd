"""Softmax focal losses: `focal_loss` / `FocalLoss` (Lin et al. 2017; for calibration Mukhoti et al., NeurIPS 2020)
and `adaptive_focal_loss` / `AdaptiveFocalLoss` (FLSD-53, Mukhoti et al. 2020), each with a `Flat` twin.

Both compute -sum_c w_c q_c (1 - p_c)^gamma_c log p_c against the (optionally label-smoothed) target q: for class
ids -w_y (1 - p_y)^gamma log p_y. 1 - p is computed as -expm1(log p), exact for p near 1. On class ids both run the
fused kernels (`fastai_ls.loss.backends.fused_family_loss`), label smoothing and z-loss included."""

from __future__ import annotations

from torch import Tensor

from fastai_ls.loss.backends.family_formulas import adaptive_focal_rows, focal_rows
from fastai_ls.loss.base import FamilyLoss, FlatFamilyLoss, check_parameter, family_loss
from fastai_ls.loss.checks import check_eps

__all__ = ["focal_loss", "FocalLoss", "FocalLossFlat", "adaptive_focal_loss", "AdaptiveFocalLoss",
           "AdaptiveFocalLossFlat"]

def focal_loss(
    input: Tensor,
    target: Tensor,
    gamma: float = 3.0,
    eps: float = 0.0,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    *,
    z_loss: float = 0.0,
) -> Tensor:
    """Softmax focal loss, -(1 - p_y)^gamma log p_y per row; cross-entropy at gamma = 0 (then equal to
    `F.cross_entropy(..., label_smoothing=eps)`). The factor (1 - p_y)^gamma is differentiated.

    Parameters
    ----------
    input : Tensor
        Logits, (N, C) or (N, C, d1, ..., dk): the class axis is 1, as in PyTorch. Never written to.
    target : Tensor
        Class ids with the input's shape minus the class axis, or probabilities q with the input's shape (the loss
        is then -sum_c q_c (1 - p_c)^gamma log p_c).
    gamma : float, default 3.0
        The focusing parameter, >= 0; 3 is Mukhoti et al.'s choice for calibration (Lin et al. used 2 for
        detection).
    eps : float, default 0.0
        Label smoothing in [0, 1): the target becomes (1 - eps) q + eps / C and the loss
        -sum_c q'_c (1 - p_c)^gamma log p_c.
    weight : Tensor or None, default None
        Per-class weights (C,), finite and non-negative: w_c multiplies class c's term, so a row with class id y
        counts w_y times, and 'mean' divides by the sum of w_y over the kept rows (PyTorch's convention; by the
        number of rows for probability targets). Not differentiated.
    reduction : str, default 'mean'
        'mean', 'sum' or 'none' (one loss per position, the target's shape).
    ignore_index : int, default -100
        Integer targets equal to this contribute nothing, to the loss, the divisor or the gradient.
    z_loss : float, default 0.0
        lambda >= 0 of the z-loss: lambda * logsumexp(z)^2 added to each row's loss and weighted like it (w_y), which
        keeps the log-partition near 0 (Chowdhery et al. 2022, PaLM; Liger's `lse_square_scale`). 0 leaves it out.

    Returns
    -------
    Tensor
        float32 for half-precision logits, else the logits' dtype: a scalar, or per position for 'none'.

    Examples
    --------
    >>> import torch
    >>> x, y = torch.tensor([[1., 3., 0.], [2., 0., 0.]]), torch.tensor([1, 2])
    >>> round(focal_loss(x, y, gamma=3.0).item(), 4)
    0.7991
    """
    gamma = check_parameter("gamma", gamma)
    check_eps(eps)
    return family_loss(input, target, weight, reduction, ignore_index, z_loss,
                       lambda rows: focal_rows(rows, gamma, eps), ("focal", {"gamma": gamma}), eps)


def adaptive_focal_loss(
    input: Tensor,
    target: Tensor,
    threshold: float = 0.2,
    gamma_below: float = 5.0,
    gamma_above: float = 3.0,
    eps: float = 0.0,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    *,
    z_loss: float = 0.0,
) -> Tensor:
    """Adaptive focal loss, FLSD-53 by default (sample-dependent focal loss): -(1 - p_y)^gamma log p_y with
    gamma = `gamma_below` (5) where p_y < `threshold` (0.2) and `gamma_above` (3) elsewhere. gamma is chosen from p
    without a gradient (it is a step function of p).

    Parameters
    ----------
    input : Tensor
        Logits, (N, C) or (N, C, d1, ..., dk): the class axis is 1, as in PyTorch. Never written to.
    target : Tensor
        Class ids with the input's shape minus the class axis, or probabilities q with the input's shape (each
        class's gamma is then chosen from its own p_c).
    threshold : float, default 0.2
        The probability below which `gamma_below` applies, in [0, 1].
    gamma_below, gamma_above : float, default 5.0 and 3.0
        The focusing parameters (>= 0) below and from `threshold` on (FLSD-53: 5 and 3).
    eps : float, default 0.0
        Label smoothing in [0, 1), as in `focal_loss`.
    weight : Tensor or None, default None
        Per-class weights (C,), entering as in `focal_loss`: w_y times the row's loss, 'mean' divides by the sum of
        w_y over the kept rows.
    reduction : str, default 'mean'
        'mean', 'sum' or 'none'.
    ignore_index : int, default -100
        Integer targets equal to this contribute nothing.
    z_loss : float, default 0.0
        lambda >= 0 of the z-loss, lambda * logsumexp(z)^2 per row, weighted like the row; 0 leaves it out.

    Returns
    -------
    Tensor
        The loss, as `focal_loss` returns it.

    Examples
    --------
    >>> import torch
    >>> x, y = torch.tensor([[1., 3., 0.], [2., 0., 0.]]), torch.tensor([1, 2])
    >>> round(adaptive_focal_loss(x, y).item(), 4)
    0.638
    """
    threshold = check_parameter("threshold", threshold, high=1.0)
    below, above = check_parameter("gamma_below", gamma_below), check_parameter("gamma_above", gamma_above)
    check_eps(eps)
    params = {"threshold": threshold, "gamma_below": below, "gamma_above": above}
    return family_loss(input, target, weight, reduction, ignore_index, z_loss,
                       lambda rows: adaptive_focal_rows(rows, **params, eps=eps), ("adaptive_focal", params), eps)


class FocalLoss(FamilyLoss):
    """Softmax focal loss for fastai with PyTorch's semantics (class axis 1); see `focal_loss`.

    Parameters
    ----------
    gamma : float, default 3.0
        The focusing parameter, >= 0 (Mukhoti et al. 2020's choice for calibration); 0 is cross-entropy.
    eps : float, default 0.0
        Label smoothing in [0, 1).
    weight : Tensor or None, default None
        Per-class weights (C,): a row with class id y counts w_y times, 'mean' divides by the sum of w_y (PyTorch's
        convention). Kept as a copy in a buffer.
    reduction : str, default 'mean'
        'mean', 'sum' or 'none'; a plain attribute that fastai's `NoneReduce` sets.
    ignore_index : int, default -100
        Integer targets equal to this contribute nothing.
    z_loss : float, default 0.0
        lambda >= 0 of the z-loss, lambda * logsumexp(z)^2 per row, weighted like the row; 0 leaves it out.

    Examples
    --------
    >>> import torch
    >>> FocalLoss()(torch.randn(4, 3), torch.tensor([0, 2, 1, 0])).shape
    torch.Size([])
    """

    function = staticmethod(focal_loss)
    parameters = ("gamma", "eps")

    def __init__(self, gamma: float = 3.0, eps: float = 0.0, weight: Tensor | None = None, reduction: str = "mean",
                 ignore_index: int = -100, *, z_loss: float = 0.0):
        """Check and store the options (see the class's Parameters)."""
        super().__init__(weight, reduction, ignore_index, z_loss=z_loss)
        check_eps(eps)
        self.gamma, self.eps = check_parameter("gamma", gamma), eps


class FocalLossFlat(FlatFamilyLoss, FocalLoss):
    """`FocalLoss` with fastai's `BaseLoss` conventions (class axis `axis`, default last; 'none' flattened).

    Parameters
    ----------
    gamma, eps, weight, reduction, ignore_index, z_loss
        As for `FocalLoss`.
    axis : int, default -1
        The class axis of the model's output; `activation` and `decodes` use it too.
    flatten : bool, default True
        Flatten 'none' losses to one dimension, as fastai's `BaseLoss` does.
    floatify : bool, default False
        Cast the target to float: a probability target laid out like the input.

    Examples
    --------
    >>> import torch
    >>> FocalLossFlat()(torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5)), reduction='none').shape
    torch.Size([10])
    """

    def __init__(self, gamma: float = 3.0, eps: float = 0.0, weight: Tensor | None = None, reduction: str = "mean",
                 ignore_index: int = -100, *, z_loss: float = 0.0, axis: int = -1,
                 flatten: bool = True, floatify: bool = False):
        """Check and store the options (see the class's Parameters)."""
        super().__init__(gamma, eps, weight, reduction, ignore_index, z_loss=z_loss)
        self._flat_options(axis, flatten, floatify)


class AdaptiveFocalLoss(FamilyLoss):
    """FLSD-53 for fastai with PyTorch's semantics (class axis 1): focal loss with gamma 5 where p_y < 0.2, else 3;
    see `adaptive_focal_loss`.

    Parameters
    ----------
    threshold : float, default 0.2
        The probability below which `gamma_below` applies.
    gamma_below, gamma_above : float, default 5.0 and 3.0
        The focusing parameters below and from `threshold` on.
    eps : float, default 0.0
        Label smoothing in [0, 1).
    weight : Tensor or None, default None
        Per-class weights (C,): a row with class id y counts w_y times, 'mean' divides by the sum of w_y.
    reduction : str, default 'mean'
        'mean', 'sum' or 'none'.
    ignore_index : int, default -100
        Integer targets equal to this contribute nothing.
    z_loss : float, default 0.0
        lambda >= 0 of the z-loss, lambda * logsumexp(z)^2 per row, weighted like the row; 0 leaves it out.

    Examples
    --------
    >>> import torch
    >>> AdaptiveFocalLoss()(torch.randn(4, 3), torch.tensor([0, 2, 1, 0])).shape
    torch.Size([])
    """

    function = staticmethod(adaptive_focal_loss)
    parameters = ("threshold", "gamma_below", "gamma_above", "eps")

    def __init__(self, threshold: float = 0.2, gamma_below: float = 5.0, gamma_above: float = 3.0, eps: float = 0.0,
                 weight: Tensor | None = None, reduction: str = "mean", ignore_index: int = -100, *,
                 z_loss: float = 0.0):
        """Check and store the options (see the class's Parameters)."""
        super().__init__(weight, reduction, ignore_index, z_loss=z_loss)
        check_eps(eps)
        self.threshold = check_parameter("threshold", threshold, high=1.0)
        self.gamma_below = check_parameter("gamma_below", gamma_below)
        self.gamma_above = check_parameter("gamma_above", gamma_above)
        self.eps = eps


class AdaptiveFocalLossFlat(FlatFamilyLoss, AdaptiveFocalLoss):
    """`AdaptiveFocalLoss` with fastai's `BaseLoss` conventions (class axis `axis`, default last; 'none' flattened).

    Parameters
    ----------
    threshold, gamma_below, gamma_above, eps, weight, reduction, ignore_index, z_loss
        As for `AdaptiveFocalLoss`.
    axis : int, default -1
        The class axis of the model's output; `activation` and `decodes` use it too.
    flatten : bool, default True
        Flatten 'none' losses to one dimension.
    floatify : bool, default False
        Cast the target to float: a probability target laid out like the input.

    Examples
    --------
    >>> import torch
    >>> AdaptiveFocalLossFlat()(torch.randn(6, 4), torch.randint(0, 4, (6, 1)), reduction='none').shape
    torch.Size([6])
    """

    def __init__(self, threshold: float = 0.2, gamma_below: float = 5.0, gamma_above: float = 3.0, eps: float = 0.0,
                 weight: Tensor | None = None, reduction: str = "mean", ignore_index: int = -100, *,
                 z_loss: float = 0.0, axis: int = -1, flatten: bool = True, floatify: bool = False):
        """Check and store the options (see the class's Parameters)."""
        super().__init__(threshold, gamma_below, gamma_above, eps, weight, reduction, ignore_index, z_loss=z_loss)
        self._flat_options(axis, flatten, floatify)
