"""The loss as fastai modules: `LabelSmoothingCrossEntropy` (PyTorch's layout) and `LabelSmoothingCrossEntropyFlat`
(fastai's `BaseLoss` conventions), with the `activation`/`decodes` hooks that fastai's `get_preds` and `predict` call.
The arithmetic is `fastai_ls.loss`'s."""

from __future__ import annotations

from torch import Tensor, nn

from fastai_ls.loss.checks import (
    check_options,
    check_weight,
    check_weight_needs_no_grad,
    check_weight_values,
)
from fastai_ls.loss.flat import FlatLayout
from fastai_ls.loss.functional import label_smoothing_cross_entropy
from fastai_ls.validation import upcast

__all__ = ["label_smoothing_cross_entropy", "LabelSmoothingCrossEntropy", "LabelSmoothingCrossEntropyFlat"]


class LabelSmoothingCrossEntropy(nn.Module):
    """Label-smoothing cross-entropy for fastai with PyTorch's semantics (class axis 1): logits (N, C) or
    (N, C, d1, ..., dk), targets as class ids (N,) / (N, d1, ..., dk) or probabilities with the logits' shape.
    Equals `F.cross_entropy(..., label_smoothing=eps)` for `smoothing='uniform'`; `activation` (softmax) and
    `decodes` (argmax) over the class axis serve fastai's `get_preds` and `predict`.

    Parameters
    ----------
    eps : float, default 0.1
        Smoothing, in [0, 1): the share of the target mass spread over the classes. 0 is plain cross-entropy.
    weight : Tensor or None, default None
        Per-class weights (C,), finite and non-negative, PyTorch's convention (`w_c` in both terms, 'mean' divides
        by the sum of `w_y` over the kept rows). Kept as a copy in a buffer, so it moves with `.to()` and is saved
        with the model; never differentiated.
    reduction : str, default 'mean'
        'mean', 'sum' or 'none'. A plain attribute read at call time: fastai's `NoneReduce` (MixUp, CutMix,
        `get_preds(with_loss=True)`, `Interpretation`) sets it to 'none'.
    ignore_index : int, default -100
        Integer targets equal to this contribute nothing (loss, divisor, gradient). Must fit in int64.
    smoothing : str, default 'uniform'
        'uniform': eps/C on every class (PyTorch, fastai, timm); 'others': eps/(C-1) on each wrong class
        (fairseq), the same as uniform smoothing with eps*C/(C-1).
    fused : bool or None, default None
        None: the fused kernels for integer targets (loss and gradient in one sweep during training, the loss
        alone under `torch.no_grad()`; twice differentiable too); False: the reference path of torch operations;
        True: the fused kernels, an error for probability targets. See `label_smoothing_cross_entropy`.
    z_loss : float, default 0.0
        The weight lambda of the z-loss lambda * lse^2 added to each row's loss (lse = log sum_c exp(x_c)), times
        w_y with class weights; computed in the same sweep as the loss. 0 leaves it out.

    Examples
    --------
    >>> import torch
    >>> loss_func = LabelSmoothingCrossEntropy(eps=0.1)
    >>> loss_func(torch.randn(4, 3), torch.tensor([0, 2, 1, 0])).shape
    torch.Size([])
    """

    y_int = True  # MixUp/CutMix mix the losses of integer targets instead of mixing the targets
    class_axis = 1

    def __init__(
        self,
        eps: float = 0.1,
        weight: Tensor | None = None,
        reduction: str = "mean",
        ignore_index: int = -100,
        smoothing: str = "uniform",
        *,
        fused: bool | None = None,
        z_loss: float = 0.0,
    ):
        """Check and store the options (see the class's Parameters)."""
        super().__init__()
        check_options(eps, reduction, smoothing, ignore_index, fused, z_loss)
        check_weight(weight)
        check_weight_needs_no_grad(weight)  # as PyTorch's loss would at its first call: never a silent detach
        check_weight_values(weight)
        self.eps, self.reduction, self.ignore_index, self.smoothing = eps, reduction, ignore_index, smoothing
        self.fused, self.z_loss = fused, z_loss
        # A copy, so that moving or loading the module never writes into the caller's tensor.
        self.register_buffer("weight", None if weight is None else weight.detach().clone())

    def forward(self, input: Tensor, target: Tensor, reduction: str | None = None) -> Tensor:
        """The loss of logits `input` against `target`."""
        return label_smoothing_cross_entropy(input, target, self.eps, self.weight, reduction or self.reduction,
                                             self.ignore_index, self.smoothing, fused=self.fused,
                                             z_loss=getattr(self, "z_loss", 0.0))  # learners exported without it

    def activation(self, out: Tensor) -> Tensor:
        """The probabilities the loss scores: softmax over the class axis (fastai's `get_preds` calls this)."""
        return upcast(out).softmax(self.class_axis)

    def decodes(self, out: Tensor) -> Tensor:
        """Class ids from (activated) predictions: argmax over the class axis."""
        return out.argmax(self.class_axis)

    def extra_repr(self) -> str:
        z_loss = getattr(self, "z_loss", 0.0)
        return f"eps={self.eps}, smoothing={self.smoothing!r}, reduction={self.reduction!r}, " \
               f"ignore_index={self.ignore_index}" + (f", z_loss={z_loss}" if z_loss else "")


class LabelSmoothingCrossEntropyFlat(FlatLayout, LabelSmoothingCrossEntropy):
    """`LabelSmoothingCrossEntropy` with fastai's `BaseLoss` conventions: the class axis is `axis` (default
    last, as for fastai's `CrossEntropyLossFlat`), inputs and targets are flattened to rows, so 'none' gives one loss
    per flattened position, in the target's order. Integer targets may come flattened, or with trailing size-1 axes:
    the (bs, 1) class ids of fastai's `TabularDataLoaders`.

    Parameters
    ----------
    eps : float, default 0.1
        Smoothing, in [0, 1): the share of the target mass spread over the classes. 0 is plain cross-entropy.
    weight : Tensor or None, default None
        Per-class weights (C,), finite and non-negative, PyTorch's convention (`w_c` in both terms, 'mean' divides
        by the sum of `w_y` over the kept rows). Kept as a copy in a buffer, so it moves with `.to()` and is saved
        with the model; never differentiated.
    reduction : str, default 'mean'
        'mean', 'sum' or 'none'. A plain attribute read at call time: fastai's `NoneReduce` (MixUp, CutMix,
        `get_preds(with_loss=True)`, `Interpretation`) sets it to 'none'.
    ignore_index : int, default -100
        Integer targets equal to this contribute nothing (loss, divisor, gradient). Must fit in int64.
    smoothing : str, default 'uniform'
        'uniform': eps/C on every class (PyTorch, fastai, timm); 'others': eps/(C-1) on each wrong class
        (fairseq), the same as uniform smoothing with eps*C/(C-1).
    fused : bool or None, default None
        None: the fused kernels for integer targets (loss and gradient in one sweep during training, the loss
        alone under `torch.no_grad()`; twice differentiable too); False: the reference path of torch operations;
        True: the fused kernels, an error for probability targets. See `label_smoothing_cross_entropy`.
    z_loss : float, default 0.0
        The weight lambda of the z-loss lambda * lse^2 added to each row's loss (lse = log sum_c exp(x_c)), times
        w_y with class weights; computed in the same sweep as the loss. 0 leaves it out.
    axis : int, default -1
        The class axis of the model's output: -1 for (N, C) and (N, T, C) text outputs, 1 for (N, C, H, W) masks.
        `activation` and `decodes` use it too.
    flatten : bool, default True
        Flatten 'none' losses to one dimension, as fastai's `BaseLoss` does; False keeps the target's shape.
    floatify : bool, default False
        Cast the target to float: a probability target laid out like the input.

    Examples
    --------
    >>> import torch
    >>> loss_func = LabelSmoothingCrossEntropyFlat()
    >>> loss_func(torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5)), reduction='none').shape
    torch.Size([10])
    """

    def __init__(
        self,
        eps: float = 0.1,
        weight: Tensor | None = None,
        reduction: str = "mean",
        ignore_index: int = -100,
        smoothing: str = "uniform",
        *,
        fused: bool | None = None,
        z_loss: float = 0.0,
        axis: int = -1,
        flatten: bool = True,
        floatify: bool = False,
    ):
        """Check and store the options (see the class's Parameters)."""
        super().__init__(eps, weight, reduction, ignore_index, smoothing, fused=fused, z_loss=z_loss)
        self._flat_options(axis, flatten, floatify)
