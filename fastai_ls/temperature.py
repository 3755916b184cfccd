"""Temperature scaling (Guo et al. 2017): one scalar T with p = softmax(z / T), fitted by NLL on held-out logits.

Accuracy is unchanged; T < 1 sharpens under-confident predictions (typical after label smoothing), T > 1 softens
over-confident ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastcore.basics import noop
from torch import Tensor

from fastai_ls.calibration.state import CalibrationState
from fastai_ls.predictions import class_axis_of, class_rows

__all__ = ["TemperatureFit", "fit_temperature", "temperature_from_logits", "apply_temperature", "remove_temperature",
           "TemperatureScaledActivation"]


@dataclass
class TemperatureFit:
    """The fitted temperature and the metrics of the same predictions before (T = 1) and after scaling."""

    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float


def temperature_from_logits(
    logits: Tensor,  # (N, C) logits (any float dtype; fitted in float32)
    target: Tensor,  # (N,) class ids
    max_iter: int = 100,  # LBFGS iterations
) -> float:
    """The temperature minimising the mean NLL of softmax(logits / T), fitted as log T (so T > 0) by LBFGS.

    >>> _ = torch.manual_seed(0); z = torch.randn(2000, 5); y = torch.distributions.Categorical(logits=z).sample()
    >>> 2.5 < temperature_from_logits(3 * z, y) < 3.5
    True
    """
    logits, target = logits.detach().float(), target.detach().long()
    log_t = torch.zeros((), device=logits.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), target)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def _rows(logits: Tensor, target: Tensor, loss_func) -> tuple[Tensor, Tensor]:
    """(rows, C) logits and (rows,) targets on the loss's class axis, without the rows the loss ignores."""
    logits, target = class_rows(logits, target, loss_func)
    ignore_index = getattr(loss_func, "ignore_index", None)
    if ignore_index is not None:
        kept = target != ignore_index
        logits, target = logits[kept], target[kept]
    return logits, target


def _nll_and_ece(logits: Tensor, target: Tensor, temperature: float, n_bins: int) -> tuple[float, float]:
    state = CalibrationState(logits.shape[1], n_bins, n_fine=1, device=logits.device, classwise=False)
    state.update((logits.float() / temperature).softmax(1), target)
    metrics = state.metrics()
    return metrics["nll"], metrics["ece"]


def fit_temperature(
    learn: Learner,  # a fastai Learner whose model outputs logits (classes on its loss's class axis)
    dl: DataLoader | None = None,  # the data to fit on; default the validation set (`ds_idx=1`)
    n_bins: int = 15,  # bins of the reported ECE
    max_iter: int = 100,  # LBFGS iterations
) -> TemperatureFit:
    """Fit T on `dl` (default: the validation set) and report NLL and ECE there before and after scaling.

    Fitting and scoring on the same split flatters the "after" numbers (an oracle T): pass a held-out `dl` to fit
    on, and score the result on data it has not seen. The learner is not changed; see `apply_temperature`.

    >>> fit = fit_temperature(learn, dl=learn.dls.test_dl(holdout_items, with_labels=True))  # doctest: +SKIP
    >>> apply_temperature(learn, fit.temperature)  # doctest: +SKIP
    """
    logits, target = learn.get_preds(dl=dl, act=noop)  # raw logits, even if a temperature is applied already
    logits, target = _rows(logits, target, learn.loss_func)
    temperature = temperature_from_logits(logits, target, max_iter)
    nll_before, ece_before = _nll_and_ece(logits, target, 1.0, n_bins)
    nll_after, ece_after = _nll_and_ece(logits, target, temperature, n_bins)
    return TemperatureFit(temperature, nll_before, nll_after, ece_before, ece_after)


class TemperatureScaledActivation:
    """The loss's own activation applied to logits / T; set as `loss_func.activation` by `apply_temperature`.

    A module-level class holding no lambda or bound method, so it survives `learn.export()` and `load_learner`.
    """

    def __init__(self, loss_func, temperature: float):
        self.loss_func, self.temperature = loss_func, float(temperature)

    def __call__(self, out: Tensor) -> Tensor:
        base = getattr(type(self.loss_func), "activation", None)  # the class's method, not this instance override
        scaled = out / self.temperature
        if base is not None:
            return base(self.loss_func, scaled)
        return scaled.float().softmax(class_axis_of(self.loss_func, scaled.dim()))

    def __repr__(self) -> str:
        return f"TemperatureScaledActivation(temperature={self.temperature:g})"


def apply_temperature(learn: Learner, temperature: float) -> Learner:
    """Make `learn.get_preds()`, `predict()` and `CalibrationCallback` use softmax(logits / T); returns `learn`.

    Training is unaffected (the loss still sees raw logits). Applying again replaces T; `remove_temperature` undoes.

    >>> apply_temperature(learn, fit_temperature(learn, dl=holdout_dl).temperature)  # doctest: +SKIP
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    loss_func = learn.loss_func
    try:
        loss_func.activation = TemperatureScaledActivation(loss_func, temperature)
    except AttributeError as e:
        raise TypeError(f"cannot set an activation on a {type(loss_func).__name__} loss; scale the logits yourself: "
                        "learn.get_preds(act=...)") from e
    return learn


def remove_temperature(learn: Learner) -> Learner:
    """Undo `apply_temperature`; returns `learn`."""
    if isinstance(learn.loss_func.__dict__.get("activation"), TemperatureScaledActivation):
        del learn.loss_func.__dict__["activation"]
    return learn
