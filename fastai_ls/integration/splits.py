"""The checks that the learner factories (`pets_learner`, `digits_learner`) run on their split before building
`DataLoaders`: a data set too small for one training batch must fail with a reason, not train on nothing, and a
class seen only in validation must fail before training, not with fastai's KeyError after it."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

__all__ = ["check_split", "check_classes_trained"]


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


def check_classes_trained(labels: Sequence[Hashable], train: Sequence[int], valid: Sequence[int],
                          kind: str = "class") -> None:
    """Raise a `ValueError` naming a class that has validation items but no training item.

    fastai's `CategoryBlock` takes its vocabulary from the training labels, so such an item is refused only when
    it is first loaded, at the end of the first training epoch: "KeyError: Label '...' was not included in the
    training dataset", deep in a traceback.

    Parameters
    ----------
    labels : sequence
        The label of every item.
    train : sequence of int
        Indices into `labels` of the training items.
    valid : sequence of int
        Indices into `labels` of the validation items.
    kind : str, default 'class'
        What a label is called in the message (e.g. 'breed').

    Examples
    --------
    >>> check_classes_trained(["cat", "cat", "dog", "dog"], [0, 2], [1, 3])
    >>> check_classes_trained(["cat", "cat", "dog", "dog"], [0, 1], [2, 3], kind="breed")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: breed 'dog' has no training image: all 2 of its images are in the validation set; a model ...
    """
    trained = {labels[i] for i in train}
    missing = sorted({labels[i] for i in valid} - trained, key=str)
    if missing:
        n = sum(labels[i] == missing[0] for i in valid)
        others = f" (and {len(missing) - 1} more {kind}s like it)" if len(missing) > 1 else ""
        where = "its one image is" if n == 1 else f"all {n} of its images are"
        raise ValueError(f"{kind} {missing[0]!r} has no training image: {where} in the validation set{others}; a "
                         "model learns only the classes it trains on. Add images of it, or change the split (seed, "
                         "valid_pct)")
