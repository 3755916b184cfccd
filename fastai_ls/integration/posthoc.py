"""Post-hoc calibration of a fastai `Learner`: fit a calibrator on held-out predictions (`fit_calibrator`), make
`get_preds`, `predict`, `tta`, `Interpretation` and `CalibrationCallback` use it (`apply_calibrator`; it is kept by
`learn.export()` and `load_learner`), undo it (`remove_calibrator`), read it (`applied_calibrator`), and compare
calibrators honestly (`compare_calibrators`). The temperature-only names of earlier releases are deprecated
(`fastai_ls.integration.temperature`).

The calibrators themselves (tensors in, tensors out) live in `fastai_ls.calibration.calibrators`.
"""

from __future__ import annotations

import copy
import importlib
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastcore.basics import noop
from torch import Tensor

from fastai_ls.calibration.calibrators import Calibrator, get_calibrator
from fastai_ls.calibration.compare import DEFAULT_METHODS, compare_on_logits
from fastai_ls.integration.class_axis import class_axis_of, class_rows
from fastai_ls.integration.fastai_compat import shows_progress
from fastai_ls.validation import is_class_id_dtype, plain

__all__ = ["fit_calibrator", "apply_calibrator", "remove_calibrator", "applied_calibrator", "compare_calibrators",
           "holdout_logits", "save_predictions", "CalibratedActivation"]
# Deprecated names (issue 16), read from `fastai_ls.integration.temperature` on first use; each warns when used.
_TEMPERATURE_NAMES = ("TemperatureFit", "fit_temperature", "temperature_from_logits", "apply_temperature",
                      "remove_temperature")


# --- held-out predictions ----------------------------------------------------------------------------------------


def holdout_logits(learn: Learner, dl: DataLoader | None = None) -> tuple[Tensor, Tensor]:
    """(rows, C) raw logits and (rows,) class ids of `dl` (default: the validation set), one row per prediction on
    the loss's class axis (a pixel of a mask, a token of a text), without the rows the loss ignores.

    Parameters
    ----------
    learn : Learner
        A learner whose model outputs logits for a cross-entropy-style loss.
    dl : DataLoader | None
        The held-out data; None for `learn.dls.valid`.

    Examples
    --------
    >>> logits, target = holdout_logits(learn, dl=learn.dls.test_dl(items, with_labels=True))  # doctest: +SKIP
    """
    check_softmax_loss(learn.loss_func)
    logits, target = learn.get_preds(dl=dl, act=noop)  # raw logits, even where a calibrator is applied
    which = "the validation set" if dl is None else "dl"
    if logits is None:  # fastai's get_preds on a DataLoader without a batch
        raise ValueError(f"{which} is empty: post-hoc calibration needs held-out items with their labels")
    if target is None:
        raise ValueError(f"{which} has no labels: post-hoc calibration needs held-out items with their class ids "
                         "(e.g. learn.dls.test_dl(items, with_labels=True))")
    if not isinstance(target, Tensor):
        raise ValueError("post-hoc calibration needs one target tensor of class ids per item")
    logits, target = class_rows(logits, target, learn.loss_func)
    if not is_class_id_dtype(target.dtype):
        raise ValueError(f"post-hoc calibration needs integer class-id targets, got {target.dtype} (multi-label or "
                         "soft targets have no softmax calibration)")
    ignore_index = getattr(learn.loss_func, "ignore_index", None)
    if ignore_index is not None:
        kept = target != ignore_index
        logits, target = logits[kept], target[kept]
    return logits, target


def save_predictions(learn: Learner, path: str | Path, dl: DataLoader | None = None) -> Path:
    """Write the raw logits and class ids of `dl` (default: the validation set) to an `.npz` archive with the
    arrays `logits` (N, C) and `targets` (N,): the file `fastai-ls calibrate` reads, and numpy reads anywhere.

    The rows are those of `holdout_logits`: one per prediction on the loss's class axis (each pixel of a mask),
    without the rows the loss ignores; the logits are the model's own even when a calibrator is applied.

    Parameters
    ----------
    learn : Learner
        A learner with a cross-entropy-style loss.
    path : str | Path
        The file; numpy adds `.npz` to a name without it.
    dl : DataLoader | None
        The held-out data; None for `learn.dls.valid`.

    Returns
    -------
    Path
        The file written.

    Examples
    --------
    >>> save_predictions(learn, "valid.npz")  # then, in a shell: fastai-ls calibrate valid.npz  # doctest: +SKIP
    PosixPath('valid.npz')
    """
    path = Path(path)
    if not path.name:  # '' or a path ending in '..'
        raise ValueError(f"path must name a file, got {str(path)!r}")
    path = path if path.suffix == ".npz" else path.with_name(path.name + ".npz")
    # Checked before the predictions, which take a pass over the data.
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a folder")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: no folder {path.parent}")
    logits, target = holdout_logits(learn, dl)
    if logits.dtype not in (torch.float32, torch.float64):  # numpy has no bfloat16; float16 would round logits
        logits = logits.float()
    np.savez(path, logits=logits.cpu().numpy(), targets=target.cpu().numpy().astype(np.int64))
    return path


def check_softmax_loss(loss_func) -> None:
    """Raise a TypeError unless the loss's own activation is a softmax over its class axis (or it has none, as
    `nn.CrossEntropyLoss`): calibrators map logits to softmax probabilities, which mean nothing for, say, a sigmoid.

    Parameters
    ----------
    loss_func : object
        A learner's loss; its class's `activation` is tried on a small probe with the classes on its class axis.

    Examples
    --------
    >>> from fastai.losses import BCEWithLogitsLossFlat
    >>> check_softmax_loss(BCEWithLogitsLossFlat())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    TypeError: BCEWithLogitsLossFlat's activation is not a softmax over classes: ...
    """
    activation = getattr(type(loss_func), "activation", None)  # the class's, not an applied calibrator's
    if activation is None:
        return
    axis = getattr(loss_func, "class_axis", getattr(loss_func, "axis", 1))
    shape = [1] * max(2, axis + 1 if axis >= 0 else -axis)
    shape[axis] = 3
    probe = torch.tensor([0.5, -1.0, 2.0]).reshape(shape)
    try:
        ok = torch.allclose(plain(activation(loss_func, probe)).float(), probe.softmax(axis), atol=1e-6)
    except Exception:  # an activation that cannot even take the probe is no softmax over that axis
        ok = False
    if not ok:
        raise TypeError(f"{type(loss_func).__name__}'s activation is not a softmax over classes: post-hoc "
                        "calibrators map logits to softmax probabilities, for cross-entropy-style losses")


# --- the applied calibrator ----------------------------------------------------------------------------------------


class CalibratedActivation:
    """The loss's activation once a calibrator is applied: the calibrator's probabilities, computed over the loss's
    class axis; set as `loss_func.activation` by `apply_calibrator`.

    A module-level class holding no lambda or bound method, so it survives `learn.export()` and `load_learner`.

    Parameters
    ----------
    loss_func : object
        The learner's loss (its class axis is read at call time).
    calibrator : Calibrator
        A fitted calibrator.
    """

    def __init__(self, loss_func, calibrator: Calibrator):
        """The activation of `loss_func` through `calibrator`."""
        self.loss_func, self.calibrator = loss_func, calibrator

    def __call__(self, out: Tensor) -> Tensor:
        out = plain(out)
        axis = class_axis_of(self.loss_func, out.dim())
        classes_last = out.movedim(axis, -1)
        probs = self.calibrator(classes_last.reshape(-1, classes_last.shape[-1]))
        return probs.reshape(classes_last.shape).movedim(-1, axis)

    def __repr__(self) -> str:
        return f"CalibratedActivation({self.calibrator!r})"


def _device_of(learn: Learner) -> torch.device | None:
    dls = getattr(learn, "dls", None)
    device = getattr(dls, "device", None) if dls is not None else None
    if device is None:
        device = next((p.device for p in learn.model.parameters()), None)
    return None if device is None else torch.device(device)


def apply_calibrator(learn: Learner, calibrator: Calibrator) -> Learner:
    """Make `learn.get_preds()`, `predict()`, `tta()`, `Interpretation` and `CalibrationCallback` use the
    calibrator's probabilities; returns `learn`.

    The calibrator becomes the loss's `activation` (so `learn.export()` and `load_learner` keep it); training is
    unaffected (the loss still sees raw logits), and decoded classes are the argmax of the calibrated probabilities,
    which differs from the model's own for calibrators with `may_change_prediction`. `tta` averages calibrated
    probabilities. Applying again replaces the calibrator; `remove_calibrator` undoes it.

    Parameters
    ----------
    learn : Learner
        A learner with a cross-entropy-style loss object (`CrossEntropyLossFlat()`, `nn.CrossEntropyLoss()`,
        `LabelSmoothingCrossEntropy()`...); a plain function such as `F.cross_entropy` is refused (TypeError): it
        is shared by every learner that uses it, and `learn.export()` saves it by name.
    calibrator : Calibrator
        A fitted calibrator, e.g. from `fit_calibrator`; the learner gets a copy on its device.

    Examples
    --------
    >>> apply_calibrator(learn, fit_calibrator(learn, "dirichlet", dl=holdout_dl))  # doctest: +SKIP
    """
    if not isinstance(calibrator, Calibrator):
        raise TypeError(f"calibrator must be a Calibrator (see fit_calibrator), got {type(calibrator).__name__}")
    if not calibrator.fitted:
        raise ValueError(f"{type(calibrator).__name__} is not fitted: fit it first (fit_calibrator)")
    n_classes = getattr(getattr(learn, "dls", None), "c", None)
    if isinstance(n_classes, int) and n_classes != calibrator.n_classes:
        raise ValueError(f"the calibrator was fitted on {calibrator.n_classes} classes, but the learner's data has "
                         f"{n_classes} (learn.dls.c): fit it on this learner's held-out data (fit_calibrator)")
    loss_func = learn.loss_func
    check_softmax_loss(loss_func)
    if isinstance(loss_func, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)):
        # An attribute set on a function (`F.cross_entropy`, a module-level `def`) is set for every learner that
        # uses it, and `learn.export()` pickles a function by name, so `load_learner` would lose the calibrator.
        name = getattr(loss_func, "__qualname__", repr(loss_func))
        raise TypeError(f"apply_calibrator attaches the calibrator to the learner's loss object, but the loss is the "
                        f"function {name}, which every learner using it shares (all would be calibrated) and which "
                        "learn.export() saves by name (load_learner would lose the calibrator): give the learner a "
                        "loss object, e.g. CrossEntropyLossFlat() or nn.CrossEntropyLoss()")
    # A copy on the learner's device: the per-batch activation then copies nothing, and the caller's is not moved.
    calibrator = copy.deepcopy(calibrator)
    device = _device_of(learn)
    if device is not None:
        calibrator.to(device)
    try:
        loss_func.activation = CalibratedActivation(loss_func, calibrator)
    except AttributeError as e:
        raise TypeError(f"cannot set an activation on a {type(loss_func).__name__} loss; calibrate the logits "
                        "yourself: learn.get_preds(act=...)") from e
    return learn


def applied_calibrator(learn: Learner) -> Calibrator | None:
    """The calibrator that `apply_calibrator` set on `learn`, or None.

    Parameters
    ----------
    learn : Learner
        Any learner.

    Examples
    --------
    >>> applied_calibrator(learn).temperature  # doctest: +SKIP
    """
    activation = vars(learn.loss_func).get("activation")
    return activation.calibrator if isinstance(activation, CalibratedActivation) else None


def remove_calibrator(learn: Learner) -> Learner:
    """Undo `apply_calibrator`: the loss's own activation again; returns `learn`.

    Parameters
    ----------
    learn : Learner
        A learner, with or without an applied calibrator.

    Examples
    --------
    >>> remove_calibrator(learn).get_preds()  # doctest: +SKIP
    """
    if isinstance(vars(learn.loss_func).get("activation"), CalibratedActivation):
        del vars(learn.loss_func)["activation"]
    return learn


def fit_calibrator(learn: Learner, method: str | Calibrator = "temperature", dl: DataLoader | None = None,
                   **options) -> Calibrator:
    """A calibrator fitted on the raw logits of `dl` (default: the validation set); the learner is not changed
    (see `apply_calibrator`).

    Fitting on the validation set and then judging the calibrator there flatters it: fit on a held-out `dl` that
    the learner never trained on, and compare methods with `compare_calibrators`, which never scores a row with a
    calibrator fitted on it.

    Parameters
    ----------
    learn : Learner
        A learner with a cross-entropy-style loss.
    method : str | Calibrator
        A method name ('temperature', 'vector', 'matrix', 'dirichlet', 'isotonic', 'top_label_isotonic',
        'histogram', 'ets') or a calibrator, of which a copy is fitted and returned (the caller's object is never
        changed; a `TemperatureScaling(2.0)` keeps its given temperature).
    dl : DataLoader | None
        The held-out data; None for `learn.dls.valid`.
    **options
        Passed to the calibrator's constructor when `method` is a name.

    Examples
    --------
    >>> cal = fit_calibrator(learn, "isotonic", dl=learn.dls.test_dl(holdout, with_labels=True))  # doctest: +SKIP
    """
    calibrator = copy.deepcopy(get_calibrator(method, **options))
    logits, target = holdout_logits(learn, dl)
    return calibrator.fit(logits, target)


def compare_calibrators(
    learn_or_logits: Learner | Tensor | np.ndarray,
    target: Tensor | np.ndarray | None = None,
    methods: Sequence[str | Calibrator] | Mapping[str, str | Calibrator] = DEFAULT_METHODS,
    folds: int = 5,
    seed: int = 0,
    dl: DataLoader | None = None,
    n_bins: int = 15,
    ci: float | None = 0.95,
    n_boot: int = 1000,
    progress: bool = True,
) -> pd.DataFrame:
    """Cross-fitted comparison of calibrators: one row per method, the uncalibrated model first; on a learner's
    held-out predictions, `compare_calibrators(learn, dl=...)`, or on held-out logits, `compare_calibrators(logits,
    target)`.

    Each method is fitted on all stratified folds but one and predicts the remaining fold, in turn; the pooled
    out-of-fold probabilities are scored at once, so no row is scored by a calibrator that saw it. The table, its
    columns and its warnings are those of `fastai_ls.calibration.compare.compare_on_logits`, which this runs on
    the logits (for a learner: `holdout_logits(learn, dl)`, raw logits even where a calibrator is applied).

    Parameters
    ----------
    learn_or_logits : Learner | Tensor | np.ndarray
        A learner (its raw logits on `dl` are compared), or (N, C) held-out logits.
    target : Tensor | np.ndarray | None
        (N,) class ids with logits; None with a learner (its data has the labels).
    methods : sequence or mapping
        Method names, unfitted calibrators, or a mapping of row labels to either.
    folds : int
        Number of stratified folds (seeded by `seed`).
    seed : int
        Seed of the fold assignment and of the bootstrap.
    dl : DataLoader | None
        With a learner: the held-out data (default: the validation set); with logits, an error.
    n_bins : int
        Equal-width bins of the ECE columns.
    ci : float | None
        Level of the metrics' intervals (`<name>_lo`, `<name>_hi` columns); None for none.
    n_boot : int
        Bootstrap replicates per row.
    progress : bool
        Show a progress bar over the fits (methods x folds); with a learner, only where the learner shows its own
        (none under `learn.no_bar()`).

    Returns
    -------
    pandas.DataFrame
        One row per method, indexed by `method`.

    Examples
    --------
    >>> compare_calibrators(learn, methods=["temperature", "dirichlet", "isotonic"])  # doctest: +SKIP
    >>> compare_calibrators(logits, target, methods=["temperature"], folds=3)  # doctest: +SKIP
    """
    if isinstance(learn_or_logits, Learner):
        if target is not None:
            raise ValueError("pass either a learner or logits with their targets, not a learner and targets")
        # fastai's no_bar() removes the ProgressCallback (`learn.progress`) while it lasts.
        progress = progress and shows_progress(learn_or_logits)
        logits, target = holdout_logits(learn_or_logits, dl)
    else:
        if target is None:
            raise ValueError("logits need their targets: compare_calibrators(logits, targets)")
        if dl is not None:
            raise ValueError("dl is for a learner; with logits, pass the held-out logits themselves")
        logits = learn_or_logits
    return compare_on_logits(logits, target, methods=methods, folds=folds, seed=seed, n_bins=n_bins, ci=ci,
                             n_boot=n_boot, progress=progress)


def __getattr__(name: str) -> Any:
    if name in _TEMPERATURE_NAMES:  # no warning here: each warns when it is called (or, a TemperatureFit, made)
        return getattr(importlib.import_module("fastai_ls.integration.temperature"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
