"""How every entry point takes tensors in: as plain `torch.Tensor`s, in a dtype that the arithmetic can be done in."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["plain", "compute_dtype", "upcast"]


def plain(t: Tensor) -> Tensor:
    """`t` as a plain `torch.Tensor`: fastai's subclasses (`TensorCategory`...) send every operation through Python
    dispatch, which costs more than the whole loss at small sizes. The autograd history is kept. torch's own
    `as_subclass`, not fastai's override of it, which also copies the subclass's metadata (3x the time)."""
    return t if type(t) is Tensor else Tensor.as_subclass(t, Tensor)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision logits (the smoothing term sums C logits and overflows float16), else `dtype`."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def upcast(x: Tensor) -> Tensor:
    """`x` in its `compute_dtype`."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
