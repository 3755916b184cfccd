"""The fused backends' base class and their autograd Function: the Function receives the backend, which computes
the loss and its gradient in forward; backward only scales the stored gradient (or, after `loss.backward()`, does
nothing at all).

For hard targets the gradient of the loss is known in forward, up to the scalar that backward receives, so forward
writes it into one N x C buffer and backward hands that buffer out. The logits are only read, never written: fastai
reuses them for metrics, and MixUp calls the loss twice on them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastai_ls.loss.backends.base import Backend, RowLoss, Targets, gradient_buffer, rows, scale_gradient
from fastai_ls.loss.backends.reference import REFERENCE
from fastai_ls.loss.checks import class_ids

__all__ = ["FusedBackend", "FusedLoss"]


class FusedLoss(torch.autograd.Function):
    """Loss and gradient in `backend.forward`; backward scales the stored gradient in place and hands the buffer
    out. Twice differentiable: backward with create_graph=True gets the reference backend's gradient."""

    @staticmethod
    def forward(ctx, input: Tensor, backend: FusedBackend, targets: Targets, spec: RowLoss, reduction: str,
                ignore_index: int) -> Tensor:
        # The (M, C) rows are made here, not by the caller: a copy made outside would be kept by autograd until
        # backward, and its backward would copy the gradient once more.
        x = rows(input)
        grad = gradient_buffer(x)
        loss = backend.forward(input, x, targets, spec, reduction, ignore_index, grad)
        ctx.save_for_backward(input, *targets.tensors())
        ctx.backend, ctx.targets, ctx.spec = backend, targets.without_tensors(), spec
        ctx.reduction, ctx.ignore_index, ctx.grad = reduction, ignore_index, grad
        ctx.input_shape = input.shape  # backward reads the saved tensors only to recompute
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        input, *saved = ctx.saved_tensors
        targets = ctx.targets.with_tensors(*saved)
        if torch.is_grad_enabled():  # create_graph=True: the gradient must be differentiable in its turn
            ctx.grad = None
            return (_differentiable_gradient(ctx, input, targets, grad_loss),) + (None,) * 5
        grad, ctx.grad = ctx.grad, None  # handed out below: holding on to it would keep a second N x C buffer alive
        if grad is None:  # a later backward of a retained graph: the first one gave the buffer away
            x = rows(input)
            grad = gradient_buffer(x)
            ctx.backend.forward(input, x, targets, ctx.spec, ctx.reduction, ctx.ignore_index, grad)
        grad = ctx.backend.backward(grad, grad_loss, targets, ctx.reduction, ctx.ignore_index)
        shape = ctx.input_shape
        if len(shape) > 2:  # back to the input's layout, as a view of the same buffer
            grad = grad.view(*shape[:1], *shape[2:], shape[1]).movedim(-1, 1)
        return grad, None, None, None, None, None


class FusedBackend(Backend):
    """A backend that computes the gradient with the loss: integer targets only."""

    def loss(self, input: Tensor, target: Tensor, spec: RowLoss, weight: Tensor | None, reduction: str,
             ignore_index: int) -> Tensor:
        targets = self.prepare(input, class_ids(target), weight, ignore_index)
        if input.requires_grad and torch.is_grad_enabled():
            return FusedLoss.apply(input, self, targets, spec, reduction, ignore_index)
        return self.forward(input, rows(input), targets, spec, reduction, ignore_index, None)

    def prepare(self, input: Tensor, t: Tensor, weight: Tensor | None, ignore_index: int) -> Targets:
        raise NotImplementedError

    def forward(self, input: Tensor, x: Tensor, targets: Targets, spec: RowLoss, reduction: str, ignore_index: int,
                grad: Tensor | None) -> Tensor:
        raise NotImplementedError

    def backward(self, grad: Tensor, grad_loss: Tensor, targets: Targets, reduction: str,
                 ignore_index: int) -> Tensor:
        """The stored gradient times `grad_loss`. The kernels' targets hold the raw ids, so the ignored rows are
        found here, only when needed."""
        return scale_gradient(grad, grad_loss, reduction == "none", None, None, lambda: targets.y == ignore_index)



def _differentiable_gradient(ctx, input: Tensor, targets: Targets, grad_loss: Tensor) -> Tensor:
    """The gradient as a function of the saved logits and of `grad_loss` that autograd can differentiate again
    (backward with create_graph=True: second derivatives, gradient penalties, MAML's inner steps): the reference
    backend's, recomputed from the logits, so the kernels need no derivative of their own."""
    y, ignored = targets.y, targets.ignored
    ids = y if ignored is None else y.masked_fill(ignored, ctx.ignore_index)  # back to the ids the caller gave
    loss = REFERENCE.loss(input, ids, ctx.spec, targets.w, ctx.reduction, ctx.ignore_index)
    return torch.autograd.grad(loss, input, grad_loss, create_graph=True)[0]
