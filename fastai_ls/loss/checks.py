"""The loss's argument checks: each raises a ValueError/TypeError naming the problem before any arithmetic on the
logits, and none changes what it is given.

The checks that read no tensor values run on every call, together (`check_arguments`, before a backend is
chosen). Those that read values (`check_weight_values`, `check_ids`) run in the backend that needs them: the C
kernel checks the same values itself as it reads them, so the CPU float32 path makes no separate pass.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor
from torch.autograd import forward_ad

from fastai_ls.loss.formula import uniform_eps
from fastai_ls.validation import plain

__all__ = ["REDUCTIONS", "SMOOTHINGS", "check_arguments", "check_tensors", "check_eps", "check_options", "check_input",
           "check_weight", "check_weight_needs_no_grad", "check_weight_values", "weight_in", "check_target",
           "target_shape_message", "class_ids", "check_ids", "under_functorch_transform", "is_batched",
           "has_forward_tangent"]

REDUCTIONS = ("mean", "sum", "none")
SMOOTHINGS = ("uniform", "others")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_arguments(input: Tensor, target: Tensor, eps: float, weight: Tensor | None, reduction: str,
                    ignore_index: int, smoothing: str, fused: bool | None,
                    z_loss: float = 0.0) -> tuple[Tensor, Tensor, float, int]:
    """Every check of a call of the loss that reads no tensor values, in one place: raises on the first problem,
    else returns the logits and target as plain tensors, the uniform eps (`formula.uniform_eps`) and ignore_index as
    a Python int. The values of the ids and weights are checked by the backend that reads them."""
    check_options(eps, reduction, smoothing, ignore_index, fused, z_loss)
    ignore_index = int(ignore_index)  # a numpy integer passes the check, but Triton's kernels take only Python ints
    input, target = check_tensors(input, target, weight, ignore_index)
    eps = uniform_eps(eps, smoothing, input.shape[1])
    if fused and target.is_floating_point():
        raise ValueError("fused=True needs integer class-id targets; probability targets use fused=False")
    return input, target, eps, ignore_index


def check_tensors(input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int) -> tuple[Tensor, Tensor]:
    """The checks of the logits, target and weights that read no tensor values (types, shapes, dtypes, devices, a
    weight that requires grad), in the order every loss makes them; returns the logits and target as plain
    tensors."""
    check_input(input)
    input = plain(input)
    target = plain(target) if isinstance(target, Tensor) else target
    check_weight(weight, input.shape[1])
    check_weight_needs_no_grad(weight)
    check_target(input, target, ignore_index)
    return input, target


def check_eps(eps: float) -> None:
    """Raise unless `eps` is a real number in [0, 1)."""
    if type(eps) is not float and (isinstance(eps, bool) or not isinstance(eps, numbers.Real)):  # float: fast
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    if not 0 <= eps < 1:
        raise ValueError(f"eps must be in [0, 1), got {eps}")


def check_options(eps: float, reduction: str, smoothing: str, ignore_index: int, fused: bool | None = None,
                  z_loss: float = 0.0) -> None:
    """Raise if a scalar option of the loss is invalid."""
    check_eps(eps)
    if type(z_loss) is not float and (isinstance(z_loss, bool) or not isinstance(z_loss, numbers.Real)):
        raise TypeError(f"z_loss must be a real number, got {type(z_loss).__name__}")
    if not 0 <= z_loss < float("inf"):
        raise ValueError(f"z_loss must be finite and non-negative, got {z_loss}")
    if fused is not None and fused is not True and fused is not False:  # 0 or "no" must not pick a path by truth
        raise TypeError(f"fused must be True, False or None, got {fused!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if smoothing not in SMOOTHINGS:
        raise ValueError(f"smoothing must be one of {SMOOTHINGS}, got {smoothing!r}")
    if type(ignore_index) is not int and (isinstance(ignore_index, bool)
                                          or not isinstance(ignore_index, numbers.Integral)):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not INT64_MIN <= ignore_index <= INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64 (class ids are compared as int64, as in PyTorch), got "
                         f"{ignore_index}")


def check_input(input: Tensor) -> None:
    """Raise unless `input` is a floating-point tensor of logits with a batch and a class axis."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input must hold floating-point logits, got {input.dtype}")
    if input.dim() < 2:
        raise ValueError(f"input must be (N, C) or (N, C, d1, ...), got shape {tuple(input.shape)}")
    if input.shape[1] < 1:
        raise ValueError(f"input has no classes: shape {tuple(input.shape)}")


def check_weight(weight: Tensor | None, n_classes: int | None = None) -> None:
    """Raise unless `weight` is None or a 1-D floating-point tensor (of length `n_classes` if given). Reads no
    values: see `check_weight_values`."""
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


def check_weight_needs_no_grad(weight: Tensor | None) -> None:
    """Raise, as PyTorch's cross-entropy does, if a gradient could be asked for the class weights."""
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("weight requires grad, but the loss is not differentiable with respect to the class "
                           "weights (as in PyTorch's cross-entropy); pass weight.detach(), or call under "
                           "torch.no_grad()")


def check_weight_values(weight: Tensor | None) -> None:
    """Raise unless every class weight is finite and non-negative."""
    if weight is None:
        return
    weight = _unwrapped(weight)
    if not bool(((weight >= 0) & weight.isfinite()).all()):
        raise ValueError("weight must be finite and non-negative")


def weight_in(weight: Tensor | None, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """`weight` in the `dtype` the loss is computed in, on `device`. Converting to a narrower type must not change
    what the weights say: a finite weight that would overflow, or a nonzero one that would fall below the type's
    normal range (to 0 or to a few bits of precision), raises instead."""
    if weight is None:
        return None
    if weight.dtype.itemsize > dtype.itemsize:  # float64 weights for float32 arithmetic
        info = torch.finfo(dtype)
        size = _unwrapped(weight).detach().abs()
        lost = (size > info.max) & size.isfinite() | (size < info.tiny) & (size > 0)
        if bool(lost.any()):
            raise ValueError(f"weight {size[lost][:5].tolist()} cannot be represented in {dtype}, the dtype the "
                             f"loss is computed in for these logits: nonzero weights must be in [{info.tiny:.3g}, "
                             f"{info.max:.3g}]; rescale them (the 'mean' reduction is unchanged by a common factor) "
                             f"or pass float64 logits")
    return weight.to(device=device, dtype=dtype)


def check_target(input: Tensor, target: Tensor, ignore_index: int) -> None:
    """Raise unless `target`'s type, device and shape fit `input` (integer ids are checked by `check_ids`)."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if not (target.is_cpu and input.is_cpu) and target.device != input.device:  # comparing devices costs ~0.3 us
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
    if input.dim() == 2 and target.dim() == 1 and target.shape[0] == input.shape[0]:  # the common case, quickly
        return
    expected = input.shape[:1] + input.shape[2:]
    if target.shape != expected:
        raise ValueError(target_shape_message(input.shape, expected, target.shape))


def target_shape_message(input_shape: torch.Size, expected: torch.Size, got: torch.Size, axis: str = "") -> str:
    """What is wrong with an integer target of shape `got` for logits of `input_shape`, and what to pass: class ids
    of shape `expected` (the input's shape without its class axis). `axis` describes a class axis other than 1 (the
    flat loss's); built only when the check fails."""
    message = f"integer target must have shape {tuple(expected)} for input {tuple(input_shape)}{axis}, got {tuple(got)}"
    if got.numel() == expected.numel() and [s for s in got if s != 1] == [s for s in expected if s != 1]:
        # The same ids with extra size-1 axes, as fastai's tabular loaders give ((bs, 1)): only the layout differs.
        fix = f"pass target.reshape({', '.join(map(str, expected))})"
        return f"{message}: {fix}" if axis else \
            f"{message}: {fix}, or use LabelSmoothingCrossEntropyFlat, which flattens targets as fastai's " \
            f"CrossEntropyLossFlat does"
    return f"{message}: pass one class id per position of the input without its class axis"


def class_ids(target: Tensor) -> Tensor:
    """The integer `target` as a flat int64 tensor (a view when it is one already). Every integer dtype keeps its
    values, except uint64 ids from 2**63 up, which int64 cannot hold: those raise, rather than wrap around to
    negative numbers (2**64 - 100 would become -100, the default `ignore_index`)."""
    t = target if target.dim() == 1 else target.reshape(-1)
    if t.dtype == torch.int64:
        return t
    if t.dtype == torch.uint64:
        as_int64 = _unwrapped(target).reshape(-1).view(torch.int64)
        wrapped = as_int64 < 0
        if bool(wrapped.any()):
            found = sorted({v % 2**64 for v in as_int64[wrapped][:5].tolist()})
            raise ValueError(f"target ids must be class indices, found uint64 ids {found} (>= 2**63)")
    return t.long()


def check_ids(target: Tensor, n_classes: int, ignore_index: int,
              weight: Tensor | None = None) -> tuple[int, int] | None:
    """Raise unless every id in the int64 `target` is a class or `ignore_index` (and, if given, unless `weight` passes
    `check_weight_values`); returns the smallest and largest id (None for an empty target). One host read for
    both: on a GPU, one synchronization."""
    target = _unwrapped(target)
    if target.numel() == 0:
        check_weight_values(weight)
        return None
    bounds = torch.stack(torch.aminmax(target))
    if weight is not None:
        weight = _unwrapped(weight)
        bad_weights = ((weight < 0) | ~weight.isfinite()).sum(dtype=torch.int64)
        bounds = torch.cat([bounds, bad_weights[None].to(bounds.device)])
    lo, hi, *bad_weights = bounds.tolist()
    if bad_weights and bad_weights[0]:
        raise ValueError("weight must be finite and non-negative")
    if lo >= 0 and hi < n_classes:  # the common case costs one reduction
        return lo, hi
    bad = target[(target != ignore_index) & ((target < 0) | (target >= n_classes))]
    if bad.numel():
        raise ValueError(f"target ids must be in [0, {n_classes}) or equal ignore_index={ignore_index}; "
                         f"found {bad.unique()[:5].tolist()}")
    return lo, hi


def under_functorch_transform() -> bool:
    """Whether a `torch.func` transform (grad, vmap, jacrev...) is running."""
    return _transforms_active()


_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def is_batched(t: Tensor) -> bool:
    """Whether `t` stands for a batch of tensors: under a `torch.func` transform, or the legacy vmap that backward
    runs under for `torch.autograd.grad(..., is_grads_batched=True)` (which `jacobian(vectorize=True)` uses)."""
    return _transforms_active() or _legacy_batched(t)


_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)


def has_forward_tangent(*tensors: Tensor | None) -> bool:
    """Whether one of `tensors` is a dual tensor of forward-mode AD (`torch.autograd.forward_ad`), whose tangent a
    kernel that reads the data pointer would drop. Outside a `dual_level` this costs one attribute read."""
    if getattr(forward_ad, "_current_level", 0) < 0:
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _unwrapped(t: Tensor) -> Tensor:
    """The tensor that holds every value of `t`: under `torch.func` transforms `t` may be a wrapper (vmap's shows
    one sample), whose values cannot be read on the host; the checks read all the samples' values instead."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t
