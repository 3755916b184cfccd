"""Training and reading back the example learners the way the command and the loss comparison do: seeded, one
`fit_one_cycle`, distributed when launched so, and each validation image's raw logits once."""

from __future__ import annotations

from collections.abc import Callable

from fastai.learner import Learner
from fastai.torch_core import rank_distrib, set_seed
from torch import Tensor

from fastai_ls.integration.callback import CalibrationCallback
from fastai_ls.integration.distributed import distrib_ctx
from fastai_ls.integration.posthoc import holdout_logits

__all__ = ["train", "validation_logits", "calibration_callback"]


def train(make_learner: Callable[..., Learner], eps: float, epochs: int, seed: int, label: str = "",
          loss_func: Callable | None = None) -> Learner:
    """`make_learner(eps=eps)` trained with `fit_one_cycle(epochs)` from `seed`; distributed when launched so.

    Parameters
    ----------
    make_learner : callable
        `make_learner(eps=...)` builds a learner.
    eps : float
        Label smoothing.
    epochs : int
        `fit_one_cycle` epochs.
    seed : int
        Seed set before the learner is built (its split and initial weights) and trained.
    label : str, optional
        Printed (on rank 0) before fastai's progress table, with the number of images (and of training labels
        replaced by label noise, if any), to say which model trains.
    loss_func : callable, optional
        Trained with this loss instead of the learner's own (set after the learner is built).

    Returns
    -------
    Learner
        The trained learner.

    Examples
    --------
    >>> learn = train(digits_learner, eps=0.1, epochs=10, seed=42, label="label smoothing")  # doctest: +SKIP
    label smoothing: fit_one_cycle(10) on 1438 training and 359 validation images
    """
    set_seed(seed, reproducible=True)
    learn = make_learner(eps=eps)
    if loss_func is not None:
        learn.loss_func = loss_func
    if label and rank_distrib() == 0:
        n_train = len(learn.dls.train_ds)
        relabelled = len(getattr(learn, "relabelled", {}))
        noise = f" ({relabelled} of their labels replaced by a wrong class)" if relabelled else ""
        print(f"\n{label}: fit_one_cycle({epochs}) on {n_train} training images{noise} and "
              f"{len(learn.dls.valid_ds)} validation images", flush=True)
    with distrib_ctx(learn):  # does nothing in a single process
        learn.fit_one_cycle(epochs)
    return learn


def validation_logits(learn: Learner) -> tuple[Tensor, Tensor]:
    """The raw logits and class ids of the validation set (`holdout_logits`), each image once. Under `torchrun`
    every process must call it: inside `distrib_ctx` the processes share the images out and gather the
    predictions, as during `fit` (run by several processes outside it, fastai's `get_preds` returned logits and
    targets that do not belong together).

    Parameters
    ----------
    learn : Learner
        A trained learner.

    Returns
    -------
    tuple of two Tensors
        (N, C) logits and (N,) class ids.

    Examples
    --------
    >>> logits, target = validation_logits(learn)  # doctest: +SKIP
    """
    with distrib_ctx(learn), learn.no_bar():  # no bar: it would stay in a log, above the report
        return holdout_logits(learn)


def calibration_callback(learn: Learner) -> CalibrationCallback:
    """The learner's `CalibrationCallback`.

    Parameters
    ----------
    learn : Learner
        A learner built with one (the factories' `calibration=True`).

    Returns
    -------
    CalibrationCallback

    Examples
    --------
    >>> calibration_callback(digits_learner())  # doctest: +SKIP
    CalibrationCallback
    """
    for cb in learn.cbs:
        if isinstance(cb, CalibrationCallback):
            return cb
    raise ValueError("the learner has no CalibrationCallback: build it with calibration=True")
