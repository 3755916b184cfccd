"""What the calibration-loss family (`focal.py`, `margin.py`, `maxsup.py`, `logitnorm.py`, `confidence_penalty.py`)
shares: the argument checks, PyTorch's layout, `weight`, `ignore_index` and reductions, and the fastai hooks.

Every loss of the family is computed row by row on (M, C) logits with the class axis last, as

    loss_row = sum_c w_c q_c f_c(x) + (sum_c w_c q_c) * R(x)

with q the target (one-hot for class ids), w the class weights (1 without `weight`), f_c a per-class term (-log p_c
for cross-entropy) and R a per-row penalty (plus the optional z-loss, lambda logsumexp(x)^2). For class ids this is
w_y (f_y + R), and 'mean' divides by the sum of w_y over the kept rows, as PyTorch's cross-entropy does; for
probability targets 'mean' divides by the number of rows. A row whose target equals `ignore_index` contributes
nothing to the loss, the divisor or the gradient.

On class ids every loss runs `fastai_ls.loss.backends.fused_family_loss` (`family_loss`'s `fused`), z-loss and label
smoothing included, which computes the same formula with its gradient in one read of each row; probability targets
run the papers' formulas of `backends/family_formulas.py` with torch operations (as the reference backend does).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from fastai_ls.loss.backends import fused_family_loss
from fastai_ls.loss.backends.family_formulas import Rows, z_loss_rows
from fastai_ls.loss.backends.reference import layout_rows
from fastai_ls.loss.checks import (
    check_options,
    check_tensors,
    check_weight,
    check_weight_needs_no_grad,
    check_weight_values,
)
from fastai_ls.loss.flat import FlatLayout
from fastai_ls.loss.formula import nan_for_infinite_logits
from fastai_ls.validation import upcast

__all__ = ["check_parameter", "check_common", "rows_of", "family_loss", "runs_fused", "FamilyLoss", "FlatFamilyLoss"]


def check_parameter(name: str, value: float, low: float = 0.0, *, inclusive: bool = True,
                    high: float = math.inf) -> float:
    """`value` as a float after checking that it is a finite real number >= `low` (> `low` if not `inclusive`) and
    <= `high`; a TypeError or ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < low or (not inclusive and value == low) or value > high:
        bound = f"{'>=' if inclusive else '>'} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
        raise ValueError(f"{name} must be {bound}, got {value:g}")
    return value


def check_common(reduction: str, ignore_index: int) -> None:
    """Raise if `reduction` or `ignore_index` is invalid (the label-smoothing loss's own checks, at eps = 0)."""
    check_options(0.0, reduction, "uniform", ignore_index)


def rows_of(input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int) -> Rows:
    """Check `input`, `target` and `weight` (types, shapes, devices, then the ids' and weights' values, one host read
    for all: never one per row) and lay them out as `Rows`. Half-precision logits are computed in float32."""
    input, target = check_tensors(input, target, weight, ignore_index)
    return layout_rows(input, target, weight, ignore_index)


def family_loss(input: Tensor, target: Tensor, weight: Tensor | None, reduction: str, ignore_index: int,
                z_loss: float, row_loss: Callable[[Rows], Tensor], fused: tuple[str, Mapping[str, float]] | None = None,
                eps: float = 0.0, check: Callable[[], None] | None = None) -> Tensor:
    """Check the common arguments, lay the batch out as `Rows` and reduce `row_loss(rows)`, the (M,) row losses
    (a formula of `family_formulas`), plus the z-loss z_loss * logsumexp(x)^2 times the row's target mass when
    `z_loss` is not 0.

    `fused`, (kind, params), names the same loss in `fused_family_loss` (with label smoothing `eps`, which
    `row_loss` includes), which computes it with its gradient in one read of each row (the C kernel, Triton or
    blockwise; the formula with torch operations where those do not apply): it runs instead for integer class-id
    targets. `check` (raising on a bad parameter) runs before the formula: `fused_family_loss` checks them itself."""
    check_common(reduction, ignore_index)
    z_loss = check_parameter("z_loss", z_loss)
    if runs_fused(fused, target):
        return fused_family_loss(fused[0], input, target, fused[1], weight, ignore_index, reduction, eps=eps,
                                 z_loss=z_loss)
    if check is not None:
        check()
    rows = rows_of(input, target, weight, ignore_index)
    loss = row_loss(rows)
    if z_loss:
        loss = loss + z_loss_rows(rows, z_loss)
    # An infinite row loss is reported as NaN, as the fused backends and the label-smoothing loss report it.
    return rows.reduce(nan_for_infinite_logits(loss), reduction)


def runs_fused(fused: tuple[str, Mapping[str, float]] | None, target: Tensor) -> bool:
    """Whether `family_loss` runs `fused_family_loss`: the loss has a fused kind and the target is class ids (the
    fused family takes no probability targets)."""
    return fused is not None and isinstance(target, Tensor) and not target.is_floating_point() \
        and target.dtype != torch.bool


class FamilyLoss(nn.Module):
    """The shared part of the family's fastai loss classes (PyTorch's layout, class axis 1): `weight` kept as a copy
    in a buffer, `reduction` a plain attribute read at call time (fastai's `NoneReduce` sets it), `ignore_index`,
    and the `activation` (softmax) and `decodes` (argmax) hooks on the class axis. A subclass names its functional
    form, `function(input, target, *parameters, weight, reduction, ignore_index, z_loss=...)`, and the attributes
    that hold its own `parameters`, read at every call."""

    y_int = True  # MixUp/CutMix mix the losses of integer targets instead of mixing the targets
    class_axis = 1
    function: Callable[..., Tensor]
    parameters: tuple[str, ...] = ()

    def __init__(self, weight: Tensor | None = None, reduction: str = "mean", ignore_index: int = -100, *,
                 z_loss: float = 0.0):
        """Check and store the common options."""
        super().__init__()
        check_common(reduction, ignore_index)
        self.z_loss = check_parameter("z_loss", z_loss)
        check_weight(weight)
        check_weight_needs_no_grad(weight)  # as PyTorch's loss would at its first call: never a silent detach
        check_weight_values(weight)
        self.reduction, self.ignore_index = reduction, ignore_index
        # A copy, so that moving or loading the module never writes into the caller's tensor.
        self.register_buffer("weight", None if weight is None else weight.detach().clone())

    def forward(self, input: Tensor, target: Tensor, reduction: str | None = None) -> Tensor:
        """The loss of logits `input` against `target`."""
        return self.loss(input, target, reduction or self.reduction)

    def loss(self, input: Tensor, target: Tensor, reduction: str) -> Tensor:
        """The functional form with this module's parameters and options."""
        return self.function(input, target, *(getattr(self, name) for name in self.parameters), self.weight,
                             reduction, self.ignore_index, z_loss=self.z_loss)

    def activation(self, out: Tensor) -> Tensor:
        """The probabilities the loss scores: softmax over the class axis (fastai's `get_preds` calls this)."""
        return upcast(out).softmax(self.class_axis)

    def decodes(self, out: Tensor) -> Tensor:
        """Class ids from (activated) predictions: argmax over the class axis."""
        return out.argmax(self.class_axis)

    def extra_repr(self) -> str:
        own = "".join(f"{name}={getattr(self, name)}, " for name in self.parameters)
        return own + self.options_repr()

    def options_repr(self) -> str:
        """The common options, as `extra_repr` shows them."""
        z_loss = f", z_loss={self.z_loss}" if self.z_loss else ""
        return f"reduction={self.reduction!r}, ignore_index={self.ignore_index}{z_loss}"


class FlatFamilyLoss(FlatLayout):
    """Mixed in before a `FamilyLoss` class, gives its `Flat` twin fastai's `BaseLoss` layout (`FlatLayout`, as
    `LabelSmoothingCrossEntropyFlat` has it), and its `axis` in the repr."""

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, axis={self.axis}"
