"""The blockwise backend: the fused loss's arithmetic as torch operations on blocks of rows that stay in cache, one
fused softmax per block, then a scale and shift in place. It takes what the kernels do not: float64 and half-precision
logits, CUDA without Triton, and installs without a C compiler.

For hard targets the gradient of `formula`'s loss is known in forward, up to the scalar that backward receives:

    d loss_row / d x_c = mass * exp(z_c) / s - w_c q_c,    w_c q_c = (1 - eps) w_y [c == y] + (eps / C) w_c
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastai_ls.loss.backends.autograd import FusedBackend
from fastai_ls.loss.backends.base import RowLoss, Targets, scale_gradient
from fastai_ls.loss.backends.family import family_rows
from fastai_ls.loss.checks import check_ids, weight_in
from fastai_ls.loss.formula import (
    cross_entropy,
    hard_target_mix,
    kept_targets,
    mean_divisor,
    nan_for_infinite_logits,
    reduce_loss,
    weighted_row_sum,
)
from fastai_ls.validation import compute_dtype, upcast

__all__ = ["BlockwiseBackend", "BLOCKWISE"]

# Bytes of logits per block of the torch path: a block and its gradient mostly stay in a 32 MiB L3. Measured on a
# 2-core EPYC (1 MiB L2 per core) between other losses' runs, in times the floor: 4096 x 1000 1.6x with 16 MiB blocks
# (one block) vs 2.1x with 8 MiB and 2.7x with 1 MiB; 16384 x 1000 and 2048 x 32000 equal from 8 to 16 MiB, worse
# below (each block pays Python and thread start-up costs per operation).
BLOCK_BYTES = 16 * 2**20


class BlockwiseBackend(FusedBackend):
    """The ids and weights are checked in `prepare` (one host read for both; on a GPU, for float64 logits or without
    Triton, the only synchronization of the loss, forward and backward)."""

    name = "blockwise"

    def accepts(self, input: Tensor) -> bool:
        return True

    def prepare(self, input: Tensor, t: Tensor, weight: Tensor | None, ignore_index: int) -> Targets:
        w, y, ignored, divisor = _checked_targets(input, t, weight, ignore_index)
        return Targets(y, ignored, w, divisor)

    def forward(self, input: Tensor, x: Tensor, targets: Targets, spec: RowLoss, reduction: str, ignore_index: int,
                grad: Tensor | None) -> Tensor:
        if grad is not None and reduction == "mean":
            # 'mean' divides every row by the divisor. On the host, fold it into the gradient now, as a Python number
            # (cheapest in the per-block arithmetic); on a GPU reading it would stall the device, so backward applies
            # it.
            if x.is_cpu:
                targets.scale = 1 / mean_divisor(float(targets.divisor))
            else:
                targets.divide_in_backward = True
        if spec.kind != "label_smoothing":
            loss = _family_loss_and_grad(x, targets, spec, grad)
        else:
            loss = _loss_and_grad(x, targets.y, targets.ignored, targets.w, targets.scale, spec.eps, grad,
                                  spec.z_loss)
        return reduce_loss(loss, targets.divisor, reduction, input.shape[:1] + input.shape[2:])

    def backward(self, grad: Tensor, grad_loss: Tensor, targets: Targets, reduction: str,
                 ignore_index: int) -> Tensor:
        return scale_gradient(grad, grad_loss, reduction == "none",
                              targets.divisor if targets.divide_in_backward else None, targets.ignored)


BLOCKWISE = BlockwiseBackend()


def _checked_targets(input: Tensor, t: Tensor, weight: Tensor | None, ignore_index: int):
    """The weights in the compute dtype, and `kept_targets`' ids, ignored-row mask
    and 'mean' divisor, after checking the weights' and ids' values (one host read for both; on a GPU, for float64
    logits or without Triton, the only synchronization of the loss, forward and backward)."""
    id_range = check_ids(t, input.shape[1], ignore_index, weight)
    dtype = compute_dtype(input.dtype)
    w = weight_in(weight, dtype, input.device)
    # An ignore_index outside the ids' range matches no row: then no mask is needed.
    may_ignore = id_range is None or id_range[0] <= ignore_index <= id_range[1]
    y, ignored, divisor = kept_targets(t, ignore_index, w, dtype, may_ignore)
    return w, y, ignored, divisor


def _family_loss_and_grad(x: Tensor, targets: Targets, spec: RowLoss, grad: Tensor | None) -> Tensor:
    """`family.family_rows` of the rows `x`, ignored rows 0 (their logits are not read: they may hold anything)."""
    x = upcast(x)
    if targets.ignored is not None:
        x = x.masked_fill(targets.ignored[:, None], 0.0)
    loss = family_rows(x, targets.y, spec, targets.w, targets.scale, grad)
    if targets.ignored is not None:
        loss.masked_fill_(targets.ignored, 0.0)
        if grad is not None:
            grad.masked_fill_(targets.ignored[:, None], 0.0)
    return nan_for_infinite_logits(loss)


def _loss_and_grad(x: Tensor, y: Tensor, ignored: Tensor | None, w: Tensor | None, scale: float, eps: float,
                   grad: Tensor | None, z_loss: float = 0.0) -> Tensor:
    """Per-row losses of `x` (M, C), ignored rows 0; with `grad`, writes into it the gradient of `scale` * their
    sum, ignored rows zero."""
    n_classes = x.shape[1]
    # The gradient's target part w q: (eps/C) w_c on every class, plus (1 - eps) w_y on the true class.
    smooth = (eps / n_classes) * scale if w is None else w * ((eps / n_classes) * scale)
    true_class = (1 - eps) * scale if w is None else w[y] * ((1 - eps) * scale)
    loss = _blockwise_loss_and_grad(x, y, ignored, w, scale, eps, smooth, true_class, grad, z_loss)
    if ignored is not None:
        loss.masked_fill_(ignored, 0.0)
    return nan_for_infinite_logits(loss) if bool(loss.isinf().any()) else loss


def _blockwise_loss_and_grad(x: Tensor, y: Tensor, ignored: Tensor | None, w: Tensor | None, scale: float,
                             eps: float, smooth: Tensor | float, true_class: Tensor | float,
                             grad: Tensor | None, z_loss: float = 0.0) -> Tensor:
    """`_loss_and_grad` with torch operations on blocks of rows that stay in cache; `ignored` None: no such rows;
    `grad` None: the loss alone (each block's softmax goes to a scratch block)."""
    n_rows, n_classes = x.shape
    dtype = compute_dtype(x.dtype)
    block_rows = max(1, BLOCK_BYTES // (n_classes * dtype.itemsize))
    # Half-precision gradients are computed in a float32 block and rounded once, on the way into the buffer.
    scratch = None
    if grad is None or grad.dtype != dtype:
        scratch = x.new_empty(min(block_rows, n_rows), n_classes, dtype=dtype)
    y = y[:, None]
    losses = []
    for start in range(0, n_rows, block_rows):
        rows = slice(start, start + block_rows)
        # One block (small inputs) is the whole tensor, unsliced: the Python cost of slicing shows at 64 x 37.
        xb, yb = (upcast(x), y) if n_rows <= block_rows else (upcast(x[rows]), y[rows])
        p = (grad if n_rows <= block_rows else grad[rows]) if scratch is None else scratch[: xb.shape[0]]
        # One fused softmax kernel does the max, exp and sum passes in cache; its largest value is exp(0) / s, so
        # log s = -log(max p). The formula takes the shifted logits z = x - max, whose row sums are formed here
        # from the unshifted ones: shifting first keeps small losses exact, as on the reference path.
        row_max = xb.amax(1)
        z_y = xb.gather(1, yb).squeeze(1) - row_max
        wz = weighted_row_sum(xb, w) - (n_classes if w is None else w.sum()) * row_max if eps else None
        mass, dot = hard_target_mix(z_y, wz, yb.squeeze(1), eps, w, n_classes)
        torch.softmax(xb, 1, out=p)
        log_s = p.amax(1).log_().neg_()
        loss = cross_entropy(log_s, mass, dot)
        if z_loss:  # + z_loss w_y lse^2, whose gradient 2 z_loss w_y lse softmax joins the mass's
            w_y = 1.0 if w is None else w[yb.squeeze(1)]
            lse = row_max + log_s
            loss = loss + z_loss * w_y * lse * lse
            mass = mass + 2 * z_loss * w_y * lse
        losses.append(loss)
        if grad is None:
            continue
        # Turn the softmax into scale * (mass * softmax - w q) without leaving the block: one pass scales and
        # subtracts the smoothing part (-smooth + scale * p, written over p), a scatter the true class's part.
        if z_loss:  # a coefficient per row
            torch.addcmul(p.new_tensor(-smooth) if w is None else -smooth, p, mass[:, None] * scale, out=p)
            if w is None:
                p.scatter_(1, yb, -true_class, reduce="add")
            else:
                p.scatter_add_(1, yb, -true_class[rows, None])
        elif w is None:
            torch.add(p.new_tensor(-smooth), p, alpha=scale, out=p)
            p.scatter_(1, yb, -true_class, reduce="add")
        else:
            torch.addcmul(-smooth, p, mass[:, None] * scale, out=p)
            p.scatter_add_(1, yb, -true_class[rows, None])
        if ignored is not None:  # zero, not scaled by zero: an ignored row may hold non-finite logits
            p.masked_fill_(ignored[rows, None], 0.0)
        if scratch is not None:
            grad[rows].copy_(p)
    if not losses:  # an empty batch
        return x.new_zeros(0, dtype=dtype)
    return losses[0] if len(losses) == 1 else torch.cat(losses)
