"""The loss's execution paths, one backend each (`base.Backend`), chosen once per call by `choose_backend`:

- `reference`: torch operations, any target, differentiable to any order (`reference.py`);
- `C kernel`: float32 logits on the CPU, a compiled kernel (`c_kernel.py`, `fused_cpu.c`);
- `Triton`: float32 and half-precision logits on CUDA (`triton.py`);
- `blockwise`: torch operations on blocks of rows, for everything else (`blockwise.py`).

`family.py` runs the calibration-loss family (focal, FLSD-53, MbLS, MaxSup, LogitNorm, the confidence penalty) on
the same backends: `fused_family_loss`.

The last three are fused: they compute the gradient with the loss, through the autograd Function of `autograd.py`,
which receives the backend.
"""

from __future__ import annotations

from torch import Tensor

from fastai_ls.loss.backends import c_kernel, triton
from fastai_ls.loss.backends.base import Backend, RowLoss
from fastai_ls.loss.backends.blockwise import BLOCKWISE
from fastai_ls.loss.backends.reference import REFERENCE
from fastai_ls.loss.checks import has_forward_tangent, under_functorch_transform

__all__ = ["Backend", "RowLoss", "choose_backend"]

LABEL_SMOOTHING = RowLoss()


def choose_backend(input: Tensor, target: Tensor, weight: Tensor | None, fused: bool | None,
                   spec: RowLoss = LABEL_SMOOTHING) -> Backend:
    """The backend that computes the loss of `input` against `target` (checked arguments): the reference one for
    probability targets, for `fused=False`, under `torch.func` transforms and for forward-mode AD's dual tensors (the
    fused Function has no functorch rules and no forward derivative: its kernels read data pointers); else the first
    fused backend that takes the logits."""
    if fused is False or target.is_floating_point() or under_functorch_transform() \
            or has_forward_tangent(input, weight):
        return REFERENCE
    if c_kernel.accepts(input):
        return c_kernel.C_KERNEL
    if triton.accepts(input):
        return triton.TRITON
    return BLOCKWISE
