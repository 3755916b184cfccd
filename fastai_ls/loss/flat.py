"""fastai's `BaseLoss` layout for the Flat losses, one implementation for all of them: the class axis is `axis`
(default last), integer targets may come flattened or with trailing size-1 axes, and 'none' losses are flattened to
one per position."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from fastai_ls.loss.checks import target_shape_message
from fastai_ls.validation import plain

__all__ = ["FlatLayout"]


class FlatLayout:
    """Mixed in before a loss class (class axis 1) to give its `Flat` twin fastai's `BaseLoss` layout; the twin's
    `__init__` calls `_flat_options` after the loss's own."""

    def _flat_options(self, axis: int, flatten: bool, floatify: bool) -> None:
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be an int, got {type(axis).__name__}")
        for name, value in (("flatten", flatten), ("floatify", floatify)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        self.axis, self.flatten, self.floatify = int(axis), flatten, floatify

    @property
    def class_axis(self) -> int:
        return self.axis

    def forward(self, input: Tensor, target: Tensor, reduction: str | None = None) -> Tensor:
        """The loss of logits `input` (classes on `axis`) against `target`."""
        for name, value in (("input", input), ("target", target)):
            if not isinstance(value, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        input, target = plain(input), plain(target)
        if self.floatify and target.dtype != torch.float16:
            target = target.float()
        loss = super().forward(*self._class_axis_first(input, target), reduction)
        return loss.reshape(-1) if self.flatten and loss.dim() else loss

    def _class_axis_first(self, input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """`input` with the class axis moved to 1 (a view: no copy for autograd to undo) and the matching
        `target`, after checking that their layouts agree."""
        if input.dim() < 2:
            raise ValueError(f"input must have a batch and a class axis, got shape {tuple(input.shape)}")
        if not -input.dim() <= self.axis < input.dim():
            raise ValueError(f"axis={self.axis} is not an axis of the input (shape {tuple(input.shape)})")
        x = input.movedim(self.axis, 1)
        if target.is_floating_point():
            if target.shape != input.shape:
                raise ValueError(f"a probability target must have the input's shape {tuple(input.shape)}, "
                                 f"got {tuple(target.shape)}")
            return x, target.movedim(self.axis, 1)
        positions = x.shape[:1] + x.shape[2:]
        if target.shape == positions:
            return x, target
        if self.flatten and target.numel() == positions.numel() and (
                target.dim() == 1  # already flattened
                or target.shape[:len(positions)] == positions and all(s == 1 for s in target.shape[len(positions):])):
            # (bs, 1) from fastai's tabular loaders: fastai's `BaseLoss` flattens these as well. A view, never a copy.
            return x, target.reshape(positions)
        raise ValueError(target_shape_message(input.shape, positions, target.shape, f" with axis={self.axis}"))
