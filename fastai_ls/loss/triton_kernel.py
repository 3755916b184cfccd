"""Triton kernels for the fused loss on CUDA tensors: the same loss and gradient as `fused.py`'s blockwise path.

Two kernels, one program per row, each walking the row in column blocks: the first reads the logits once for the
row max, log sum_c exp(x_c - max) (online) and sum_c w_c x_c, the second reads them again and writes the gradient. The
per-row algebra between them is `losses`' formula on row sums (`hard_target_mix`, `cross_entropy`).
Tested on CPU tensors with Triton's interpreter (TRITON_INTERPRET=1), see tests/test_fused.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastai_ls.loss.formula import cross_entropy, hard_target_mix

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without Triton: the blockwise torch path runs everywhere
    triton = tl = None

AVAILABLE = triton is not None
MAX_BLOCK = 4096  # columns per step: large enough to stream, small enough for registers

__all__ = ["AVAILABLE", "loss_and_grad"]


def loss_and_grad(x: Tensor, y: Tensor, ignored: Tensor | None, w: Tensor | None, scale: float, eps: float,
                  smooth: Tensor | float, true_class: Tensor | float, grad: Tensor | None) -> Tensor:
    """Per-row losses of `x` (M, C), and the gradient of `scale` * their sum written into `grad` (contiguous) unless
    it is None (then only the first kernel runs: one read of the logits)."""
    n_rows, n_classes = x.shape
    if n_rows == 0:  # no program to launch
        return x.new_zeros(0, dtype=torch.float32)
    # The kernels walk each row, the ids and the weights with unit stride: a column of a 2-D target, or a strided
    # or expanded weight, would be read wrong (and past its end) without a contiguous copy.
    x = x if x.stride(1) == 1 else x.contiguous()
    y = y if y.is_contiguous() else y.contiguous()
    w = w if w is None or w.is_contiguous() else w.contiguous()
    block = min(MAX_BLOCK, triton.next_power_of_2(n_classes))
    row_max = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    log_sum, wx = torch.empty_like(row_max), torch.empty_like(row_max)
    weight = w if w is not None else row_max  # any float32 pointer: unread without a weight
    _row_sums_kernel[(n_rows,)](x, weight, row_max, log_sum, wx, x.stride(0), n_classes, HAS_WEIGHT=w is not None,
                                BLOCK=block)
    # The formula on the shifted logits z = x - max (as on the other paths, so that small losses stay exact).
    z_y = x.gather(1, y[:, None]).squeeze(1).float() - row_max
    wz = wx - (n_classes if w is None else w.sum()) * row_max if eps else None
    mass, dot = hard_target_mix(z_y, wz, y, eps, w, n_classes)
    loss = cross_entropy(log_sum, mass, dot)
    if grad is None:
        return loss
    if ignored is None:  # no row is ignored
        ignored = torch.zeros(n_rows, dtype=torch.bool, device=x.device)
    ignored = ignored if ignored.is_contiguous() else ignored.contiguous()
    lse = row_max + log_sum
    row_coef, true_coef = (_per_row(value, n_rows, x.device) for value in (mass * scale, true_class))
    smooth_value = 0.0 if w is not None else float(smooth)
    _grad_kernel[(n_rows,)](x, grad, y, ignored, weight, lse, row_coef, true_coef, smooth_value,
                            (eps / n_classes) * scale, x.stride(0), grad.stride(0), n_classes,
                            HAS_WEIGHT=w is not None, BLOCK=block)
    return loss


def _per_row(value: Tensor | float, n_rows: int, device: torch.device) -> Tensor:
    """`value` (one per row, or one for all) as n_rows float32 numbers on `device`. A Python number is filled in
    on the device: `torch.as_tensor` would copy it from the host, a synchronizing copy."""
    if isinstance(value, Tensor):
        return value.to(torch.float32).expand(n_rows).contiguous()
    return torch.full((n_rows,), value, dtype=torch.float32, device=device)


if AVAILABLE:

    @triton.jit
    def _row_sums_kernel(x_ptr, w_ptr, max_ptr, log_sum_ptr, wx_ptr, x_row_stride, n_classes,
                         HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * x_row_stride
        running_max = -float("inf")
        sum_exp = 0.0
        wx = 0.0
        for start in range(0, n_classes, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < n_classes
            xb = tl.load(x_row + cols, mask=inside, other=-float("inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(xb, 0))
            # While every logit so far is -inf, shift by 0: exp(-inf - -inf) would be NaN.
            shift = tl.where(new_max == -float("inf"), 0.0, new_max)
            sum_exp = sum_exp * tl.exp(running_max - shift) + tl.sum(tl.exp(xb - shift), 0)
            running_max = new_max
            xb = tl.where(inside, xb, 0.0)
            if HAS_WEIGHT:
                xb = xb * tl.load(w_ptr + cols, mask=inside, other=0.0)
            wx += tl.sum(xb, 0)
        tl.store(max_ptr + row, running_max)
        tl.store(log_sum_ptr + row, tl.log(sum_exp))
        tl.store(wx_ptr + row, wx)

    @triton.jit
    def _grad_kernel(x_ptr, grad_ptr, y_ptr, ignored_ptr, w_ptr, lse_ptr, row_coef_ptr, true_coef_ptr, smooth,
                     smooth_per_weight, x_row_stride, grad_row_stride, n_classes, HAS_WEIGHT: tl.constexpr,
                     BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * x_row_stride
        grad_row = grad_ptr + row * grad_row_stride
        keep = tl.load(ignored_ptr + row).to(tl.int1) == 0
        target = tl.load(y_ptr + row)
        lse = tl.load(lse_ptr + row)
        row_coef = tl.load(row_coef_ptr + row)
        true_coef = tl.load(true_coef_ptr + row)
        for start in range(0, n_classes, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < n_classes
            xb = tl.load(x_row + cols, mask=inside, other=0.0).to(tl.float32)
            g = row_coef * tl.exp(xb - lse) - tl.where(cols == target, true_coef, 0.0)
            if HAS_WEIGHT:
                g -= smooth_per_weight * tl.load(w_ptr + cols, mask=inside, other=0.0)
            else:
                g -= smooth
            g = tl.where(keep, g, 0.0)  # zero, not scaled by zero: an ignored row may hold non-finite logits
            tl.store(grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=inside)
