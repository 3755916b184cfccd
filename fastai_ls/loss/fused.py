"""Fused label-smoothing cross-entropy for integer targets: loss and gradient in about one pass over the logits, or,
when no gradient will be taken (fastai's validation, `get_preds`), the loss alone in one read of the logits.

For hard targets the gradient of `formula`'s loss is known in forward, up to the scalar that backward receives:

    d loss_row / d x_c = mass * exp(z_c) / s - w_c q_c,    w_c q_c = (1 - eps) w_y [c == y] + (eps / C) w_c

so forward writes it into one N x C buffer and backward only scales that buffer (or, after `loss.backward()`, does
nothing at all). Three implementations of this arithmetic, chosen by where the logits are:

- float32 on the CPU: a compiled C kernel (`fused_cpu.c`, via `cpu_kernel.py`) that reads each row once and finishes
  its gradient while the row is in cache; it checks the ids and weights itself as it reads them;
- CUDA: Triton kernels (`triton_kernel.py`): one launch checks the ids and weights (the loss's one host read), one
  computes the loss and, when a gradient will be taken, writes it, 'mean' divisor included; backward's product with
  what autograd hands in touches no row after `loss.backward()`;
- anything else (float64, half precision, or an install without a C compiler): torch operations on blocks of rows
  that stay in cache, one fused softmax per block, then a scale and shift in place.

The logits are only read, never written: fastai reuses them for metrics, and MixUp calls the loss twice on them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastai_ls.loss import cpu_kernel, triton_kernel
from fastai_ls.loss.checks import check_ids, is_batched, weight_in
from fastai_ls.loss.formula import (
    cross_entropy,
    hard_target_mix,
    kept_targets,
    mean_divisor,
    nan_for_infinite_logits,
    reduce_loss,
    reference_cross_entropy,
    weighted_row_sum,
)
from fastai_ls.validation import compute_dtype, upcast

__all__ = ["fused_cross_entropy", "fused_loss"]

# Bytes of logits per block of the torch path: a block and its gradient mostly stay in a 32 MiB L3. Measured on a
# 2-core EPYC (1 MiB L2 per core) between other losses' runs, in times the floor: 4096 x 1000 1.6x with 16 MiB blocks
# (one block) vs 2.1x with 8 MiB and 2.7x with 1 MiB; 16384 x 1000 and 2048 x 32000 equal from 8 to 16 MiB, worse
# below (each block pays Python and thread start-up costs per operation).
BLOCK_BYTES = 16 * 2**20


def fused_cross_entropy(input: Tensor, t: Tensor, eps: float, weight: Tensor | None, reduction: str,
                        ignore_index: int) -> Tensor:
    """`label_smoothing_cross_entropy` for flat int64 ids `t` (`checks.class_ids`) and uniform `eps`, with a
    precomputed gradient. The ids and weights are checked here: by the C kernel as it reads them, else before the
    loss is computed."""
    if cpu_kernel.accepts(input):  # the kernel also finds the ignored rows and the 'mean' divisor itself
        w = weight_in(weight, torch.float32, input.device)
        return _FusedCrossEntropy.apply(input, t, None, w, C_KERNEL, eps, reduction, ignore_index)
    if _uses_triton(input):  # weights are checked and converted in forward; backward's kernel reads the ids too
        return _FusedCrossEntropy.apply(input, t.contiguous(), None, weight, TRITON, eps, reduction, ignore_index)
    w, y, ignored, divisor = _checked_targets(input, t, weight, ignore_index)
    return _FusedCrossEntropy.apply(input, y, ignored, w, divisor, eps, reduction, ignore_index)


def fused_loss(input: Tensor, t: Tensor, eps: float, weight: Tensor | None, reduction: str,
               ignore_index: int) -> Tensor:
    """`fused_cross_entropy` without a gradient (none is recorded): the loss from one read of the logits."""
    x = _rows(input)
    if cpu_kernel.accepts(input):
        w = weight_in(weight, torch.float32, input.device)
        loss = cpu_kernel.loss_and_grad(x, t, ignore_index, w, eps, reduction == "mean", None, reduction == "none")
        return _per_position(loss, input.shape) if reduction == "none" else loss
    if _uses_triton(input):
        return _triton_loss(input, x, t, weight, eps, reduction, ignore_index, None)
    w, y, ignored, divisor = _checked_targets(input, t, weight, ignore_index)
    loss = _loss_and_grad(x, y, ignored, w, 1.0, eps, None)
    return reduce_loss(loss, divisor, reduction, input.shape[:1] + input.shape[2:])


def _per_position(loss: Tensor, input_shape: torch.Size) -> Tensor:
    """Per-row losses in the target's shape (N, d1, ...); for (N, C) logits already so (a reshape costs ~1 us)."""
    return loss if len(input_shape) == 2 else loss.reshape(input_shape[:1] + input_shape[2:])


C_KERNEL, TRITON = "C kernel", "Triton"  # `_FusedCrossEntropy`'s divisor argument for the kernels' paths


def _triton_loss(input: Tensor, x: Tensor, t: Tensor, weight: Tensor | None, eps: float, reduction: str,
                 ignore_index: int, grad: Tensor | None) -> Tensor:
    """The loss of `input` (its rows `x`) from the Triton kernels, and its gradient written into `grad` unless
    None. The check and the loss are queued together; then one host read of the check's counters (the loss's one
    synchronization) raises `check_ids`' errors for bad ids or weights before anything is returned."""
    # The kernels index the ids and weights with unit stride: a column of a 2-D target, or a strided or expanded
    # weight, would be read wrong (and past its end) without a contiguous copy, made once here for both kernels.
    t = t.contiguous()
    w = weight_in(weight, torch.float32, input.device)
    w = None if w is None else w.contiguous()
    # Triton launches on the current device, not the tensors' one: logits on cuda:1 while cuda:0 is current would be
    # refused (or read through the wrong context). Backward needs no guard: autograd runs it on the device's thread.
    # (-1, a no-op, for the CPU tensors that Triton's interpreter runs in the tests.)
    with torch.cuda.device(x.device.index if x.is_cuda else -1):
        counters, divisor = triton_kernel.check(t, w, input.shape[1], ignore_index)
        loss = triton_kernel.loss_and_grad(x, t, w, eps, ignore_index, grad,
                                           divisor if reduction == "mean" else None)
    if reduction == "none":
        loss = _per_position(loss, input.shape)
    elif reduction == "mean" and x.shape[0] == 0:  # no row to carry the kernel's NaN for a zero divisor
        loss = torch.full((), math.nan, device=x.device)
    else:
        loss = loss.sum()
    _raise_if_flagged(counters, t, input.shape[1], ignore_index, weight)
    return loss


def _raise_if_flagged(counters: Tensor, t: Tensor, n_classes: int, ignore_index: int,
                      weight: Tensor | None) -> None:
    flags = int(counters[0])  # the host read
    if flags:
        check_ids(t, n_classes, ignore_index, weight)  # the message names the bad ids (or weights)
        raise RuntimeError(f"the GPU check found bad ids or weights (flags {flags}) that check_ids did not")


def _checked_targets(input: Tensor, t: Tensor, weight: Tensor | None, ignore_index: int):
    """For the blockwise torch path: the weights in the compute dtype, and `kept_targets`' ids, ignored-row mask
    and 'mean' divisor, after checking the weights' and ids' values (one host read for both; on a GPU, for float64
    logits or without Triton, the only synchronization of the loss, forward and backward)."""
    id_range = check_ids(t, input.shape[1], ignore_index, weight)
    dtype = compute_dtype(input.dtype)
    w = weight_in(weight, dtype, input.device)
    # An ignore_index outside the ids' range matches no row: then no mask is needed.
    may_ignore = id_range is None or id_range[0] <= ignore_index <= id_range[1]
    y, ignored, divisor = kept_targets(t, ignore_index, w, dtype, may_ignore)
    return w, y, ignored, divisor


def _gradient_buffer(x: Tensor) -> Tensor:
    """An uninitialized (M, C) buffer for the gradient of `x`.

    From 32 MiB (glibc's largest mmap threshold) it is fresh pages on every call, and faulting them in, 4 KiB at a
    time, costs more than the kernel (16384 x 1000: 16,000 faults). Asking for transparent huge pages here
    (madvise) cut that 3x in most runs, but on this project's VM it also made some calls of 512 x 128000 3 to 7x
    slower (the first huge-page faults after other large allocations), so the choice is left to the user:
    THP_MEM_ALLOC_ENABLE=1 makes torch ask for huge pages for every large tensor."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _rows(input: Tensor) -> Tensor:
    """(M, C) logits, class axis last: a view for (N, C) and (N, d1, ..., C)-ordered memory, else a copy.
    No upcast here: blocks are upcast one at a time, so half-precision logits never get a float32 copy."""
    return input if input.dim() == 2 else input.movedim(1, -1).reshape(-1, input.shape[1])


class _FusedCrossEntropy(torch.autograd.Function):
    """Loss and gradient in forward; backward scales the stored gradient in place and hands the buffer out.

    `divisor` `C_KERNEL` selects the C kernel and `TRITON` the Triton kernels: `y` holds the raw ids, `ignored` is
    None (and for Triton `w` the weights as given). Otherwise `y`, `ignored` and `divisor` come from `kept_targets`
    (the blockwise torch path)."""

    @staticmethod
    def forward(ctx, input: Tensor, y: Tensor, ignored: Tensor | None, w: Tensor | None,
                divisor: Tensor | int | None, eps: float, reduction: str, ignore_index: int) -> Tensor:
        # The (M, C) rows are made here, not by the caller: a copy made outside would be kept by autograd until
        # backward, and its backward would copy the gradient once more.
        x = _rows(input)
        grad = _gradient_buffer(x)
        ctx.save_for_backward(input, y, ignored, w)
        ctx.eps, ctx.reduction, ctx.ignore_index, ctx.grad = eps, reduction, ignore_index, grad
        ctx.input_shape = input.shape  # backward reads the saved tensors only to recompute
        ctx.path = "torch"
        if divisor is C_KERNEL:  # the kernel also reduces the loss (in double precision) and applies the 'mean'
            ctx.path, ctx.scale, ctx.divisor = "c", None, None
            loss = cpu_kernel.loss_and_grad(x, y, ignore_index, w, eps, reduction == "mean", grad,
                                            reduction == "none")
            return _per_position(loss, input.shape) if reduction == "none" else loss
        if divisor is TRITON:  # the gradient is written with the 'mean' divisor applied
            ctx.path, ctx.scale, ctx.divisor = "triton", None, None
            return _triton_loss(input, x, y, w, eps, reduction, ignore_index, grad)
        # 'mean' divides every row by the divisor. On the host, fold it into the gradient now, as a Python number
        # (cheapest in the per-block arithmetic); on a GPU reading it would stall the device, so backward applies it.
        ctx.scale = 1 / mean_divisor(float(divisor)) if reduction == "mean" and x.is_cpu else 1.0
        ctx.divisor = divisor if reduction == "mean" and not x.is_cpu else None
        loss = _loss_and_grad(x, y, ignored, w, ctx.scale, eps, grad)
        return reduce_loss(loss, divisor, reduction, input.shape[:1] + input.shape[2:])

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: the gradient must be differentiable in its turn
            ctx.grad = None
            return (_differentiable_gradient(ctx, grad_loss),) + (None,) * 7
        grad, ctx.grad = ctx.grad, None  # handed out below: holding on to it would keep a second N x C buffer alive
        input, y, ignored, w = ctx.saved_tensors
        if grad is None:  # a later backward of a retained graph: the first one gave the buffer away
            x = _rows(input)
            grad = _gradient_buffer(x)
            if ctx.path == "c":
                cpu_kernel.loss_and_grad(x, y, ctx.ignore_index, w, ctx.eps, ctx.reduction == "mean", grad, False)
            elif ctx.path == "triton":
                _triton_loss(input, x, y, w, ctx.eps, ctx.reduction, ctx.ignore_index, grad)
            else:
                _loss_and_grad(x, y, ignored, w, ctx.scale, ctx.eps, grad)
        grad = _scale_gradient(ctx, grad, grad_loss, y, ignored)
        shape = ctx.input_shape
        if len(shape) > 2:  # back to the input's layout, as a view of the same buffer
            grad = grad.view(*shape[:1], *shape[2:], shape[1]).movedim(-1, 1)
        return grad, None, None, None, None, None, None, None


def _differentiable_gradient(ctx, grad_loss: Tensor) -> Tensor:
    """The gradient as a function of the saved logits and of `grad_loss` that autograd can differentiate again
    (backward with create_graph=True: second derivatives, gradient penalties, MAML's inner steps): the reference
    path's, recomputed from the logits, so the kernels need no derivative of their own."""
    input, y, ignored, w = ctx.saved_tensors
    ids = y if ignored is None else y.masked_fill(ignored, ctx.ignore_index)  # back to the ids the caller gave
    loss = reference_cross_entropy(input, ids, ctx.eps, w, ctx.reduction, ctx.ignore_index)
    return torch.autograd.grad(loss, input, grad_loss, create_graph=True)[0]


def _scale_gradient(ctx, grad: Tensor, grad_loss: Tensor, y: Tensor, ignored: Tensor | None) -> Tensor:
    """The stored gradient times what backward received, leaving ignored rows 0 whatever it holds: a NaN or
    infinite `grad_loss` must not turn their zeros into NaN (PyTorch's gradient there is 0 too).

    In place, except for a batch of `grad_loss`es (`autograd.grad(..., is_grads_batched=True)`, which `jacobian`
    and `hessian` use with vectorize=True): their product has a batch dimension that the buffer has not."""
    per_row = ctx.reduction == "none"
    batched = is_batched(grad_loss)
    if ctx.path == "triton" and not batched:  # no host read: the kernel skips the rows whose factor is 1
        return triton_kernel.scale_rows(grad, y, ctx.ignore_index, grad_loss.detach())
    if not per_row and ctx.divisor is None and grad_loss.is_cpu and not batched:
        value = grad_loss.item()
        if value == 1:  # `loss.backward()` passes 1: skip a pass
            return grad
        if math.isfinite(value):  # ignored rows stay 0 * value = 0
            return grad.mul_(value)
    factor = grad_loss.reshape(-1) if per_row else grad_loss
    if ctx.divisor is not None and ctx.path == "torch":
        factor = factor / mean_divisor(ctx.divisor)
    if ctx.path != "torch":  # the kernels' raw ids: the ignored rows are found here, only when needed
        ignored = y == ctx.ignore_index
    if ignored is not None:
        factor = factor.expand(grad.shape[0]).masked_fill(ignored, 0.0)
    factor = factor[:, None] if factor.dim() else factor
    return grad * factor if batched else grad.mul_(factor)


def _loss_and_grad(x: Tensor, y: Tensor, ignored: Tensor | None, w: Tensor | None, scale: float, eps: float,
                   grad: Tensor | None) -> Tensor:
    """Per-row losses of `x` (M, C), ignored rows 0; with `grad`, writes into it the gradient of `scale` * their
    sum, ignored rows zero."""
    n_classes = x.shape[1]
    # The gradient's target part w q: (eps/C) w_c on every class, plus (1 - eps) w_y on the true class.
    smooth = (eps / n_classes) * scale if w is None else w * ((eps / n_classes) * scale)
    true_class = (1 - eps) * scale if w is None else w[y] * ((1 - eps) * scale)
    loss = _blockwise_loss_and_grad(x, y, ignored, w, scale, eps, smooth, true_class, grad)
    if ignored is not None:
        loss.masked_fill_(ignored, 0.0)
    return nan_for_infinite_logits(loss) if bool(loss.isinf().any()) else loss


def _uses_triton(x: Tensor) -> bool:
    """Whether the Triton kernels take these logits: CUDA, computed in float32 (so not float64), and fewer rows
    (positions) than the kernels' 32-bit grid and id offsets can count; more go to the blockwise path."""
    return (x.is_cuda and triton_kernel.AVAILABLE and x.dtype != torch.float64
            and x.numel() < triton_kernel.MAX_ROWS * max(1, x.shape[1]))


def _blockwise_loss_and_grad(x: Tensor, y: Tensor, ignored: Tensor | None, w: Tensor | None, scale: float,
                             eps: float, smooth: Tensor | float, true_class: Tensor | float,
                             grad: Tensor | None) -> Tensor:
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
        losses.append(cross_entropy(p.amax(1).log_().neg_(), mass, dot))
        if grad is None:
            continue
        # Turn the softmax into scale * (mass * softmax - w q) without leaving the block: one pass scales and
        # subtracts the smoothing part (-smooth + scale * p, written over p), a scatter the true class's part.
        if w is None:
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
