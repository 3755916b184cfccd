"""Deprecated: temperature scaling by its own names. Each name works for one more release, with a `FutureWarning`
naming what to use instead: the one verb set of `fastai_ls.integration.posthoc` with
`fastai_ls.calibration.calibrators.TemperatureScaling`.

| deprecated                                  | use                                                            |
|---------------------------------------------|----------------------------------------------------------------|
| `fit_temperature(learn, dl)`                | `fit_calibrator(learn, "temperature", dl=dl)` (and            |
|                                             | `compare_calibrators` for an honest before/after)              |
| `TemperatureFit`                            | the fitted `TemperatureScaling` (`.temperature`, `.at_bound`)  |
| `temperature_from_logits(logits, target)`   | `TemperatureScaling().fit(logits, target).temperature`         |
| `apply_temperature(learn, t)`               | `apply_calibrator(learn, TemperatureScaling(t))`               |
| `remove_temperature(learn)`                 | `remove_calibrator(learn)`                                     |
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from fastai.data.load import DataLoader
from fastai.learner import Learner
from torch import Tensor

from fastai_ls._deprecation import warn_renamed
from fastai_ls.calibration.calibrators import TemperatureScaling
from fastai_ls.calibration.state import CalibrationState
from fastai_ls.integration.posthoc import apply_calibrator, holdout_logits, remove_calibrator
from fastai_ls.validation import check_number

__all__ = ["TemperatureFit", "fit_temperature", "temperature_from_logits", "apply_temperature", "remove_temperature"]


@dataclass
class TemperatureFit:
    """Deprecated: what `fit_temperature` found, on the rows it was fitted on.

    Parameters
    ----------
    temperature : float
        The fitted T.
    nll_before, nll_after : float
        Mean NLL at T = 1 and at the fitted T.
    ece_before, ece_after : float
        Top-label ECE at T = 1 and at the fitted T.
    at_bound : bool
        Whether the fit was degenerate and T was kept at a bound (see `TemperatureScaling`).
    """

    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    at_bound: bool = False

    def __post_init__(self) -> None:
        warn_renamed("TemperatureFit", "the TemperatureScaling that fit_calibrator(learn, 'temperature') returns")


def temperature_from_logits(logits: Tensor, target: Tensor, max_iter: int = 100) -> float:
    """Deprecated: the temperature minimising the mean NLL of softmax(logits / T); use
    `TemperatureScaling(max_iter=max_iter).fit(logits, target).temperature`.

    Parameters
    ----------
    logits : Tensor
        (N, C) logits (any float dtype; fitted in float64).
    target : Tensor
        (N,) class ids.
    max_iter : int
        Bisection steps at most.
    """
    warn_renamed("temperature_from_logits(logits, target)", "TemperatureScaling().fit(logits, target).temperature")
    return TemperatureScaling(max_iter=max_iter).fit(logits, target).temperature


def _nll_and_ece(probs: Tensor, target: Tensor, n_bins: int) -> tuple[float, float]:
    state = CalibrationState(probs.shape[1], n_bins, n_fine=1, device=probs.device, classwise=False)
    state.update(probs, target)
    metrics = state.metrics()
    return metrics["nll"], metrics["ece"]


def fit_temperature(learn: Learner, dl: DataLoader | None = None, n_bins: int = 15,
                    max_iter: int = 100) -> TemperatureFit:
    """Deprecated: fit T on `dl` (default: the validation set) and report NLL and ECE there before and after; use
    `fit_calibrator(learn, "temperature", dl=dl)`, and `compare_calibrators` for before and after on rows the
    calibrator did not see. A T at its bound (100 or 0.01) comes with a `CalibrationWarning` saying what it means.

    Parameters
    ----------
    learn : Learner
        A learner whose model outputs logits (classes on its loss's class axis).
    dl : DataLoader | None
        The data to fit on; None for the validation set.
    n_bins : int
        Bins of the reported ECE.
    max_iter : int
        Bisection steps at most.
    """
    warn_renamed("fit_temperature(learn, dl)", "fit_calibrator(learn, 'temperature', dl=dl)")
    logits, target = holdout_logits(learn, dl)
    scaling = TemperatureScaling(max_iter=max_iter).fit(logits, target)
    nll_before, ece_before = _nll_and_ece(TemperatureScaling(1.0)(logits), target, n_bins)
    nll_after, ece_after = _nll_and_ece(scaling(logits), target, n_bins)
    with warnings.catch_warnings():  # the caller was warned once, about fit_temperature
        warnings.simplefilter("ignore", FutureWarning)
        return TemperatureFit(scaling.temperature, nll_before, nll_after, ece_before, ece_after, scaling.at_bound)


def apply_temperature(learn: Learner, temperature: float) -> Learner:
    """Deprecated: make the learner's predictions softmax(logits / T); returns `learn`. Use
    `apply_calibrator(learn, TemperatureScaling(temperature))`.

    Parameters
    ----------
    learn : Learner
        A learner with a cross-entropy-style loss.
    temperature : float
        T > 0.
    """
    warn_renamed("apply_temperature(learn, t)", "apply_calibrator(learn, TemperatureScaling(t))")
    return apply_calibrator(learn, TemperatureScaling(check_number(temperature, "temperature", strict=True)))


def remove_temperature(learn: Learner) -> Learner:
    """Deprecated: undo `apply_temperature`; returns `learn`. Use `remove_calibrator(learn)`.

    Parameters
    ----------
    learn : Learner
        A learner, with or without an applied temperature.
    """
    warn_renamed("remove_temperature(learn)", "remove_calibrator(learn)")
    return remove_calibrator(learn)
