"""Stratified folds for cross-fitting: every class spread evenly over the folds, deterministic for a seed."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from fastai_ls.validation import check_seed

__all__ = ["stratified_folds"]


def stratified_folds(target: Tensor, folds: int, seed: int = 0) -> Tensor:
    """(N,) fold ids in [0, folds): the rows of each class are shuffled (seeded) and dealt to the folds in turn.

    The classes are dealt one after another without restarting at fold 0, so the fold sizes differ by at most one
    row overall and by at most one row within each class.

    Parameters
    ----------
    target : Tensor
        (N,) integer class ids.
    folds : int
        The number of folds, 2 <= folds <= N.
    seed : int
        Seed of the shuffle, in [0, 2**64) (a private generator: the global random state is neither read nor
        changed).

    Examples
    --------
    >>> stratified_folds(torch.tensor([0, 0, 1, 1, 1, 0]), 2).bincount().tolist()
    [3, 3]
    """
    if isinstance(folds, bool) or not isinstance(folds, numbers.Integral) or folds < 2:
        raise ValueError(f"folds must be an int >= 2, got {folds!r}")
    seed = check_seed(seed, allow_none=False)
    n = target.shape[0]
    if folds > n:
        raise ValueError(f"folds={folds} is more than the {n} rows")
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(n, generator=generator)
    by_class = shuffled[torch.sort(target.detach().cpu()[shuffled], stable=True).indices]
    fold_of = torch.empty(n, dtype=torch.long)
    fold_of[by_class] = torch.arange(n) % folds
    return fold_of
