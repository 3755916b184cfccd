"""The reference backend: the loss from torch operations (`formula`'s algebra), differentiable to any order and
under `torch.func` transforms, for every kind of target. The other backends are checked against it, and the fused
autograd Function takes its gradient for second derivatives."""

from __future__ import annotations

from torch import Tensor

from fastai_ls.loss.backends.base import Backend, RowLoss
from fastai_ls.loss.backends.family_formulas import Rows, formula_rows
from fastai_ls.loss.checks import check_ids, check_weight_values, class_ids, weight_in
from fastai_ls.loss.formula import (
    cross_entropy,
    hard_target_terms,
    kept_targets,
    nan_for_infinite_logits,
    reduce_loss,
    soft_target_terms,
)
from fastai_ls.validation import compute_dtype, upcast

__all__ = ["ReferenceBackend", "REFERENCE", "reference_cross_entropy", "z_loss_term", "class_rows_last",
           "checked_rows_last", "layout_rows"]


class ReferenceBackend(Backend):
    name = "reference"

    def accepts(self, input: Tensor) -> bool:
        return True

    def loss(self, input: Tensor, target: Tensor, spec: RowLoss, weight: Tensor | None, reduction: str,
             ignore_index: int) -> Tensor:
        if spec.kind != "label_smoothing":
            return _family_reference(input, target, spec, weight, reduction, ignore_index)
        return reference_cross_entropy(input, target, spec.eps, weight, reduction, ignore_index, spec.z_loss)


REFERENCE = ReferenceBackend()


def class_rows_last(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(M, C) logits and (M,) ids or (M, C) probabilities, with the class axis (1) moved last."""
    n_classes = input.shape[1]
    x = upcast(input.movedim(1, -1).reshape(-1, n_classes))
    if target.is_floating_point():
        return x, target.movedim(1, -1).reshape(-1, n_classes).to(x.dtype)
    return x, class_ids(target)


def checked_rows_last(input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int
                      ) -> tuple[Tensor, Tensor, Tensor | None]:
    """`class_rows_last`'s (x, t) after checking the values the formulas read (the ids against the class count, or
    the weights for probability targets), and the weights in the compute dtype on the logits' device."""
    x, t = class_rows_last(input, target)
    if t.is_floating_point():
        check_weight_values(weight)
    else:
        check_ids(t, input.shape[1], ignore_index, weight)
    return x, t, weight_in(weight, compute_dtype(input.dtype), input.device)


def layout_rows(input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int) -> Rows:
    """The batch as `Rows` for a formula of `family_formulas`, after `checked_rows_last`'s value checks (one host
    read for all, never one per row): ignored rows zeroed, their mask and PyTorch's 'mean' divisor."""
    x, t, w = checked_rows_last(input, target, weight, ignore_index)
    shape = input.shape[:1] + input.shape[2:]
    if t.is_floating_point():
        mass = t.sum(1) if w is None else (t * w).sum(1)
        return Rows(x, None, t, w, mass, None, t.shape[0], shape)
    y, ignored, divisor = kept_targets(t, int(ignore_index), w, x.dtype)
    return Rows(x.masked_fill(ignored[:, None], 0.0), y, None, w, 1.0 if w is None else w[y], ignored, divisor,
                shape)


def _family_reference(input: Tensor, target: Tensor, spec: RowLoss, weight: Tensor | None, reduction: str,
                      ignore_index: int) -> Tensor:
    """A loss of the family from its formula in `family_formulas` (`formula_rows`), for integer targets."""
    rows = layout_rows(input, target, weight, ignore_index)
    loss = formula_rows(rows, spec.kind, spec.params, spec.eps, spec.z_loss).masked_fill(rows.ignored, 0.0)
    return reduce_loss(nan_for_infinite_logits(loss), rows.divisor, reduction, rows.shape)


def z_loss_term(z_loss: float, x_max: Tensor, log_sum_exp_z: Tensor, row_weight: Tensor | float) -> Tensor | float:
    """The z-loss z_loss * w lse^2 of rows whose logits' largest value is `x_max` (lse = x_max + log sum exp z)."""
    lse = x_max + log_sum_exp_z
    return z_loss * row_weight * lse * lse


def reference_cross_entropy(input: Tensor, target: Tensor, eps: float, weight: Tensor | None, reduction: str,
                            ignore_index: int, z_loss: float = 0.0) -> Tensor:
    """The loss from torch operations, differentiable to any order (and under `torch.func` transforms), for
    arguments that passed `functional`'s checks and uniform `eps`; checks the weights' and ids' values itself."""
    out_shape = input.shape[:1] + input.shape[2:]
    x, t, w = checked_rows_last(input, target, weight, ignore_index)

    if t.is_floating_point():
        shift = x.detach().amax(1, keepdim=True)  # the loss does not depend on the shift: no gradient flows into it
        z = x - shift
        lse_z = z.exp().sum(1).log()
        mass, dot = soft_target_terms(z, t, eps, w)
        loss = cross_entropy(lse_z, mass, dot)
        if z_loss:  # the row's weight is the one class ids would get: sum_c w_c q_c
            loss = loss + z_loss_term(z_loss, shift.squeeze(1), lse_z, 1.0 if w is None else (t * w).sum(1))
        loss = nan_for_infinite_logits(loss)
        return reduce_loss(loss, t.shape[0], reduction, out_shape)

    y, ignored, divisor = kept_targets(t, ignore_index, w, x.dtype)
    # An ignored row's gradient is exactly 0, as on the fused path, even where its logits are not finite (PyTorch's
    # is NaN there: one bad padding row would make every parameter's gradient NaN).
    x = x.masked_fill(ignored[:, None], 0.0)
    shift = x.detach().amax(1, keepdim=True)
    z = x - shift
    lse_z = z.exp().sum(1).log()
    loss = cross_entropy(lse_z, *hard_target_terms(z, y, eps, w))
    if z_loss:
        loss = loss + z_loss_term(z_loss, shift.squeeze(1), lse_z, 1.0 if w is None else w[y])
    loss = loss.masked_fill(ignored, 0.0)
    loss = nan_for_infinite_logits(loss)
    return reduce_loss(loss, divisor, reduction, out_shape)
