"""The label-smoothing cross-entropy's formula: the one home of the arithmetic that every path (the reference path
in `backends/`: the reference backend's torch operations, the blockwise backend, the C and Triton kernels) computes.
The argument checks are in `checks.py`.

Every variant (uniform or other-classes smoothing, integer or probability targets, with or without class
weights) is the same cross-entropy against a smoothed target distribution q:

    loss_row = -sum_c w_c q_c log p_c = mass * log(sum_c exp z_c) - sum_c w_c q_c z_c

with z = x - max(x) the shifted logits and mass = sum_c w_c q_c. Only `mass` and the weighted dot product
differ between integer and probability targets (`hard_target_terms`, `soft_target_terms`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["uniform_eps", "hard_target_terms", "hard_target_mix", "soft_target_terms", "kept_targets",
           "cross_entropy", "reduce_loss", "mean_divisor", "nan_for_infinite_logits"]


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
    return hard_target_mix(z_y, weighted_row_sum(z, weight) if eps else None, y, eps, weight, z.shape[1])


def weighted_row_sum(z: Tensor, weight: Tensor | None) -> Tensor:
    """sum_c w_c z_c per row. Not `z @ weight`: autocast would run a matrix product in half precision."""
    return z.sum(1) if weight is None else (z * weight).sum(1)


def hard_target_mix(z_y: Tensor, wz: Tensor | None, y: Tensor, eps: float, weight: Tensor | None,
                    n_classes: int) -> tuple[Tensor | float, Tensor]:
    """`hard_target_terms` from per-row sums: `z_y` the true class's z and `wz` = sum_c w_c z_c.

    With eps = 0 (plain cross-entropy) the smoothing term is left out, not multiplied by 0: `wz` may be None, and
    a -inf logit, or finite logits so far apart that their sum overflows, cannot turn a finite loss into NaN."""
    if weight is None:
        return 1.0, ((1 - eps) * z_y + (eps / n_classes) * wz) if eps else z_y
    w_y = weight[y]
    if not eps:
        return w_y, w_y * z_y
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


def mean_divisor(divisor: Tensor | float) -> Tensor | float:
    """The 'mean' divisor, NaN where it is 0 (nothing kept, or only zero-weight classes): PyTorch's 'mean' is NaN
    there, and so is its gradient on every kept row, even where the summed loss is positive."""
    if isinstance(divisor, Tensor):
        return divisor.where(divisor > 0, math.nan)
    return divisor if divisor > 0 else math.nan


def reduce_loss(loss: Tensor, divisor: Tensor | float, reduction: str, shape: torch.Size) -> Tensor:
    if reduction == "none":
        return loss.reshape(shape)
    total = loss.sum()
    return total if reduction == "sum" else total / mean_divisor(divisor)


def nan_for_infinite_logits(loss: Tensor) -> Tensor:
    # A -inf logit on a class that the smoothed target covers makes the row's loss +inf; report it like any
    # other non-finite logit, as NaN, rather than as a number that an average could hide.
    return loss + torch.where(loss.isinf(), float("nan"), 0.0).detach()
