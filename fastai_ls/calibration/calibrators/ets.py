"""Ensemble temperature scaling: a mixture of the temperature-scaled, the original and the uniform probabilities."""

from __future__ import annotations

import torch
from torch import Tensor

from fastai_ls.calibration.calibrators.base import Calibrator
from fastai_ls.calibration.calibrators.solver import minimise, scaled_softmax
from fastai_ls.calibration.calibrators.temperature import TemperatureScaling
from fastai_ls.validation import check_int

__all__ = ["EnsembleTemperatureScaling"]


class EnsembleTemperatureScaling(Calibrator):
    """Ensemble temperature scaling (Zhang, Kailkhura & Han, "Mix-n-Match: Ensemble and Compositional Methods for
    Uncertainty Calibration in Deep Learning", ICML 2020).

    Multiclass form: full, p = w1 softmax(z / T) + w2 softmax(z) + w3 / C with weights on the simplex: T is fitted
    as in `TemperatureScaling`, then the weights by the mean NLL (the paper's code offers MSE or NLL; this is NLL).
    The uniform term keeps every probability above 0. It never changes the predicted class: each term is largest
    at the largest logit.

    Parameters
    ----------
    bounds : tuple[float, float]
        The range a fitted T is kept in (see `TemperatureScaling`).
    max_iter : int
        Bisection steps of the temperature, LBFGS iterations of the weights.

    Examples
    --------
    >>> _ = torch.manual_seed(0); z = torch.randn(2000, 4); y = torch.distributions.Categorical(logits=z).sample()
    >>> cal = EnsembleTemperatureScaling().fit(3 * z, y)
    >>> bool(abs(float(cal.weights.sum()) - 1) < 1e-9)
    True
    """

    name = "ets"
    description = "w1 softmax(z / T) + w2 softmax(z) + w3 / C, fitted by NLL (Zhang et al. 2020)"
    form = "full"
    may_change_prediction = False

    def __init__(self, bounds: tuple[float, float] = (0.01, 100.0), max_iter: int = 100):
        """An ensemble temperature scaling to fit."""
        super().__init__()
        self.scaling = TemperatureScaling(bounds=bounds, max_iter=max_iter)
        self.max_iter = check_int(max_iter, "max_iter")
        self.weights: Tensor | None = None

    @property
    def temperature(self) -> float | None:
        """The fitted T of the first term."""
        return self.scaling.temperature

    def _fit(self, z: Tensor, y: Tensor) -> None:
        self.scaling._fit(z, y)
        self.scaling.n_classes = z.shape[1]
        # Only the target's probability of each term enters the NLL: (N, 3), never an (N, C, 3) stack.
        z_target = z.gather(1, y[:, None])
        terms_of_target = torch.cat([
            (z_target / self.scaling.temperature - (z / self.scaling.temperature).logsumexp(1, keepdim=True)).exp(),
            (z_target - z.logsumexp(1, keepdim=True)).exp(),
            torch.full_like(z_target, 1 / z.shape[1])], 1)
        logit_w = torch.tensor([2.0, 0.0, -2.0], dtype=z.dtype, device=z.device, requires_grad=True)

        def nll() -> Tensor:
            return -(terms_of_target @ logit_w.softmax(0)).clamp_min(1e-300).log().mean()

        minimise([logit_w], nll, self.max_iter)
        self.weights = logit_w.detach().softmax(0).cpu()

    def _probs(self, z: Tensor) -> Tensor:
        w = self.weights.to(z)
        return w[0] * self.scaling._probs(z) + w[1] * scaled_softmax(z, lambda x: x) + w[2] / z.shape[1]

    def _params_repr(self) -> str:
        w = ", ".join(f"{float(v):.3f}" for v in self.weights)
        return f"temperature={self.temperature:.4g}, weights=({w})"
