"""Calibrators that rescale the logits and take a softmax: temperature, vector and matrix scaling, Dirichlet
calibration, and ensemble temperature scaling. Each is fitted by minimising the mean NLL of held-out rows in
float64: the temperature by bisection, the others with LBFGS."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fastai_ls.calibration.calibrators.base import CalibrationWarning, Calibrator, check_int, check_number
from fastai_ls.calibration.calibrators.folds import stratified_folds

__all__ = ["TemperatureScaling", "VectorScaling", "MatrixScaling", "DirichletCalibration",
           "EnsembleTemperatureScaling"]


def _minimise(params: list[Tensor], objective: Callable[[], Tensor], max_iter: int) -> None:
    """Minimise `objective()` over `params` (leaf tensors, updated in place) with LBFGS and a strong-Wolfe search."""
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  history_size=100, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)


class TemperatureScaling(Calibrator):
    """Temperature scaling (Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017).

    Multiclass form: full, p = softmax(z / T) with one T > 0 for all classes, fitted by the mean NLL of held-out
    rows. It never changes the predicted class: dividing by T > 0 keeps the order of the logits. T > 1 softens
    over-confident predictions; T < 1 sharpens under-confident ones (typical after label smoothing).

    The NLL is convex in 1/T, so its minimum within `bounds` is found exactly by bisection on the sign of its
    derivative (Guo et al. run LBFGS on the same NLL; a gradient method stalls where the NLL flattens out). When
    the minimum lies at or beyond a bound, the fit is degenerate: T is kept at the bound (`at_bound`) and a
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
        A temperature to use as it is, without fitting (such a calibrator accepts any number of classes).
    bounds : tuple[float, float]
        The range (low, high) a fitted T is kept in.
    max_iter : int
        Bisection steps at most (each halves the interval of log T; 40 reach 1e-11).

    >>> _ = torch.manual_seed(0); z = torch.randn(2000, 5); y = torch.distributions.Categorical(logits=z).sample()
    >>> 2.5 < TemperatureScaling().fit(3 * z, y).temperature < 3.5
    True
    """

    name = "temperature"
    description = "softmax(z / T): one temperature T fitted by NLL (Guo et al. 2017)"
    form = "full"
    may_change_prediction = False

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
        self.at_bound = False  # whether the last fit was degenerate and T was kept at a bound

    @property
    def fitted(self) -> bool:
        return self.temperature is not None

    def _fit(self, z: Tensor, y: Tensor) -> None:
        low, high = self.bounds
        z_target = z.gather(1, y[:, None]).squeeze(1)

        def slope(log_beta: float) -> float:
            """d(mean NLL)/d(beta) at beta = 1 / T: E_p[z] - z_y averaged over rows, increasing in beta."""
            p = (z * math.exp(log_beta)).softmax(1)
            return float(((p * z).sum(1) - z_target).mean())

        # Bisection on log(1 / T) for the zero of the slope, kept within the bounds.
        left, right = -math.log(high), -math.log(low)
        self.at_bound = True
        if slope(left) >= 0:
            self.temperature = high
            warnings.warn(
                f"temperature: the held-out NLL is lowest at T >= {high:g}, the bound where T is kept. Such a T "
                "makes every prediction nearly uniform: the logits carry almost no information about these "
                "targets (a model that never learned these classes, held-out rows from elsewhere, or targets that "
                "do not match the model's outputs)", CalibrationWarning, stacklevel=3)
        elif slope(right) <= 0:
            self.temperature = low
            warnings.warn(
                f"temperature: the held-out NLL is lowest at T <= {low:g}, the bound where T is kept. Such a T "
                "makes every prediction certain: the model is right with a margin on (almost) every held-out row, "
                "so these rows cannot say how confident it should be (too few, too easy, or seen in training)",
                CalibrationWarning, stacklevel=3)
        else:
            for _ in range(self.max_iter):
                middle = (left + right) / 2
                left, right = (middle, right) if slope(middle) < 0 else (left, middle)
                if right - left < 1e-12:
                    break
            self.temperature = math.exp(-(left + right) / 2)
            self.at_bound = False

    def _probs(self, z: Tensor) -> Tensor:
        return (z / self.temperature).softmax(1)

    def _params_repr(self) -> str:
        return f"temperature={self.temperature:.4g}" + (", at_bound=True" if self.at_bound else "")


class VectorScaling(Calibrator):
    """Vector scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"), a multiclass form of Platt
    scaling.

    Multiclass form: full, p = softmax(w * z + b) with a weight w_k and a bias b_k per class, fitted by the mean NLL
    of held-out rows (LBFGS, from w = 1, b = 0), unregularised as in the paper. It may change the predicted class
    (per-class weights and biases reorder the logits).

    Parameters
    ----------
    max_iter : int
        LBFGS iterations.

    >>> _ = torch.manual_seed(0); z = torch.randn(2000, 3); y = torch.distributions.Categorical(logits=z).sample()
    >>> cal = VectorScaling().fit(z - torch.tensor([2.0, 0.0, 0.0]), y)  # class 0's logit too low by 2
    >>> round(float(cal.bias[0] - cal.bias[1:].mean()), 1)
    2.0
    """

    name = "vector"
    description = "softmax(w * z + b): a weight and a bias per class, fitted by NLL (Guo et al. 2017)"
    form = "full"
    may_change_prediction = True
    per_class = True

    def __init__(self, max_iter: int = 200):
        """A vector scaling to fit."""
        super().__init__()
        self.max_iter = check_int(max_iter, "max_iter")
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None

    def _fit(self, z: Tensor, y: Tensor) -> None:
        weight = torch.ones(z.shape[1], dtype=z.dtype, device=z.device, requires_grad=True)
        bias = torch.zeros_like(weight, requires_grad=True)
        _minimise([weight, bias], lambda: F.cross_entropy(z * weight + bias, y), self.max_iter)
        self.weight, self.bias = weight.detach().cpu(), bias.detach().cpu()

    def _probs(self, z: Tensor) -> Tensor:
        return (z * self.weight.to(z) + self.bias.to(z)).softmax(1)

    def _params_repr(self) -> str:
        return f"n_classes={self.n_classes}"


class MatrixScaling(Calibrator):
    """Matrix scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") with off-diagonal and
    intercept regularisation (ODIR: Kull et al., "Beyond temperature scaling: Obtaining well-calibrated multiclass
    probabilities with Dirichlet calibration", NeurIPS 2019).

    Multiclass form: full, p = softmax(W x + b) with x = z, fitted from W = I, b = 0 by minimising

        mean NLL + reg * (sum_{i != j} W_ij^2 / (C (C - 1)) + sum_j b_j^2 / C)

    Unregularised, its C^2 + C parameters overfit at tens of classes; ODIR pulls the off-diagonal weights and the
    biases towards 0 but leaves the diagonal (a per-class temperature) free. With `reg=None`, reg is chosen from
    `reg_grid` by the held-out NLL of a seeded 3-fold cross-validation on the fitting rows, as Kull et al. choose
    theirs, then the model is refitted on all rows with it (`reg_` holds the choice). It may change the predicted
    class.

    Parameters
    ----------
    reg : float | None
        The ODIR strength (lambda = mu in Kull et al.); None chooses it by cross-validation.
    reg_grid : tuple[float, ...]
        The strengths tried when `reg` is None.
    max_iter : int
        LBFGS iterations per fit.

    >>> _ = torch.manual_seed(0); z = torch.randn(3000, 3); y = torch.distributions.Categorical(logits=z).sample()
    >>> distorted = z @ torch.tensor([[2., 0, 0], [0, 1, 0], [0, 0, 1]])  # class 0's logit doubled
    >>> cal = MatrixScaling(reg=0.0).fit(distorted, y)
    >>> def gap(p): return float((p - z.softmax(1)).abs().mean())  # from the true probabilities
    >>> gap(cal(distorted)) < gap(distorted.softmax(1)) / 3
    True
    """

    name = "matrix"
    description = "softmax(W z + b) with off-diagonal and intercept regularisation (Guo et al. 2017; Kull et al. 2019)"
    form = "full"
    may_change_prediction = True
    per_class = True
    cv_folds = 3

    def __init__(self, reg: float | None = None, reg_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0),
                 max_iter: int = 500):
        """A regularised matrix scaling to fit."""
        super().__init__()
        if reg is not None:
            reg = check_number(reg, "reg")
        if not reg_grid:
            raise ValueError(f"reg_grid must hold finite numbers >= 0, got {reg_grid!r}")
        self.reg, self.reg_grid = reg, tuple(check_number(r, "each of reg_grid") for r in reg_grid)
        self.max_iter = check_int(max_iter, "max_iter")
        self.reg_: float | None = None
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None

    def _features(self, z: Tensor) -> Tensor:
        return z

    def _solve(self, x: Tensor, y: Tensor, reg: float,
               start: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """(W, b) minimising the regularised NLL, from `start` (default W = I, b = 0)."""
        n_classes = x.shape[1]
        if start is None:
            start = torch.eye(n_classes, dtype=x.dtype, device=x.device), torch.zeros_like(x[0])
        weight, bias = (t.clone().requires_grad_() for t in start)
        off_diagonal = 1 - torch.eye(n_classes, dtype=x.dtype, device=x.device)

        def objective() -> Tensor:
            loss = F.cross_entropy(x @ weight.T + bias, y)
            if reg:
                loss = loss + reg * ((weight * off_diagonal).square().sum() / (n_classes * (n_classes - 1))
                                     + bias.square().sum() / n_classes)
            return loss

        _minimise([weight, bias], objective, self.max_iter)
        return weight.detach(), bias.detach()

    def _choose_reg(self, x: Tensor, y: Tensor) -> float:
        """The strength in `reg_grid` with the lowest cross-validated NLL (the larger one on a tie)."""
        if len(self.reg_grid) == 1:
            return self.reg_grid[0]
        fold_of = stratified_folds(y, self.cv_folds, seed=0).to(x.device)
        grid = sorted(self.reg_grid, reverse=True)
        held_out_nll = dict.fromkeys(grid, 0.0)
        for k in range(self.cv_folds):
            train, held = fold_of != k, fold_of == k
            solution = None
            for reg in grid:  # from the strongest, each fit starting where the previous one ended
                solution = self._solve(x[train], y[train], reg, solution)
                weight, bias = solution
                held_out_nll[reg] += float(F.cross_entropy(x[held] @ weight.T + bias, y[held], reduction="sum"))
        return min(grid, key=lambda reg: (held_out_nll[reg], -reg))

    def _fit(self, z: Tensor, y: Tensor) -> None:
        x = self._features(z)
        self.reg_ = float(self.reg) if self.reg is not None else self._choose_reg(x, y)
        weight, bias = self._solve(x, y, self.reg_)
        self.weight, self.bias = weight.cpu(), bias.cpu()

    def _probs(self, z: Tensor) -> Tensor:
        return (self._features(z) @ self.weight.to(z).T + self.bias.to(z)).softmax(1)

    def _params_repr(self) -> str:
        return f"n_classes={self.n_classes}, reg={self.reg_:g}"


class DirichletCalibration(MatrixScaling):
    """Dirichlet calibration with ODIR (Kull, Perello-Nieto, Kängsepp, Silva Filho, Song & Flach, "Beyond
    temperature scaling: Obtaining well-calibrated multiclass probabilities with Dirichlet calibration", NeurIPS
    2019).

    Multiclass form: full, p = softmax(W log q + b) where q = softmax(z) are the model's probabilities: matrix
    scaling on log-probabilities (the paper's "Dir-ODIR"), with the same regulariser and the same choice of its
    strength as `MatrixScaling`. Unlike matrix scaling on logits, it depends only on the probabilities, not on how
    the logits are shifted. It may change the predicted class.

    Parameters
    ----------
    reg : float | None
        The ODIR strength; None chooses it by cross-validation.
    reg_grid : tuple[float, ...]
        The strengths tried when `reg` is None.
    max_iter : int
        LBFGS iterations per fit.

    >>> _ = torch.manual_seed(0); z = torch.randn(1000, 3); y = torch.distributions.Categorical(logits=z).sample()
    >>> DirichletCalibration(reg=0.01).fit(z, y)(z).shape
    torch.Size([1000, 3])
    """

    name = "dirichlet"
    description = "softmax(W log p + b) with ODIR regularisation (Kull et al. 2019)"

    def _features(self, z: Tensor) -> Tensor:
        return z.log_softmax(1)


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

    def _terms(self, z: Tensor) -> Tensor:
        """(N, C, 3): softmax(z / T), softmax(z), 1 / C."""
        return torch.stack([self.scaling._probs(z), z.softmax(1), torch.full_like(z, 1 / z.shape[1])], 2)

    def _fit(self, z: Tensor, y: Tensor) -> None:
        self.scaling._fit(z, y)
        self.scaling.n_classes = z.shape[1]
        terms_of_target = self._terms(z).gather(1, y[:, None, None].expand(-1, 1, 3)).squeeze(1)  # (N, 3)
        logit_w = torch.tensor([2.0, 0.0, -2.0], dtype=z.dtype, device=z.device, requires_grad=True)

        def nll() -> Tensor:
            return -(terms_of_target @ logit_w.softmax(0)).clamp_min(1e-300).log().mean()

        _minimise([logit_w], nll, self.max_iter)
        self.weights = logit_w.detach().softmax(0).cpu()

    def _probs(self, z: Tensor) -> Tensor:
        return self._terms(z) @ self.weights.to(z)

    def _params_repr(self) -> str:
        w = ", ".join(f"{float(v):.3f}" for v in self.weights)
        return f"temperature={self.temperature:.4g}, weights=({w})"
