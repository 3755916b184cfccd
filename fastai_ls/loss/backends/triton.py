"""The Triton backend: kernels for the fused loss on CUDA tensors, the same loss and gradient as the blockwise
backend, in as few launches as PyTorch's own loss, so that small batches (fastai's 64 x 37 Pets) are not slower than
it.

- `check`: one launch reads the ids (and weights) and counts ids that are neither a class nor `ignore_index`, bad
  weights, and the kept rows (the 'mean' divisor). The caller launches the loss too, then reads the counters once
  (the loss's one host synchronization, after the GPU has done the work queued so far rather than before it
  starts) and raises on bad ids or weights before returning anything; the loss kernel never uses a bad id as an
  index, so running it first is safe.
- `loss_and_grad`: one program per row. It reads the row once for the max, log sum_c exp(x_c - max) (online) and
  sum_c w_c x_c, forms the row's loss from them (`formula`'s algebra: `hard_target_mix`, `cross_entropy`, written
  out for one row), and, with a gradient buffer, reads the row again (from cache; a row of at most MAX_BLOCK classes
  stays in registers) to write the gradient of the mean or sum, divisor included.
- `scale_rows`: backward's product of that gradient with what autograd hands in. `loss.backward()` hands in 1, and
  the kernel then touches no row: no host read is needed to find that out.

Tested on CPU tensors with Triton's interpreter (TRITON_INTERPRET=1), see tests/loss/test_fused.py.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastai_ls.loss.backends.autograd import FusedBackend
from fastai_ls.loss.backends.base import RowLoss, Targets, per_position
from fastai_ls.loss.backends.triton_family import family_loss_and_grad
from fastai_ls.loss.checks import check_ids, is_batched, weight_in

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without Triton: the blockwise torch path runs everywhere
    triton = tl = None

AVAILABLE = triton is not None
MAX_BLOCK = 4096  # columns per step: large enough to stream, small enough for registers
CHECK_BLOCK = 1024  # ids (and weights) per program of the check
MAX_ROWS = 2**31 - CHECK_BLOCK  # one program per row (CUDA's grid), and the check's offsets are 32-bit
BAD_IDS, BAD_WEIGHTS = 1, 2  # bits of `check`'s flags

__all__ = ["AVAILABLE", "BAD_IDS", "BAD_WEIGHTS", "MAX_ROWS", "accepts", "check", "loss_and_grad", "scale_rows",
           "TritonBackend", "TRITON"]


def accepts(x: Tensor) -> bool:
    """Whether the Triton kernels take these logits: CUDA, computed in float32 (so not float64), and fewer rows
    (positions) than the kernels' 32-bit grid and id offsets can count; more go to the blockwise backend."""
    return (x.is_cuda and AVAILABLE and x.dtype != torch.float64
            and x.numel() < MAX_ROWS * max(1, x.shape[1]))


class TritonBackend(FusedBackend):
    """The kernels as a backend: the ids are checked by a kernel queued with the loss (the weights are converted in
    `forward`), and backward's kernel reads the ids too."""

    name = "Triton"

    def accepts(self, input: Tensor) -> bool:
        return accepts(input)

    def prepare(self, input: Tensor, t: Tensor, weight: Tensor | None, ignore_index: int) -> Targets:
        return Targets(t.contiguous(), None, weight)

    def forward(self, input: Tensor, x: Tensor, targets: Targets, spec: RowLoss, reduction: str, ignore_index: int,
                grad: Tensor | None) -> Tensor:
        # the gradient is written with the 'mean' divisor applied
        return _triton_loss(input, x, targets.y, targets.w, spec, reduction, ignore_index, grad)

    def backward(self, grad: Tensor, grad_loss: Tensor, targets: Targets, reduction: str,
                 ignore_index: int) -> Tensor:
        if is_batched(grad_loss):
            return super().backward(grad, grad_loss, targets, reduction, ignore_index)
        # No host read: the kernel skips the rows whose factor is 1.
        return scale_rows(grad, targets.y, ignore_index, grad_loss.detach())


TRITON = TritonBackend()


def _triton_loss(input: Tensor, x: Tensor, t: Tensor, weight: Tensor | None, spec: RowLoss, reduction: str,
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
        counters, divisor = check(t, w, input.shape[1], ignore_index)
        divisor = divisor if reduction == "mean" else None
        if spec.kind == "label_smoothing":
            loss = loss_and_grad(x, t, w, spec.eps, ignore_index, grad, divisor, spec.z_loss)
        else:
            loss = family_loss_and_grad(x, t, w, spec, ignore_index, grad, divisor)
    if reduction == "none":
        loss = per_position(loss, input.shape)
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


def check(t: Tensor, w: Tensor | None, n_classes: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Launches the check of contiguous int64 ids `t` (and float32 weights `w`, contiguous) and returns, on the
    device, without waiting:
    the counters (int64: the flags, `BAD_IDS` for an id neither in [0, n_classes) nor `ignore_index` and
    `BAD_WEIGHTS` for a negative or non-finite weight; then the number of kept rows) and the 'mean' divisor (a 0-d
    view of that count, or with weights the sum of the kept rows' weights)."""
    n_programs = max(1, triton.cdiv(t.numel(), CHECK_BLOCK), triton.cdiv(n_classes, CHECK_BLOCK) if w is not None
                     else 0)
    # One program (a batch of up to CHECK_BLOCK ids) stores its counts; several add theirs to zeroed counters.
    counters = (torch.empty if n_programs == 1 else torch.zeros)(2, dtype=torch.int64, device=t.device)
    partial = torch.empty(n_programs, dtype=torch.float32, device=t.device) if w is not None else None
    _check_kernel[(n_programs,)](t, counters if w is None else w, counters, counters if w is None else partial,
                                 t.numel(), n_classes, ignore_index, HAS_WEIGHT=w is not None,
                                 ONE_PROGRAM=n_programs == 1, BLOCK=CHECK_BLOCK)
    return counters, counters[1] if partial is None else partial.sum()  # deterministic: no float atomics


def loss_and_grad(x: Tensor, t: Tensor, w: Tensor | None, eps: float, ignore_index: int, grad: Tensor | None,
                  divisor: Tensor | None = None, z_loss: float = 0.0) -> Tensor:
    """Per-row float32 losses of `x` (M, C) against contiguous int64 ids `t` (contiguous float32 weights `w`),
    ignored rows 0, a row's +-inf loss NaN; with a
    `divisor` (0-d, on the device: 'mean') each divided by it, so that their sum is the mean (NaN where the divisor
    is not positive, as PyTorch's). With `grad` (contiguous, M x C) writes the gradient of their sum into it.
    `z_loss` adds z_loss w_y lse^2 to each row.

    The ids need not have been checked yet: an id that is no class is never used as an index (its row's loss is
    meaningless, and the caller raises), so the kernel can run before the check's result reaches the host."""
    n_rows, n_classes = x.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:  # no program to launch
        return loss
    x = x if x.stride(1) == 1 else x.contiguous()  # the kernel walks each row with unit stride
    block, num_warps = _launch_shape(n_classes)
    _loss_kernel[(n_rows,)](
        x, t, loss if w is None else w, loss, x if grad is None else grad, loss if divisor is None else divisor,
        x.stride(0), 0 if grad is None else grad.stride(0), n_classes, ignore_index, float(eps), float(z_loss),
        HAS_WEIGHT=w is not None, SMOOTH=eps != 0, Z_LOSS=z_loss != 0, WRITE_GRAD=grad is not None,
        HAS_DIVISOR=divisor is not None,
        SINGLE_BLOCK=n_classes <= block, BLOCK=block, num_warps=num_warps)
    return loss


def scale_rows(grad: Tensor, t: Tensor, ignore_index: int, factor: Tensor) -> Tensor:
    """`grad` (M, C, contiguous) times `factor` (0-d, or one per row) in place, `t` the contiguous ids; rows whose
    factor is 1 are not touched, ignored rows stay 0 whatever their factor (a NaN must not turn their zeros into
    NaN)."""
    n_rows, n_classes = grad.shape
    if n_rows == 0:
        return grad
    factor = factor.reshape(-1)  # 0-d: one element; per row: a view where possible (an expanded 1 has stride 0)
    block, num_warps = _launch_shape(n_classes)
    _scale_kernel[(n_rows,)](grad, t, factor, grad.stride(0), factor.stride(0) if factor.numel() > 1 else 0,
                             n_classes, ignore_index, BLOCK=block, num_warps=num_warps)
    return grad


def _launch_shape(n_classes: int) -> tuple[int, int]:
    """Columns per step and warps per program of the row kernels."""
    block = min(MAX_BLOCK, triton.next_power_of_2(n_classes))
    return block, 8 if block >= 2048 else 4


if AVAILABLE:

    @triton.jit
    def _check_kernel(t_ptr, w_ptr, counters_ptr, partial_ptr, n_ids, n_classes, ignore_index,
                      HAS_WEIGHT: tl.constexpr, ONE_PROGRAM: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n_ids
        t = tl.load(t_ptr + offsets, mask=inside, other=0)
        kept = inside & (t != ignore_index)
        valid = kept & (t >= 0) & (t < n_classes)
        bad_ids = tl.sum(tl.where(kept & ~valid, 1, 0), 0)
        flags = tl.where(bad_ids > 0, 1, 0)  # BAD_IDS
        if HAS_WEIGHT:
            classes = offsets < n_classes
            w = tl.load(w_ptr + offsets, mask=classes, other=0.0)
            good = (w >= 0) & (w < float("inf"))  # NaN fails both
            bad_weights = tl.sum(tl.where(classes & ~good, 1, 0), 0)
            flags += tl.where(bad_weights > 0, 2, 0)  # BAD_WEIGHTS
            w_t = tl.load(w_ptr + tl.where(valid, t, 0), mask=valid, other=0.0)
            tl.store(partial_ptr + tl.program_id(0), tl.sum(w_t, 0))
        n_kept = tl.sum(tl.where(kept, 1, 0), 0).to(tl.int64)
        if ONE_PROGRAM:
            tl.store(counters_ptr, flags.to(tl.int64))
            tl.store(counters_ptr + 1, n_kept)
        else:
            tl.atomic_or(counters_ptr, flags.to(tl.int64))
            tl.atomic_add(counters_ptr + 1, n_kept)

    @triton.jit
    def _loss_kernel(x_ptr, t_ptr, w_ptr, loss_ptr, grad_ptr, divisor_ptr, x_row_stride, grad_row_stride, n_classes,
                     ignore_index, eps, z_loss, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
                     Z_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr, HAS_DIVISOR: tl.constexpr,
                     SINGLE_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * x_row_stride
        t = tl.load(t_ptr + row)
        keep = t != ignore_index  # an ignored row is never read: it may hold anything
        # An id that is no class (the check reports it, and the caller raises) is never used as an index.
        valid = keep & (t >= 0) & (t < n_classes)
        target = tl.where(valid, t, 0)
        cols = tl.arange(0, BLOCK)
        # Pass 1: max, sum exp(x - max) online, sum w_c x_c and sum w_c.
        if SINGLE_BLOCK:
            inside = (cols < n_classes) & keep
            xb = tl.load(x_row + cols, mask=inside, other=-float("inf")).to(tl.float32)
            row_max = tl.max(xb, 0)
            shift = tl.where(row_max == -float("inf"), 0.0, row_max)  # all -inf: exp(-inf - -inf) would be NaN
            sum_exp = tl.sum(tl.exp(xb - shift), 0)
            xw = tl.where(inside, xb, 0.0)
            if HAS_WEIGHT:
                wb = tl.load(w_ptr + cols, mask=cols < n_classes, other=0.0)
                xw = xw * wb
                w_sum = tl.sum(wb, 0)
            else:
                w_sum = n_classes * 1.0
            wx = tl.sum(xw, 0)
        else:
            row_max = -float("inf")
            sum_exp = 0.0
            wx = 0.0
            w_sum = 0.0
            for start in range(0, n_classes, BLOCK):
                inside = (start + cols < n_classes) & keep
                xs = tl.load(x_row + start + cols, mask=inside, other=-float("inf")).to(tl.float32)
                new_max = tl.maximum(row_max, tl.max(xs, 0))
                shift = tl.where(new_max == -float("inf"), 0.0, new_max)
                sum_exp = sum_exp * tl.exp(row_max - shift) + tl.sum(tl.exp(xs - shift), 0)
                row_max = new_max
                xs = tl.where(inside, xs, 0.0)
                if HAS_WEIGHT:
                    ws = tl.load(w_ptr + start + cols, mask=start + cols < n_classes, other=0.0)
                    xs = xs * ws
                    w_sum += tl.sum(ws, 0)
                wx += tl.sum(xs, 0)
            if not HAS_WEIGHT:
                w_sum = n_classes * 1.0
        # The row's loss, on the shifted logits z = x - max (small losses stay exact): formula.hard_target_mix and
        # formula.cross_entropy. With eps = 0 the smoothing term is left out, not multiplied by 0.
        z_t = tl.load(x_row + target, mask=valid, other=0.0).to(tl.float32) - row_max
        w_t = tl.load(w_ptr + target, mask=valid, other=0.0) if HAS_WEIGHT else 1.0
        if SMOOTH:
            wz = wx - w_sum * row_max
            mass = (1 - eps) * w_t + (eps / n_classes) * w_sum if HAS_WEIGHT else 1.0
            dot = (1 - eps) * w_t * z_t + (eps / n_classes) * wz
        else:
            mass = w_t
            dot = w_t * z_t
        log_sum = tl.log(sum_exp)
        loss = mass * log_sum - dot
        lse = row_max + log_sum
        if Z_LOSS:  # + z_loss w_t lse^2, whose gradient 2 z_loss w_t lse softmax joins the mass's
            loss += z_loss * w_t * lse * lse
            mass += 2 * z_loss * w_t * lse
        # +-inf (a -inf logit where the target has mass) is reported as NaN, as on the other paths.
        loss = tl.where((loss == float("inf")) | (loss == -float("inf")), float("nan"), loss)
        loss = tl.where(keep, loss, 0.0)
        scale = 1.0
        if HAS_DIVISOR:  # an ignored row's 0 becomes NaN too when the divisor is 0: PyTorch's mean of nothing
            divisor = tl.load(divisor_ptr).to(tl.float32)
            scale = tl.where(divisor > 0, 1 / divisor, float("nan"))
            loss = loss * scale
        tl.store(loss_ptr + row, loss)
        if WRITE_GRAD:
            # d/dx_c of loss * scale = scale * (mass * softmax_c - (1 - eps) w_t [c == t] - eps/C w_c)
            row_coef = scale * mass
            true_coef = scale * (1 - eps) * w_t
            smooth = scale * (eps / n_classes)
            grad_row = grad_ptr + row * grad_row_stride
            if SINGLE_BLOCK:
                g = row_coef * tl.exp(xb - lse) - tl.where(cols == target, true_coef, 0.0)
                if SMOOTH:
                    g -= smooth * wb if HAS_WEIGHT else smooth
                g = tl.where(keep, g, 0.0)  # zero, not scaled by zero: an ignored row may hold non-finite logits
                tl.store(grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < n_classes)
            else:
                for start in range(0, n_classes, BLOCK):
                    inside = start + cols < n_classes
                    xs = tl.load(x_row + start + cols, mask=inside & keep, other=0.0).to(tl.float32)
                    g = row_coef * tl.exp(xs - lse) - tl.where(start + cols == target, true_coef, 0.0)
                    if SMOOTH:
                        if HAS_WEIGHT:
                            g -= smooth * tl.load(w_ptr + start + cols, mask=inside, other=0.0)
                        else:
                            g -= smooth
                    g = tl.where(keep, g, 0.0)
                    tl.store(grad_row + start + cols, g.to(grad_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _scale_kernel(grad_ptr, t_ptr, factor_ptr, grad_row_stride, factor_stride, n_classes, ignore_index,
                      BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        factor = tl.load(factor_ptr + row * factor_stride).to(tl.float32)
        t = tl.load(t_ptr + row)
        if (factor != 1.0) & (t != ignore_index):
            grad_row = grad_ptr + row * grad_row_stride
            cols = tl.arange(0, BLOCK)
            for start in range(0, n_classes, BLOCK):
                inside = start + cols < n_classes
                g = tl.load(grad_row + start + cols, mask=inside, other=0.0).to(tl.float32)
                tl.store(grad_row + start + cols, (g * factor).to(grad_ptr.dtype.element_ty), mask=inside)
