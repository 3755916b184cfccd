"""Temperature scaling: softmax(z / T) with one T fitted by safeguarded Newton steps on the held-out NLL."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from fastai_ls.calibration.calibrators.base import CalibrationWarning, Calibrator, row_blocks
from fastai_ls.calibration.calibrators.row_subset import RowSubset
from fastai_ls.calibration.calibrators.solver import scaled_softmax
from fastai_ls.validation import check_int, check_number

__all__ = ["TemperatureScaling", "quiet_temperature", "TEMPERATURE_SAMPLE"]

# Rows of the sample that gives the temperature's Newton steps their start.
TEMPERATURE_SAMPLE = 4096


def _temperature_moments(z: Tensor | RowSubset, z_target: Tensor, beta: float) -> tuple[float, float]:
    """The first and second derivatives of the mean NLL of softmax(beta z) in beta: mean(E_p[z] - z_y) and
    mean(Var_p[z]), computed in float64 block by block (bounded memory: `z` may be float32)."""
    slope = torch.zeros((), dtype=torch.float64, device=z.device)
    curvature = torch.zeros((), dtype=torch.float64, device=z.device)
    for rows in row_blocks(*z.shape):
        block = z[rows].double()
        p = (block * beta).softmax(1)
        mean = (p * block).sum(1)
        slope += (mean - z_target[rows]).sum()
        curvature += (p * (block - mean[:, None]).square()).sum()
    return float(slope) / len(z), float(curvature) / len(z)


class TemperatureScaling(Calibrator):
    """Temperature scaling (Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017).

    Multiclass form: full, p = softmax(z / T) with one T > 0 for all classes, fitted by the mean NLL of held-out
    rows. It never changes the predicted class: dividing by T > 0 keeps the order of the logits. T > 1 softens
    over-confident predictions; T < 1 sharpens under-confident ones (typical after label smoothing).

    The NLL is convex in beta = 1/T, so its minimum within `bounds` is found by safeguarded Newton steps on its
    derivative (the curvature is the mean variance of the logits under p): each step is one pass over the logits,
    a step that would leave the bracket around the minimum bisects it instead, and the steps start from the minimum
    of a seeded sample of 4096 rows, so that a few passes over all rows reach it to 1e-9 (Guo et al. run LBFGS on
    the same NLL; a gradient method stalls where the NLL flattens out).
    When the minimum lies at or beyond a bound, the fit is degenerate: T is kept at the bound (`at_bound`) and a
    `CalibrationWarning` says which case it is.

    - T at the upper bound (default 100; unbounded fits have returned 10^5 to 10^6): the NLL falls as every
      prediction flattens towards uniform, so the logits carry (almost) no information about these targets: a
      model that never learned these classes (say, trained on one or two of them), held-out rows from elsewhere,
      or targets that do not match the model's outputs. Exactly at infinity when the target's logit is on average
      no higher than the row's mean logit.
    - T at the lower bound (default 0.01): the model is right with a margin on (almost) every held-out row, so the
      NLL falls as predictions become certain: these rows cannot say how confident the model should be (too few,
      too easy, or rows it was trained on). Exactly at 0 when every held-out row is right.

    Parameters
    ----------
    temperature : float | None
        A temperature to use as it is: `fit` keeps it (it only checks its input) and `compare_calibrators` scores
        it as given; such a calibrator accepts any number of classes.
    bounds : tuple[float, float]
        The range (low, high) a fitted T is kept in.
    max_iter : int
        Newton or bisection steps at most.

    Examples
    --------
    >>> _ = torch.manual_seed(0); z = torch.randn(2000, 5); y = torch.distributions.Categorical(logits=z).sample()
    >>> 2.5 < TemperatureScaling().fit(3 * z, y).temperature < 3.5
    True
    """

    name = "temperature"
    description = "softmax(z / T): one temperature T fitted by NLL (Guo et al. 2017)"
    form = "full"
    may_change_prediction = False
    upcasts_in_blocks = True

    def __init__(self, temperature: float | None = None, bounds: tuple[float, float] = (0.01, 100.0),
                 max_iter: int = 100):
        """A temperature to fit, or the given one."""
        super().__init__()
        low, high = bounds
        if not (0 < low < high < math.inf):
            raise ValueError(f"bounds must be 0 < low < high < inf, got {bounds!r}")
        if temperature is not None:
            temperature = check_number(temperature, "temperature", strict=True)
        self.bounds = (float(low), float(high))
        self.max_iter = check_int(max_iter, "max_iter")
        self.temperature: float | None = None if temperature is None else float(temperature)
        self.fixed = temperature is not None  # a given temperature, kept by fit
        self.at_bound = False  # whether the last fit was degenerate and T was kept at a bound

    @property
    def fitted(self) -> bool:
        return self.temperature is not None

    def fit(self, logits: Tensor, target: Tensor, rows: Tensor | None = None) -> TemperatureScaling:
        """Fit T on held-out (N, C) `logits` and their (N,) class ids `target` (a given temperature is kept: only
        the input is checked); returns the calibrator itself.

        Parameters
        ----------
        logits : Tensor
            (N, C) logits of held-out data (any float dtype and device; fitted in float64).
        target : Tensor
            (N,) integer class ids in [0, C).
        rows : Tensor, optional
            (M,) indices of the rows to fit on: the same fit as on `logits[rows]`, `target[rows]`, without a copy
            of those rows.
        """
        super().fit(logits, target, rows)
        if self.fixed:
            self.n_classes = None  # a given temperature stays usable with any number of classes
        return self

    def _fit(self, z: Tensor | RowSubset, y: Tensor) -> None:
        if self.fixed:
            return
        low, high = self.bounds
        z_target = torch.cat([z[rows].gather(1, y[rows, None]).squeeze(1) for rows in row_blocks(*z.shape)]).double()
        beta = min(max(1.0, 1 / high), 1 / low)
        if len(z) > TEMPERATURE_SAMPLE:
            # A start from a seeded sample of the rows: Newton's steps on all rows then start next to the minimum.
            generator = torch.Generator().manual_seed(0)
            rows = torch.randperm(len(z), generator=generator)[:TEMPERATURE_SAMPLE].to(z.device)
            beta = self._solve(z[rows], z_target[rows], beta)[0]
        beta, bound = self._solve(z, z_target, beta)
        self.temperature, self.at_bound = 1 / beta, bound is not None
        if bound == "high":
            warnings.warn(
                f"temperature: the held-out NLL is lowest at T >= {high:g}, the bound where T is kept. Such a T "
                "makes every prediction nearly uniform: the logits carry almost no information about these "
                "targets (a model that never learned these classes, held-out rows from elsewhere, or targets that "
                "do not match the model's outputs)", CalibrationWarning, stacklevel=3)
        elif bound == "low":
            warnings.warn(
                f"temperature: the held-out NLL is lowest at T <= {low:g}, the bound where T is kept. Such a T "
                "makes every prediction certain: the model is right with a margin on (almost) every held-out row, "
                "so these rows cannot say how confident it should be (too few, too easy, or seen in training)",
                CalibrationWarning, stacklevel=3)

    def _solve(self, z: Tensor | RowSubset, z_target: Tensor, beta: float) -> tuple[float, str | None]:
        """(beta, bound): the minimum of the NLL in beta = 1 / T from `beta`, and 'low' or 'high' when it lies at
        or beyond that bound of T (only the bound on the side of the minimum is checked: one pass, not two; Newton's
        steps towards a minimum beyond a bound would creep there until the slope rounds to 0)."""
        low, high = self.bounds
        left, right = 1 / high, 1 / low  # the bracket of the minimum
        slope, curvature = _temperature_moments(z, z_target, beta)
        if slope > 0 and _temperature_moments(z, z_target, left)[0] >= 0:
            return left, "high"
        if slope < 0 and _temperature_moments(z, z_target, right)[0] <= 0:
            return right, "low"
        for step_number in range(self.max_iter):
            if step_number:
                slope, curvature = _temperature_moments(z, z_target, beta)
            if slope == 0:
                return beta, None
            left, right = (beta, right) if slope < 0 else (left, beta)
            step = beta - slope / curvature if curvature > 0 else math.nan
            if not left < step < right:
                step = math.sqrt(left * right)
            if abs(step - beta) <= 1e-9 * beta or right - left <= 1e-9 * right:
                return step, None
            beta = step
        return beta, None

    def _probs(self, z: Tensor) -> Tensor:
        return scaled_softmax(z, lambda x: x / self.temperature)

    def _params_repr(self) -> str:
        return f"temperature={self.temperature:.4g}" + (", at_bound=True" if self.at_bound else "")


def quiet_temperature(z: Tensor, y: Tensor) -> float:
    """The fitted temperature, as a starting point (its bound warnings are about temperature scaling itself)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        scaling = TemperatureScaling()
        scaling._fit(z, y)
    return scaling.temperature

