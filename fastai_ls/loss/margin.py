"""Margin-based label smoothing (MbLS; Liu et al., "The Devil is in the Margin", CVPR 2022): `margin_label_smoothing`
and `MarginLabelSmoothing`, with its `Flat` twin. Cross-entropy plus alpha times the mean over classes of
relu(z_max - z_k - margin): only logit distances beyond the margin are penalised."""

from __future__ import annotations

from torch import Tensor

from fastai_ls.loss.base import FamilyLoss, FlatFamilyLoss, check_parameter, cross_entropy_plus, family_loss

__all__ = ["margin_label_smoothing", "MarginLabelSmoothing", "MarginLabelSmoothingFlat"]


def margin_label_smoothing(
    input: Tensor,
    target: Tensor,
    margin: float = 10.0,
    alpha: float = 0.1,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    *,
    z_loss: float = 0.0,
) -> Tensor:
    """MbLS: CE + alpha * (1/C) sum_k relu(z_max - z_k - margin) per row; cross-entropy at alpha = 0. z_max is
    differentiated (its gradient goes to the largest logit), as in the paper's code.

    Parameters
    ----------
    input : Tensor
        Logits, (N, C) or (N, C, d1, ..., dk): the class axis is 1, as in PyTorch. Never written to.
    target : Tensor
        Class ids with the input's shape minus the class axis, or probabilities with the input's shape.
    margin : float, default 10.0
        The logit distance m that goes unpenalised, >= 0 (the paper's default).
    alpha : float, default 0.1
        The penalty's weight, >= 0 (the paper's default).
    weight : Tensor or None, default None
        Per-class weights (C,), finite and non-negative: a row with class id y counts w_y times (its cross-entropy
        and its penalty), and 'mean' divides by the sum of w_y over the kept rows (PyTorch's convention). For
        probability targets q the cross-entropy is -sum_c w_c q_c log p_c, the penalty counts sum_c w_c q_c times
        and 'mean' divides by the number of rows. Not differentiated.
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
    >>> x, y = torch.tensor([[1., 14., 0.], [2., 0., 0.]]), torch.tensor([1, 2])
    >>> round(margin_label_smoothing(x, y).item(), 4)
    1.2364
    """
    margin, alpha = check_parameter("margin", margin), check_parameter("alpha", alpha)

    def penalty(x: Tensor, log_p: Tensor) -> Tensor:
        return alpha * (x.amax(1, keepdim=True) - x - margin).relu().mean(1)

    return family_loss(input, target, weight, reduction, ignore_index, z_loss,
                       lambda rows: cross_entropy_plus(rows, penalty))


class MarginLabelSmoothing(FamilyLoss):
    """MbLS for fastai with PyTorch's semantics (class axis 1); see `margin_label_smoothing`.

    Parameters
    ----------
    margin : float, default 10.0
        The logit distance that goes unpenalised, >= 0.
    alpha : float, default 0.1
        The penalty's weight, >= 0; 0 is cross-entropy.
    weight : Tensor or None, default None
        Per-class weights (C,): a row with class id y counts w_y times (cross-entropy and penalty), 'mean' divides
        by the sum of w_y. Kept as a copy in a buffer.
    reduction : str, default 'mean'
        'mean', 'sum' or 'none'; a plain attribute that fastai's `NoneReduce` sets.
    ignore_index : int, default -100
        Integer targets equal to this contribute nothing.
    z_loss : float, default 0.0
        lambda >= 0 of the z-loss, lambda * logsumexp(z)^2 per row, weighted like the row; 0 leaves it out.

    Examples
    --------
    >>> import torch
    >>> MarginLabelSmoothing()(torch.randn(4, 3), torch.tensor([0, 2, 1, 0])).shape
    torch.Size([])
    """

    function = staticmethod(margin_label_smoothing)
    parameters = ("margin", "alpha")

    def __init__(self, margin: float = 10.0, alpha: float = 0.1, weight: Tensor | None = None,
                 reduction: str = "mean", ignore_index: int = -100, *, z_loss: float = 0.0):
        """Check and store the options (see the class's Parameters)."""
        super().__init__(weight, reduction, ignore_index, z_loss=z_loss)
        self.margin, self.alpha = check_parameter("margin", margin), check_parameter("alpha", alpha)


class MarginLabelSmoothingFlat(FlatFamilyLoss, MarginLabelSmoothing):
    """`MarginLabelSmoothing` with fastai's `BaseLoss` conventions (class axis `axis`, default last; 'none'
    flattened).

    Parameters
    ----------
    margin, alpha, weight, reduction, ignore_index, z_loss
        As for `MarginLabelSmoothing`.
    axis : int, default -1
        The class axis of the model's output; `activation` and `decodes` use it too.
    flatten : bool, default True
        Flatten 'none' losses to one dimension.
    floatify : bool, default False
        Cast the target to float: a probability target laid out like the input.

    Examples
    --------
    >>> import torch
    >>> MarginLabelSmoothingFlat()(torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5)), reduction='none').shape
    torch.Size([10])
    """

    def __init__(self, margin: float = 10.0, alpha: float = 0.1, weight: Tensor | None = None,
                 reduction: str = "mean", ignore_index: int = -100, *, z_loss: float = 0.0, axis: int = -1,
                 flatten: bool = True, floatify: bool = False):
        """Check and store the options (see the class's Parameters)."""
        super().__init__(margin, alpha, weight, reduction, ignore_index, z_loss=z_loss)
        self._flat_options(axis, flatten, floatify)
