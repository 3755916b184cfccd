"""The check that the learner factories (`pets_learner`, `digits_learner`) run on their split before building
`DataLoaders`: a data set too small for one training batch must fail with a reason, not train on nothing."""

from __future__ import annotations

__all__ = ["check_split"]


def check_split(n_train: int, n_valid: int, bs: int) -> None:
    """Raise a `ValueError` that says why and what to do, unless a split of `n_train` training and `n_valid`
    validation items gives fastai at least one training batch of `bs` and one validation item.

    fastai's training `DataLoader` drops the last partial batch (`drop_last=True`), so a training set smaller than
    the batch size gives no batch at all: `fit` then trains on nothing, warns "Your generator is empty" and records
    `train_loss` NaN (or, with a `Normalize()` that computes its statistics, building the `DataLoaders` fails with
    "This DataLoader does not contain any batches").

    Parameters
    ----------
    n_train : int
        Number of training items.
    n_valid : int
        Number of validation items.
    bs : int
        Batch size.

    Examples
    --------
    >>> check_split(26, 6, bs=16)
    >>> check_split(26, 6, bs=64)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: no training batch: the training set has 26 images, fewer than one batch (bs=64), ... more images.
    """
    if n_train == 0:
        raise ValueError("the training set is empty: use more images, or a smaller validation share (valid_pct)")
    if n_train < bs:
        raise ValueError(f"no training batch: the training set has {n_train} images, fewer than one batch (bs={bs}), "
                         f"and fastai drops the last partial training batch. Pass a smaller bs (at most {n_train}) "
                         "or use more images.")
    if n_valid == 0:
        raise ValueError(f"the validation set is empty ({n_train} training images): use more images, or a larger "
                         "validation share (valid_pct)")
