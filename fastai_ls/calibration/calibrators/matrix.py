"""Matrix scaling, softmax(W z + b), and Dirichlet calibration, softmax(W log p + b), both with ODIR regularisation
(off-diagonal weights and biases pulled towards 0)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fastai_ls.calibration.calibrators.solver import FLOAT32_FIRST, RegularisationPath, fit_parameters, scaled_softmax
from fastai_ls.calibration.calibrators.temperature import quiet_temperature
from fastai_ls.validation import check_int

__all__ = ["MatrixScaling", "DirichletCalibration", "LOG_FLOOR"]

# Log-probabilities are kept above log(float64's smallest normal number), so that a weight times a feature stays
# finite when a probability underflows to 0 (a -inf log).
LOG_FLOOR = math.log(torch.finfo(torch.float64).tiny)


def _matrix_nll(reg: float) -> Callable[[list[Tensor], Tensor, Tensor], Tensor]:
    """The ODIR-regularised mean NLL of softmax(W x + b) as a function of ([W, b], x, y); for reg = inf, of
    softmax(d * x) alone (off-diagonal weights and biases held at 0, where an infinite ODIR strength puts them)."""
    if math.isinf(reg):
        return lambda params, x, y: F.cross_entropy(x * params[0].to(x.dtype), y)

    def loss(params: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
        weight, bias = (t.to(x.dtype) for t in params)
        nll = F.cross_entropy(torch.addmm(bias, x, weight.T), y)
        if not reg:
            return nll
        n_classes = x.shape[1]
        off_diagonal = weight.square().sum() - weight.diagonal().square().sum()
        return nll + reg * (off_diagonal / (n_classes * (n_classes - 1)) + bias.square().sum() / n_classes)

    return loss


class MatrixScaling(RegularisationPath):
    """Matrix scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") with off-diagonal and
    intercept regularisation (ODIR: Kull et al., "Beyond temperature scaling: Obtaining well-calibrated multiclass
    probabilities with Dirichlet calibration", NeurIPS 2019).

    Multiclass form: full, p = softmax(W x + b) with x = z, fitted by minimising

        mean NLL + reg * (sum_{i != j} W_ij^2 / (C (C - 1)) + sum_j b_j^2 / C)

    Unregularised, its C^2 + C parameters overfit at tens of classes; ODIR pulls the off-diagonal weights and the
    biases towards 0 but leaves the diagonal (a per-class temperature) free. Its limit reg = inf, a diagonal W
    alone (b = 0), is fitted first, from the fitted temperature (W = I / T). With `reg=None`, reg is chosen among
    `reg_grid` and inf by the NLL of a seeded third of the fitting rows held out (by the mean over the three thirds
    in turn for problems of at most 2^18 logits, where one third's NLL is too noisy a guide; Kull et al. choose
    theirs by cross-validation), along a path from the strongest strength to the weakest, each fit starting where the
    previous one ended and the path stopping once the held-out NLL rises; then the model is refitted on
    all rows from there (`reg_` holds the choice). Since the diagonal is a candidate, the chosen fit is never worse
    on the held-out rows than that diagonal fit, which starts from temperature scaling. Each fit is LBFGS with a
    short history (memory: a few copies of the C^2 weights), in float32 then float64 for large problems.

    Its cost grows as N C^2 per pass: above `max_classes` classes `fit` raises a ValueError that says so and
    `compare_calibrators` skips the method (at 1,000 classes, a million weights from tens of thousands of rows,
    and hours of fitting); use vector scaling, temperature scaling or ETS there.

    It may change the predicted class.

    Parameters
    ----------
    reg : float | None
        The ODIR strength (lambda = mu in Kull et al.; math.inf for the diagonal alone); None chooses it on
        held-out rows.
    reg_grid : tuple[float, ...]
        The strengths tried when `reg` is None (besides inf, the diagonal alone).
    max_iter : int
        LBFGS iterations of the final fit (a fifth of them per strength of the path).
    max_classes : int
        The most classes fitted (see above).

    Examples
    --------
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
    quadratic_work = True
    cross_validate_below = FLOAT32_FIRST

    def __init__(self, reg: float | None = None,
                 reg_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4),
                 max_iter: int = 500, max_classes: int = 200):
        """A regularised matrix scaling to fit."""
        super().__init__(reg, reg_grid, max_iter)
        self.max_classes = check_int(max_classes, "max_classes", low=2)
        self.reg_: float | None = None
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None

    def skip_reason(self, n_rows: int, n_classes: int) -> str | None:
        if n_classes <= self.max_classes:
            return None
        return (f"{n_classes} classes are more than max_classes={self.max_classes}: W has {n_classes ** 2:,} "
                f"weights to fit from {n_rows:,} rows, at {n_rows * n_classes ** 2:.1e} multiply-adds per pass "
                f"over the data; use 'vector', 'temperature' or 'ets' (or raise max_classes to fit it anyway)")

    def _features(self, z: Tensor) -> Tensor:
        return z

    def _solve(self, x: Tensor, y: Tensor, reg: float, start: list[Tensor], max_iter: int) -> list[Tensor]:
        """[W, b] minimising the regularised NLL from `start` ([d] for reg = inf)."""
        work = x.numel() * (1 if math.isinf(reg) else x.shape[1])
        return fit_parameters(_matrix_nll(reg), start, x, y, max_iter, work)

    def _loss(self, reg: float) -> Callable[[list[Tensor], Tensor, Tensor], Tensor]:
        return _matrix_nll(reg)

    def _full(self, params: list[Tensor]) -> list[Tensor]:
        """[W, b] of a diagonal solution [d], or the solution itself."""
        return [torch.diag(params[0]), torch.zeros_like(params[0])] if len(params) == 1 else params

    def _fit(self, z: Tensor, y: Tensor) -> None:
        x = self._features(z)
        diagonal = [torch.full_like(x[0], 1 / quiet_temperature(x, y))]
        if self.reg is not None:
            self.reg_, start = float(self.reg), self._full(diagonal)
        else:
            self.reg_, start = self._choose_reg(x, y, diagonal)
        if math.isinf(self.reg_):
            start = diagonal
        weight, bias = self._full(self._solve(x, y, self.reg_, start, self.max_iter))
        self.weight, self.bias = weight.cpu(), bias.cpu()

    def _probs(self, z: Tensor) -> Tensor:
        weight = self.weight.to(z)
        return scaled_softmax(self._features(z), lambda x: x @ weight.T, self.bias.to(z))

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
        The ODIR strength; None chooses it on held-out rows (as `MatrixScaling`).
    reg_grid : tuple[float, ...]
        The strengths tried when `reg` is None.
    max_iter : int
        LBFGS iterations of the final fit (a fifth of them per strength of the path).
    max_classes : int
        The most classes fitted (see `MatrixScaling`).

    Examples
    --------
    >>> _ = torch.manual_seed(0); z = torch.randn(1000, 3); y = torch.distributions.Categorical(logits=z).sample()
    >>> DirichletCalibration(reg=0.01).fit(z, y)(z).shape
    torch.Size([1000, 3])
    """

    name = "dirichlet"
    description = "softmax(W log p + b) with ODIR regularisation (Kull et al. 2019)"

    def _features(self, z: Tensor) -> Tensor:
        return z.log_softmax(1).clamp_min(LOG_FLOOR)


