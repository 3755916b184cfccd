"""Logit normalisation (LogitNorm; Wei et al., "Mitigating Neural Network Overconfidence with Logit Normalization",
ICML 2022): `logitnorm_loss` and `LogitNormLoss`, with its `Flat` twin. Cross-entropy of z / (tau (||z||_2 + 1e-7)):
the loss cannot be lowered by scaling the logits up, only by their direction."""

from __future__ import annotations

from torch import Tensor

from fastai_ls.loss.base import FamilyLoss, FlatFamilyLoss, Rows, check_parameter, family_loss, log_softmax_rows

__all__ = ["logitnorm_loss", "LogitNormLoss", "LogitNormLossFlat"]

NORM_EPS = 1e-7  # the paper's constant, added to the norm so that all-zero logits divide by it, not by 0


def logitnorm_loss(
    input: Tensor,
    target: Tensor,
    tau: float = 0.04,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    *,
    z_loss: float = 0.0,
) -> Tensor:
    """LogitNorm: the cross-entropy of z / (tau (||z||_2 + 1e-7)) per row, the norm over the class axis and
    differentiated. At tau = 1 / (||z|| + 1e-7) (a row of norm 1 / tau - 1e-7) it is the cross-entropy of z.

    Parameters
    ----------
    input : Tensor
        Logits, (N, C) or (N, C, d1, ..., dk): the class axis is 1, as in PyTorch. Never written to.
    target : Tensor
        Class ids with the input's shape minus the class axis, or probabilities with the input's shape.
    tau : float, default 0.04
        The temperature, > 0: the normalised logits lie on a sphere of radius 1 / tau. The paper tunes it per data
        set; 0.04 is its CIFAR-10 value (its repository's example uses 0.01 and its default is 1.0).
    weight : Tensor or None, default None
        Per-class weights (C,), finite and non-negative, as in `F.cross_entropy` on the normalised logits: a row with
        class id y counts w_y times and 'mean' divides by the sum of w_y over the kept rows. Not differentiated.
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
    >>> round(logitnorm_loss(x, y, tau=0.5).item(), 4)
    1.2994
    """
    tau = check_parameter("tau", tau, inclusive=False)

    def row_loss(rows: Rows) -> Tensor:
        x = rows.x / (tau * (rows.x.norm(dim=1, keepdim=True) + NORM_EPS))
        return rows.cross_entropy(log_softmax_rows(x))

    return family_loss(input, target, weight, reduction, ignore_index, z_loss, row_loss)


class LogitNormLoss(FamilyLoss):
    """LogitNorm for fastai with PyTorch's semantics (class axis 1); see `logitnorm_loss`. The model's outputs stay
    the raw logits: `activation` is their softmax, as for the other losses (the paper's predictions).

    Parameters
    ----------
    tau : float, default 0.04
        The temperature, > 0 (tuned per data set; the paper's CIFAR-10 value).
    weight : Tensor or None, default None
        Per-class weights (C,): a row with class id y counts w_y times, 'mean' divides by the sum of w_y. Kept as a
        copy in a buffer.
    reduction : str, default 'mean'
        'mean', 'sum' or 'none'; a plain attribute that fastai's `NoneReduce` sets.
    ignore_index : int, default -100
        Integer targets equal to this contribute nothing.
    z_loss : float, default 0.0
        lambda >= 0 of the z-loss, lambda * logsumexp(z)^2 per row, weighted like the row; 0 leaves it out.

    Examples
    --------
    >>> import torch
    >>> LogitNormLoss()(torch.randn(4, 3), torch.tensor([0, 2, 1, 0])).shape
    torch.Size([])
    """

    function = staticmethod(logitnorm_loss)
    parameters = ("tau",)

    def __init__(self, tau: float = 0.04, weight: Tensor | None = None, reduction: str = "mean",
                 ignore_index: int = -100, *, z_loss: float = 0.0):
        """Check and store the options (see the class's Parameters)."""
        super().__init__(weight, reduction, ignore_index, z_loss=z_loss)
        self.tau = check_parameter("tau", tau, inclusive=False)


class LogitNormLossFlat(FlatFamilyLoss, LogitNormLoss):
    """`LogitNormLoss` with fastai's `BaseLoss` conventions (class axis `axis`, default last; 'none' flattened).

    Parameters
    ----------
    tau, weight, reduction, ignore_index, z_loss
        As for `LogitNormLoss`.
    axis : int, default -1
        The class axis of the model's output; `activation` and `decodes` use it too.
    flatten : bool, default True
        Flatten 'none' losses to one dimension.
    floatify : bool, default False
        Cast the target to float: a probability target laid out like the input.

    Examples
    --------
    >>> import torch
    >>> LogitNormLossFlat()(torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5)), reduction='none').shape
    torch.Size([10])
    """

    def __init__(self, tau: float = 0.04, weight: Tensor | None = None, reduction: str = "mean",
                 ignore_index: int = -100, *, z_loss: float = 0.0, axis: int = -1,
                 flatten: bool = True, floatify: bool = False):
        """Check and store the options (see the class's Parameters)."""
        super().__init__(tau, weight, reduction, ignore_index, z_loss=z_loss)
        self._flat_options(axis, flatten, floatify)
