"""The label-smoothing cross-entropy's formula and argument checks: the one home of the arithmetic that every
path (the reference path here, the fused path in `fused.py`, the C and Triton kernels) computes.

Every variant (uniform or other-classes smoothing, integer or probability targets, with or without class
weights) is the same cross-entropy against a smoothed target distribution q:

    loss_row = -sum_c w_c q_c log p_c = mass * log(sum_c exp z_c) - sum_c w_c q_c z_c

with z = x - max(x) the shifted logits and mass = sum_c w_c q_c. Only `mass` and the weighted dot product
differ between integer and probability targets (`hard_target_terms`, `soft_target_terms`).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from fastai_ls.tensor_input import upcast

__all__ = ["check_eps", "check_options", "check_weight", "check_input", "check_target", "check_ids", "uniform_eps",
           "reference_cross_entropy", "REDUCTIONS", "SMOOTHINGS"]

REDUCTIONS = ("mean", "sum", "none")
SMOOTHINGS = ("uniform", "others")


# --- argument checks: all run before any arithmetic on the device -------------------------------------------------


def check_eps(eps: float) -> None:
    """Raise unless `eps` is a real number in [0, 1)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    if not 0 <= eps < 1:
        raise ValueError(f"eps must be in [0, 1), got {eps}")


def check_options(eps: float, reduction: str, smoothing: str, ignore_index: int) -> None:
    """Raise if a scalar option of the loss is invalid."""
    check_eps(eps)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if smoothing not in SMOOTHINGS:
        raise ValueError(f"smoothing must be one of {SMOOTHINGS}, got {smoothing!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def check_weight(weight: Tensor | None, n_classes: int | None = None) -> None:
    """Raise unless `weight` is None or a finite, non-negative float vector (of length `n_classes` if given)."""
    if weight is None:
        return
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if weight.dim() != 1:
        raise ValueError(f"weight must be 1-D with one entry per class, got shape {tuple(weight.shape)}")
    if n_classes is not None and weight.numel() != n_classes:
        raise ValueError(f"weight has {weight.numel()} entries but the input has {n_classes} classes")
    if not bool(((weight >= 0) & weight.isfinite()).all()):
        raise ValueError("weight must be finite and non-negative")


def check_input(input: Tensor) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input must hold floating-point logits, got {input.dtype}")
    if input.dim() < 2:
        raise ValueError(f"input must be (N, C) or (N, C, d1, ...), got shape {tuple(input.shape)}")
    if input.shape[1] < 1:
        raise ValueError(f"input has no classes: shape {tuple(input.shape)}")


def check_target(input: Tensor, target: Tensor, ignore_index: int) -> None:
    """Raise unless `target`'s type, device and shape fit `input` (integer ids are checked by `check_ids`)."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(
                f"a probability target must have the input's shape {tuple(input.shape)}, got {tuple(target.shape)}"
            )
        if ignore_index >= 0:
            raise ValueError("ignore_index is not supported for probability (floating-point) targets")
        return
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must hold integer class ids or float probabilities, got {target.dtype}")
    expected = input.shape[:1] + input.shape[2:]
    if target.shape != expected:
        raise ValueError(f"integer target must have shape {tuple(expected)} for input {tuple(input.shape)}, "
                         f"got {tuple(target.shape)}")


def check_ids(target: Tensor, n_classes: int, ignore_index: int) -> tuple[int, int] | None:
    """Raise unless every id in `target` is a class or `ignore_index`; returns the smallest and largest id (None
    for an empty target)."""
    if target.numel() == 0:
        return None
    lo, hi = (bound.item() for bound in torch.aminmax(target))
    if lo >= 0 and hi < n_classes:  # the common case costs one reduction
        return lo, hi
    bad = target[(target != ignore_index) & ((target < 0) | (target >= n_classes))]
    if bad.numel():
        raise ValueError(f"target ids must be in [0, {n_classes}) or equal ignore_index={ignore_index}; "
                         f"found {bad.unique()[:5].tolist()}")
    return lo, hi


# --- the formula -------------------------------------------------------------------------------------------------


def uniform_eps(eps: float, smoothing: str, n_classes: int) -> float:
    """The uniform-smoothing eps that gives the same target as `smoothing` (other-classes eps is eps*C/(C-1))."""
    if smoothing == "uniform":
        return float(eps)
    if n_classes < 2:
        raise ValueError("smoothing='others' needs at least 2 classes")
    return float(eps) * n_classes / (n_classes - 1)








def hard_target_terms(z: Tensor, y: Tensor, eps: float, weight: Tensor | None) -> tuple[Tensor | float, Tensor]:
    """`mass` and `sum_c w_c q_c z_c` for q = (1-eps) onehot(y) + eps/C; `y` must be valid ids."""
    z_y = z.gather(1, y[:, None]).squeeze(1)
    return hard_target_mix(z_y, weighted_row_sum(z, weight), y, eps, weight, z.shape[1])


def weighted_row_sum(z: Tensor, weight: Tensor | None) -> Tensor:
    """sum_c w_c z_c per row. Not `z @ weight`: autocast would run a matrix product in half precision."""
    return z.sum(1) if weight is None else (z * weight).sum(1)


def hard_target_mix(z_y: Tensor, wz: Tensor, y: Tensor, eps: float, weight: Tensor | None,
                     n_classes: int) -> tuple[Tensor | float, Tensor]:
    """`hard_target_terms` from per-row sums: `z_y` the true class's z and `wz` = sum_c w_c z_c."""
    if weight is None:
        return 1.0, (1 - eps) * z_y + (eps / n_classes) * wz
    w_y = weight[y]
    mass = (1 - eps) * w_y + (eps / n_classes) * weight.sum()
    return mass, (1 - eps) * w_y * z_y + (eps / n_classes) * wz


def soft_target_terms(z: Tensor, q: Tensor, eps: float, weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """`mass` and `sum_c w_c q'_c z_c` for the smoothed probabilities q' = (1-eps) q + eps/C."""
    wq = (1 - eps) * q + eps / z.shape[1]
    if weight is not None:
        wq = wq * weight
    return wq.sum(1), (wq * z).sum(1)


def kept_targets(t: Tensor, ignore_index: int, weight: Tensor | None, dtype: torch.dtype,
                  may_ignore: bool = True) -> tuple[Tensor, Tensor | None, Tensor | int]:
    """Ids with ignored rows read as class 0, the ignored-row mask, and the 'mean' divisor (sum_kept w_y).
    `may_ignore=False` (no id can equal ignore_index): no mask (None), and without weights a divisor in Python."""
    if not may_ignore:
        return t, None, (t.shape[0] if weight is None else weight[t].sum())
    ignored = t == ignore_index
    y = t.masked_fill(ignored, 0)
    kept = (~ignored).to(dtype)
    return y, ignored, kept.sum() if weight is None else (weight[y] * kept).sum()


def cross_entropy(log_sum_exp_z: Tensor | float, mass: Tensor | float, dot: Tensor) -> Tensor:
    """-sum_c w_c q_c log_softmax(z)_c, written so that no N x C log-probability tensor is made."""
    return mass * log_sum_exp_z - dot


def class_rows_last(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(M, C) logits and (M,) ids or (M, C) probabilities, with the class axis (1) moved last."""
    n_classes = input.shape[1]
    x = upcast(input.movedim(1, -1).reshape(-1, n_classes))
    if target.is_floating_point():
        return x, target.movedim(1, -1).reshape(-1, n_classes).to(x.dtype)
    return x, target.reshape(-1).long()


def reduce_loss(loss: Tensor, divisor: Tensor | float, reduction: str, shape: torch.Size) -> Tensor:
    if reduction == "none":
        return loss.reshape(shape)
    total = loss.sum()
    return total if reduction == "sum" else total / divisor


def nan_for_infinite_logits(loss: Tensor) -> Tensor:
    # A -inf logit on a class that the smoothed target covers makes the row's loss +inf; report it like any
    # other non-finite logit, as NaN, rather than as a number that an average could hide.
    return loss + torch.where(loss.isinf(), float("nan"), 0.0).detach()


def reference_cross_entropy(input: Tensor, target: Tensor, eps: float, weight: Tensor | None, reduction: str,
                            ignore_index: int) -> Tensor:
    """The loss from torch operations, differentiable to any order: checked arguments, uniform `eps`."""
    n_classes = input.shape[1]
    if not target.is_floating_point():
        check_ids(target, n_classes, ignore_index)
    out_shape = input.shape[:1] + input.shape[2:]
    x, t = class_rows_last(input, target)
    w = None if weight is None else weight.to(device=x.device, dtype=x.dtype)

    z = x - x.detach().amax(1, keepdim=True)  # the loss does not depend on the shift, so no gradient flows into it
    log_sum_exp_z = z.exp().sum(1).log()
    if t.is_floating_point():
        loss = nan_for_infinite_logits(cross_entropy(log_sum_exp_z, *soft_target_terms(z, t, eps, w)))
        return reduce_loss(loss, t.shape[0], reduction, out_shape)

    y, ignored, divisor = kept_targets(t, ignore_index, w, x.dtype)
    loss = cross_entropy(log_sum_exp_z, *hard_target_terms(z, y, eps, w)).masked_fill(ignored, 0.0)
    loss = nan_for_infinite_logits(loss)
    return reduce_loss(loss, divisor, reduction, out_shape)
