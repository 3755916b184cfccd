"""What every execution path of the loss provides (`Backend`), the description of the per-row loss that it computes
(`RowLoss`), and the checked targets that it works on (`Targets`).

A backend is chosen once per call (`fastai_ls.loss.backends.choose_backend`) and then does the whole computation:

- `loss(input, target, spec, weight, reduction, ignore_index)`: the loss, ready for autograd. The reference backend
  builds it from torch operations; the fused ones (`autograd.FusedBackend`) compute the gradient in forward when one
  will be taken, through the autograd Function of `autograd.py`, which receives the backend and calls the three
  methods below;
- `prepare(input, t, weight, ignore_index)`: the ids and weights in the form `forward` reads (`Targets`), after
  checking their values, or leaving that to `forward` where the kernel checks them as it reads them;
- `forward(input, x, targets, spec, reduction, ignore_index, grad)`: the reduced loss (per position for 'none') of the
  (M, C) rows `x` of `input`, and, with a `grad` buffer, the gradient of that loss written into it;
- `backward(grad, grad_loss, targets, reduction, ignore_index)`: that gradient times what autograd hands in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

import torch
from torch import Tensor

from fastai_ls.loss.checks import is_batched
from fastai_ls.loss.formula import mean_divisor

__all__ = ["RowLoss", "Targets", "Backend", "rows", "gradient_buffer", "per_position",
           "scale_gradient"]


class RowLoss(NamedTuple):
    """The per-row loss that a backend computes, with its parameters: `kind` 'label_smoothing' (the label-smoothing
    cross-entropy, `eps` the uniform smoothing of `formula.uniform_eps`, `z_loss` the weight of the z-loss
    lambda w_y lse^2), or a loss of the calibration family (`family.KINDS`), whose parameters are `params` (name ->
    value; see `fused_family_loss`; AdaFocal's bins are tensors), with `eps` the focal losses' label smoothing and
    `z_loss` the z-loss's weight there too. A named tuple: one is made per call, and a tuple is the cheapest to
    make."""

    eps: float = 0.0
    z_loss: float = 0.0
    kind: str = "label_smoothing"
    params: Mapping[str, float | Tensor | None] = MappingProxyType({})


@dataclass
class Targets:
    """The ids and weights of one call, as a backend's `forward` reads them: `y` the ids (the raw ones where the
    kernel finds the ignored rows itself), `ignored` the ignored-row mask or None, `w` the weights (None without),
    `divisor` the 'mean' divisor where it is known before `forward`, `scale` the factor that `forward` folded into
    the gradient, and `divide_in_backward` whether backward divides by `divisor` instead (on a GPU, where reading
    it in forward would stall the device)."""

    y: Tensor
    ignored: Tensor | None = None
    w: Tensor | None = None
    divisor: Tensor | float | None = None
    scale: float = 1.0
    divide_in_backward: bool = False

    def tensors(self) -> tuple[Tensor | None, ...]:
        return self.y, self.ignored, self.w

    def without_tensors(self) -> Targets:
        """A copy that holds no tensor (autograd keeps those through `save_for_backward`); `with_tensors` restores
        them."""
        return Targets(None, None, None, self.divisor, self.scale, self.divide_in_backward)

    def with_tensors(self, y: Tensor, ignored: Tensor | None, w: Tensor | None) -> Targets:
        return Targets(y, ignored, w, self.divisor, self.scale, self.divide_in_backward)


class Backend:
    """One way of computing the loss (see the module's docstring); subclasses are stateless, one instance each."""

    name = "backend"

    def accepts(self, input: Tensor) -> bool:
        """Whether this backend can take these logits."""
        raise NotImplementedError

    def loss(self, input: Tensor, target: Tensor, spec: RowLoss, weight: Tensor | None, reduction: str,
             ignore_index: int) -> Tensor:
        """The loss of `input` against `target` (arguments that passed `checks.check_arguments`)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{self.name} backend>"


def scale_gradient(grad: Tensor, grad_loss: Tensor, per_row: bool, divisor: Tensor | float | None,
                   ignored: Tensor | None, find_ignored=None) -> Tensor:
    """`grad` times `grad_loss` (divided by `divisor` unless None), leaving ignored rows 0 whatever it holds: a NaN
    or infinite `grad_loss` must not turn their zeros into NaN (PyTorch's gradient there is 0 too). `ignored` is
    the ignored-row mask, or None with `find_ignored` a function that makes it (when it is needed).

    In place, except for a batch of `grad_loss`es (`autograd.grad(..., is_grads_batched=True)`, which `jacobian`
    and `hessian` use with vectorize=True): their product has a batch dimension that the buffer has not."""
    batched = is_batched(grad_loss)
    if not per_row and divisor is None and grad_loss.is_cpu and not batched:
        value = grad_loss.item()
        if value == 1:  # `loss.backward()` passes 1: skip a pass
            return grad
        if math.isfinite(value):  # ignored rows stay 0 * value = 0
            return grad.mul_(value)
    factor = grad_loss.reshape(-1) if per_row else grad_loss
    if divisor is not None:
        factor = factor / mean_divisor(divisor)
    if ignored is None and find_ignored is not None:
        ignored = find_ignored()
    if ignored is not None:
        factor = factor.expand(grad.shape[0]).masked_fill(ignored, 0.0)
    factor = factor[:, None] if factor.dim() else factor
    return grad * factor if batched else grad.mul_(factor)


def rows(input: Tensor) -> Tensor:
    """(M, C) logits, class axis last: a view for (N, C) and (N, d1, ..., C)-ordered memory, else a copy.
    No upcast here: the blockwise backend upcasts one block at a time, so half-precision logits never get a float32
    copy."""
    return input if input.dim() == 2 else input.movedim(1, -1).reshape(-1, input.shape[1])


def gradient_buffer(x: Tensor) -> Tensor:
    """An uninitialized (M, C) buffer for the gradient of `x`.

    From 32 MiB (glibc's largest mmap threshold) it is fresh pages on every call, and faulting them in, 4 KiB at a
    time, costs more than the kernel. Transparent huge pages would cut that, but made some calls of very wide rows
    slower on a VM (the first huge-page faults after other large allocations), so the choice is left to the user:
    THP_MEM_ALLOC_ENABLE=1 makes torch ask for huge pages for every large tensor."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def per_position(loss: Tensor, input_shape: torch.Size) -> Tensor:
    """Per-row losses in the target's shape (N, d1, ...); for (N, C) logits already so (a reshape costs ~1 us)."""
    return loss if len(input_shape) == 2 else loss.reshape(input_shape[:1] + input_shape[2:])
