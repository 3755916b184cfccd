"""The Triton kernel of the calibration-loss family (`family.py`): one program per row sweeps it for the max (and the
norm, for LogitNorm), again for sum exp z and the loss's own row sum (and the raw logits' sum exp for LogitNorm's
z-loss), for the label-smoothed focal losses once more for each class's focal term, and, with a gradient buffer, a
last time to write the gradient: the closed form of `fused_cpu.c`'s family_row, in float32. Launched by
`triton._triton_loss` after the same check kernel as the label-smoothing loss.

Tested on CPU tensors with Triton's interpreter (TRITON_INTERPRET=1), see tests/loss/test_family_fused.py.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastai_ls.loss.backends.base import RowLoss
from fastai_ls.loss.backends.family import BINS, KIND_CODES, SMOOTHED_KINDS, kernel_params

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

__all__ = ["family_loss_and_grad"]

MAX_BLOCK = 4096


def family_loss_and_grad(x: Tensor, t: Tensor, w: Tensor | None, spec: RowLoss, ignore_index: int,
                         grad: Tensor | None, divisor: Tensor | None = None) -> Tensor:
    """Per-row float32 losses of `x` (M, C) for `spec`'s loss, as `triton.loss_and_grad` computes the
    label-smoothing ones (ids not yet checked, ignored rows 0, each divided by `divisor` if given, the gradient of
    their sum written into `grad` if given)."""
    n_rows, n_classes = x.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return loss
    x = x if x.stride(1) == 1 else x.contiguous()
    p0, p1, p2, z_loss, eps = (float(value) for value in kernel_params(spec))
    if spec.kind == "adaptive_focal":  # log p is compared with log(threshold), as in the C kernel and the formula
        p0 = math.log(p0) if p0 else -math.inf
    # AdaFocal's gammas, then its edges if there are any, as one float32 tensor on the device (no host read)
    bins = [spec.params[name] for name in BINS if spec.params.get(name) is not None]
    bins = torch.cat([b.reshape(-1).to(x.device, torch.float32) for b in bins]) if bins else loss
    block = min(MAX_BLOCK, triton.next_power_of_2(n_classes))
    _family_kernel[(n_rows,)](
        x, t, loss if w is None else w, loss, x if grad is None else grad, loss if divisor is None else divisor,
        bins, x.stride(0), 0 if grad is None else grad.stride(0), n_classes, ignore_index, p0, p1, p2, z_loss, eps,
        int(p1) if spec.kind == "ada_focal" else 0, KIND=KIND_CODES[spec.kind], HAS_WEIGHT=w is not None,
        WRITE_GRAD=grad is not None, HAS_DIVISOR=divisor is not None, Z_LOSS=z_loss > 0,
        SMOOTH=eps > 0 and spec.kind in SMOOTHED_KINDS, HAS_EDGES=p2 > 0, BLOCK=block,
        num_warps=8 if block >= 2048 else 4)
    return loss


if triton is not None:

    @triton.jit
    def _power(q, g):
        """q ** g for q >= 0, with 0 ** 0 = 1 (and no NaN from 0 * log 0)."""
        return tl.where(q > 0, tl.exp(g * tl.log(tl.maximum(q, 1e-38))), tl.where(g == 0, 1.0, 0.0))

    @triton.jit
    def _focal_term(log_p, gamma):
        """One class's focal term -(1 - p)^gamma log p and h = (1 - p)^gamma - gamma (1 - p)^(gamma - 1) p log p
        (fused_cpu.c's focal_term; the second part 0 where p rounds to 1, its limit)."""
        p = tl.exp(log_p)
        q = tl.maximum(1 - p, 0.0)
        f = _power(q, gamma)
        h = f - tl.where(q > 0, tl.where(gamma > 0, gamma * _power(q, gamma - 1) * p * log_p, 0.0), 0.0)
        return -f * log_p, h

    @triton.jit
    def _ada_focal_factor(ce, p_y, q, bins_ptr, n_bins, switch, HAS_EDGES: tl.constexpr):
        """AdaFocal's f and K (fused_cpu.c's ADA_FOCAL): gamma from p_y's bin, (1 - p_y)^gamma where
        gamma >= switch, else the inverse focal factor (1 + p_y)^|gamma|."""
        if HAS_EDGES:  # bins (e_b, e_b+1]: the number of inner edges below p_y
            bin = 0
            for i in range(1, n_bins):
                bin += tl.where(tl.load(bins_ptr + n_bins + i) < p_y, 1, 0)
        else:
            clamped = tl.where(p_y > 0, tl.where(p_y < 1, p_y, 1.0), 0.0)  # a NaN (an ignored row's) to 0
            bin = tl.minimum(tl.maximum(tl.ceil(clamped * n_bins).to(tl.int32) - 1, 0), n_bins - 1)
        gamma = tl.load(bins_ptr + bin)
        focal = gamma >= switch
        g = tl.abs(gamma)
        f = tl.where(focal, _power(q, tl.maximum(gamma, 0.0)), _power(1 + p_y, g))
        k_focal = tl.where((gamma > 0) & (q > 0), ce * gamma * _power(q, gamma - 1) * p_y, 0.0)
        k_inverse = tl.where(g > 0, -ce * g * _power(1 + p_y, g - 1) * p_y, 0.0)
        return f, tl.where(focal, k_focal, k_inverse)

    @triton.jit
    def _family_kernel(x_ptr, t_ptr, w_ptr, loss_ptr, grad_ptr, divisor_ptr, bins_ptr, x_row_stride,
                       grad_row_stride, n_classes, ignore_index, p0, p1, p2, z_loss, eps, n_bins,
                       KIND: tl.constexpr, HAS_WEIGHT: tl.constexpr, WRITE_GRAD: tl.constexpr,
                       HAS_DIVISOR: tl.constexpr, Z_LOSS: tl.constexpr, SMOOTH: tl.constexpr,
                       HAS_EDGES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * x_row_stride
        t = tl.load(t_ptr + row)
        keep = t != ignore_index  # an ignored row is never read
        valid = keep & (t >= 0) & (t < n_classes)  # an id that is no class is never used as an index
        target = tl.where(valid, t, 0)
        cols = tl.arange(0, BLOCK)
        # Sweep 1: the max (and the sum of squares).
        row_max = -float("inf")
        sum_sq = 0.0
        for start in range(0, n_classes, BLOCK):
            inside = (start + cols < n_classes) & keep
            xs = tl.load(x_row + start + cols, mask=inside, other=-float("inf")).to(tl.float32)
            row_max = tl.maximum(row_max, tl.max(xs, 0))
            if KIND == 5:
                sum_sq += tl.sum(tl.where(inside, xs * xs, 0.0), 0)
        norm = tl.sqrt(sum_sq)
        k = 1.0
        if KIND == 5:
            k = 1.0 / (p0 * (norm + 1e-7))
        shift = tl.where(row_max == -float("inf"), 0.0, row_max)
        below = row_max - p0  # MbLS: x_c < below is a class whose relu is positive
        # Sweep 2: s = sum exp z, the loss's own row sum, the first largest logit.
        s = 0.0
        s_raw = 0.0  # sum exp(x - max) of the raw logits: LogitNorm's z-loss
        extra = 0.0
        n_active = 0.0
        arg = n_classes
        for start in range(0, n_classes, BLOCK):
            inside = (start + cols < n_classes) & keep
            xs = tl.load(x_row + start + cols, mask=inside, other=-float("inf")).to(tl.float32)
            z = k * (xs - shift)
            e = tl.where(inside, tl.exp(z), 0.0)
            s += tl.sum(e, 0)
            if KIND == 3:
                active = inside & (xs < below)
                extra += tl.sum(tl.where(active, below - xs, 0.0), 0)
                n_active += tl.sum(tl.where(active, 1.0, 0.0), 0)
            if KIND == 4:
                extra += tl.sum(tl.where(inside, xs - shift, 0.0), 0)
            if KIND == 5:
                extra += tl.sum(tl.where(inside, e * xs, 0.0), 0)
            if KIND == 6:
                extra += tl.sum(tl.where(e > 0, e * z, 0.0), 0)
            if Z_LOSS:
                if KIND == 5:
                    s_raw += tl.sum(tl.where(inside, tl.exp(xs - shift), 0.0), 0)
            if (KIND == 3) | (KIND == 4):
                arg = tl.minimum(arg, tl.min(tl.where(inside & (xs == row_max), start + cols, n_classes), 0))
        log_s = tl.log(s)
        x_y = tl.load(x_row + target, mask=valid, other=0.0).to(tl.float32)
        z_y = k * (x_y - shift)
        w_y = tl.load(w_ptr + target, mask=valid, other=0.0) if HAS_WEIGHT else 1.0
        b = 0.0
        arg_add = 0.0
        if SMOOTH:  # the label-smoothed focal losses: each class's own term (sweep 3)
            w_terms = 0.0
            w_hs = 0.0
            term_y = 0.0
            h_y = 0.0
            for start in range(0, n_classes, BLOCK):
                inside = (start + cols < n_classes) & keep
                xs = tl.load(x_row + start + cols, mask=inside, other=0.0).to(tl.float32)
                log_p = (xs - shift) - log_s
                gamma = p0 if KIND == 1 else tl.where(log_p < p0, p1, p2)
                term, h = _focal_term(log_p, gamma)
                w_c = tl.load(w_ptr + start + cols, mask=inside, other=0.0) if HAS_WEIGHT else 1.0
                w_terms += tl.sum(tl.where(inside, w_c * term, 0.0), 0)
                w_hs += tl.sum(tl.where(inside, w_c * h, 0.0), 0)
                is_y = inside & (start + cols == target)
                term_y += tl.sum(tl.where(is_y, term, 0.0), 0)
                h_y += tl.sum(tl.where(is_y, h, 0.0), 0)
            loss = (1 - eps) * w_y * term_y + eps / n_classes * w_terms
            true_coef = (1 - eps) * w_y * h_y
            a = (true_coef + eps / n_classes * w_hs) / s
        elif (KIND <= 2) | (KIND == 7):  # focal (gamma p0), adaptive focal (log threshold p0, gamma_below p1,
            # gamma_above p2), AdaFocal (switch p0, n_bins bins)
            ce = w_y * (log_s - z_y)
            p_y = tl.exp(z_y - log_s)
            q = tl.maximum(1 - p_y, 0.0)
            if KIND == 7:
                f, big_k = _ada_focal_factor(ce, p_y, q, bins_ptr, n_bins, p0, HAS_EDGES)
            else:
                gamma = p0 if KIND == 1 else tl.where(z_y - log_s < p0, p1, p2)
                f = _power(q, gamma)
                big_k = tl.where((gamma > 0) & (q > 0), ce * gamma * _power(q, gamma - 1) * p_y, 0.0)
            loss = f * ce
            true_coef = f * w_y + big_k
            a = true_coef / s
        elif KIND == 3:  # MbLS: margin p0, alpha p1
            loss = w_y * (log_s - z_y + p1 / n_classes * extra)
            a = w_y / s
            b = w_y * p1 / n_classes
            true_coef = w_y
            arg_add = b * n_active
        elif KIND == 4:  # MaxSup: alpha p0
            loss = w_y * (log_s - z_y - p0 * extra / n_classes)
            a = w_y / s
            b = w_y * p0 / n_classes
            true_coef = w_y
            arg_add = w_y * p0
        elif KIND == 5:  # LogitNorm: tau p0
            loss = w_y * (log_s - z_y)
            a = w_y * k / s
            b = tl.where(norm > 0, w_y * (extra / s - x_y) / (norm * p0 * (norm + 1e-7)
                                                              * (norm + 1e-7)), 0.0)
            true_coef = w_y * k
        else:  # confidence penalty: beta p0
            b = extra / s
            loss = w_y * (log_s - z_y - p0 * (log_s - b))
            a = w_y / s
            true_coef = w_y
        zc = 0.0  # the z-loss's gradient zc exp(x - max) (of the raw logits)
        if Z_LOSS:
            if KIND != 5:
                s_raw = s
            lse = shift + tl.log(s_raw)
            loss += z_loss * w_y * lse * lse
            zc = 2 * z_loss * w_y * lse / s_raw
        loss = tl.where((loss == float("inf")) | (loss == -float("inf")), float("nan"), loss)
        loss = tl.where(keep, loss, 0.0)
        scale = 1.0
        if HAS_DIVISOR:
            divisor = tl.load(divisor_ptr).to(tl.float32)
            scale = tl.where(divisor > 0, 1 / divisor, float("nan"))
            loss = loss * scale
        tl.store(loss_ptr + row, loss)
        if WRITE_GRAD:
            grad_row = grad_ptr + row * grad_row_stride
            for start in range(0, n_classes, BLOCK):
                inside = start + cols < n_classes
                xs = tl.load(x_row + start + cols, mask=inside & keep, other=0.0).to(tl.float32)
                z = k * (xs - shift)
                e = tl.exp(z)
                if SMOOTH:
                    log_p = z - log_s
                    gamma = p0 if KIND == 1 else tl.where(log_p < p0, p1, p2)
                    _, h = _focal_term(log_p, gamma)
                    w_c = tl.load(w_ptr + start + cols, mask=inside, other=0.0) if HAS_WEIGHT else 1.0
                    g = a * e - eps / n_classes * w_c * h
                elif (KIND <= 2) | (KIND == 7):
                    g = a * e
                elif KIND == 3:
                    g = a * e - tl.where(xs < below, b, 0.0)
                elif KIND == 4:
                    g = a * e - b
                elif KIND == 5:
                    g = a * e - b * xs
                else:
                    g = tl.where(e > 0, a * e * (1 + p0 * (z - b)), 0.0)
                if Z_LOSS:
                    g += zc * (tl.exp(xs - shift) if KIND == 5 else e)
                g -= tl.where(start + cols == target, true_coef, 0.0)
                if (KIND == 3) | (KIND == 4):
                    g += tl.where(start + cols == arg, arg_add, 0.0)
                g = tl.where(keep, g * scale, 0.0)
                tl.store(grad_row + start + cols, g.to(grad_ptr.dtype.element_ty), mask=inside)
