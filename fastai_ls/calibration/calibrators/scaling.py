"""Calibrators that rescale the logits and take a softmax: temperature, vector and matrix scaling, Dirichlet
calibration, and ensemble temperature scaling. Each is fitted by minimising the mean NLL of held-out rows: the
temperature by safeguarded Newton steps in float64, the others with LBFGS from the fitted temperature (in float32
first for large problems, always finished and checked in float64). Each applies its map without overflow for any
finite logits (`_scaled_softmax`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fastai_ls.calibration.calibrators.base import CalibrationWarning, Calibrator, check_int, check_number, row_blocks
from fastai_ls.calibration.calibrators.folds import stratified_folds

__all__ = ["TemperatureScaling", "VectorScaling", "MatrixScaling", "DirichletCalibration",
           "EnsembleTemperatureScaling"]


# Problems of more multiply-adds per pass than this are first solved in float32, then refined in float64 (at most
# FLOAT64_REFINE iterations) from there.
FLOAT32_FIRST = 2**18
FLOAT64_REFINE = 10
# Rows of the sample that gives the temperature's Newton steps their start.
TEMPERATURE_SAMPLE = 4096
# Log-probabilities are kept above log(float64's smallest normal number), so that a weight times a feature stays
# finite when a probability underflows to 0 (a -inf log).
LOG_FLOOR = math.log(torch.finfo(torch.float64).tiny)


def _scaled_softmax(z: Tensor, linear: Callable[[Tensor], Tensor], bias: Tensor | None = None) -> Tensor:
    """softmax(linear(z) + bias) for a linear map, without overflow where the logits are huge: with s a power of
    two such that |z| <= 2 s row by row, it is softmax(s * (u - max u)) for u = linear(z / s) + bias / s, which is
    the same in exact arithmetic and in floating point (a power of two only moves the exponent), and finite for
    any finite logits (finite logits near 3e38 gave NaN rows)."""
    exponent = torch.frexp(z.abs().amax(1, keepdim=True).clamp_min(1)).exponent
    scale = torch.ldexp(torch.ones_like(z[:, :1]), exponent - 1)
    u = linear(z / scale)
    if bias is not None:
        u = u + bias / scale
    return ((u - u.amax(1, keepdim=True)) * scale).softmax(1)


def _minimise(params: list[Tensor], objective: Callable[[], Tensor], max_iter: int,
              tolerance_grad: float = 1e-9, tolerance_change: float = 1e-12) -> None:
    """Minimise `objective()` over `params` (leaf tensors, updated in place) with LBFGS and a strong-Wolfe search,
    keeping 10 steps of history (memory: 20 copies of the parameters), until no gradient entry exceeds
    `tolerance_grad` or a step changes the loss by less than `tolerance_change`."""
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=tolerance_grad,
                                  tolerance_change=tolerance_change, history_size=10, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)


def _fit_parameters(loss: Callable[[list[Tensor], Tensor, Tensor], Tensor], start: list[Tensor], x: Tensor,
                    y: Tensor, max_iter: int, work: int) -> list[Tensor]:
    """The parameters minimising `loss(params, x, y)` from `start` (float64). A large problem (`work`, the
    multiply-adds of one pass, above FLOAT32_FIRST) is solved in float32 first, then refined in float64 (at most
    FLOAT64_REFINE more iterations, none if no float64 gradient entry exceeds 1e-5, float32's resolution of the
    loss); the float64 loss of the result is checked against the start's, and the start is kept if the result is
    not better (a fit never ends worse than where it began)."""
    params = [t.detach().clone() for t in start]
    tolerance_grad = 1e-9
    if work > FLOAT32_FIRST and x.dtype == torch.float64:
        x32 = x.float()
        single = [t.float().requires_grad_() for t in params]
        # float32 resolves a loss of a few nats to about 1e-6: smaller changes are rounding
        _minimise(single, lambda: loss(single, x32, y), max_iter, tolerance_grad=1e-5, tolerance_change=1e-6)
        params = [t.detach().double() for t in single]
        max_iter, tolerance_grad = min(max_iter, FLOAT64_REFINE), 1e-5
    double = [t.requires_grad_() for t in params]
    _minimise(double, lambda: loss(double, x, y), max_iter, tolerance_grad)
    with torch.no_grad():
        if not float(loss(double, x, y)) < float(loss(start, x, y)):
            return [t.detach().clone() for t in start]
    return [t.detach() for t in double]


def _temperature_moments(z: Tensor, z_target: Tensor, beta: float) -> tuple[float, float]:
    """The first and second derivatives of the mean NLL of softmax(beta z) in beta: mean(E_p[z] - z_y) and
    mean(Var_p[z]), computed in float64 block by block (bounded memory: `z` may be float32)."""
    slope = z.new_zeros((), dtype=torch.float64)
    curvature = z.new_zeros((), dtype=torch.float64)
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

    def fit(self, logits: Tensor, target: Tensor) -> TemperatureScaling:
        """Fit T on held-out (N, C) `logits` and their (N,) class ids `target` (a given temperature is kept: only
        the input is checked); returns the calibrator itself.

        Parameters
        ----------
        logits : Tensor
            (N, C) logits of held-out data (any float dtype and device; fitted in float64).
        target : Tensor
            (N,) integer class ids in [0, C).
        """
        super().fit(logits, target)
        if self.fixed:
            self.n_classes = None  # a given temperature stays usable with any number of classes
        return self

    def _fit(self, z: Tensor, y: Tensor) -> None:
        if self.fixed:
            return
        low, high = self.bounds
        z_target = z.gather(1, y[:, None]).squeeze(1).double()
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

    def _solve(self, z: Tensor, z_target: Tensor, beta: float) -> tuple[float, str | None]:
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
        return _scaled_softmax(z, lambda x: x / self.temperature)

    def _params_repr(self) -> str:
        return f"temperature={self.temperature:.4g}" + (", at_bound=True" if self.at_bound else "")


def _quiet_temperature(z: Tensor, y: Tensor) -> float:
    """The fitted temperature, as a starting point (its bound warnings are about temperature scaling itself)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        scaling = TemperatureScaling()
        scaling._fit(z, y)
    return scaling.temperature


def _vector_nll_and_gradient(weight: Tensor, bias: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The mean NLL of softmax(w * x + b) and its gradients in w and b, in one pass over row blocks (bounded
    memory; about a third less time per evaluation than autograd through `F.cross_entropy`)."""
    loss, grad_weight, grad_bias = x.new_zeros(()), torch.zeros_like(weight), torch.zeros_like(bias)
    for rows in row_blocks(*x.shape):
        block, target = x[rows], y[rows, None]
        u = torch.addcmul(bias, block, weight)
        lse = u.logsumexp(1, keepdim=True)
        loss += (lse - u.gather(1, target)).sum()
        p = u.sub_(lse).exp_()
        grad_bias += p.sum(0)
        grad_weight += p.mul_(block).sum(0)
        # the target's -1 in (p - onehot): its columns' sums, without an (N, C) one-hot
        grad_bias.index_add_(0, target[:, 0], torch.full_like(target[:, 0], -1, dtype=x.dtype))
        grad_weight.index_add_(0, target[:, 0], -block.gather(1, target)[:, 0])
    n = len(x)
    return loss / n, grad_weight / n, grad_bias / n


class _VectorNLL(torch.autograd.Function):
    """The mean NLL of softmax(w * x + b) for autograd, with the gradients of the same pass."""

    @staticmethod
    def forward(ctx, weight: Tensor, bias: Tensor, x: Tensor, y: Tensor) -> Tensor:
        loss, grad_weight, grad_bias = _vector_nll_and_gradient(weight, bias, x, y)
        ctx.save_for_backward(grad_weight, grad_bias)
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        grad_weight, grad_bias = ctx.saved_tensors
        return grad * grad_weight, grad * grad_bias, None, None


def _vector_nll(reg: float) -> Callable[[list[Tensor], Tensor, Tensor], Tensor]:
    """The regularised mean NLL of softmax(w * x + b) as a function of ([w, b], x, y):

        mean NLL + reg * (sum_j (w_j - mean w)^2 + sum_j b_j^2) / C

    whose limit reg = inf is temperature scaling (equal weights, no bias)."""

    def loss(params: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
        weight, bias = (t.to(x.dtype) for t in params)
        nll = _VectorNLL.apply(weight, bias, x, y)
        if not reg:
            return nll
        return nll + reg * ((weight - weight.mean()).square().sum() + bias.square().sum()) / x.shape[1]

    return loss


class _RegularisationPath(Calibrator):
    """A calibrator whose regularisation strength `reg` is chosen on held-out rows along a warm-started path (see
    `MatrixScaling`). Subclasses set `reg`, `reg_grid`, `max_iter` and implement `_loss` and `_solve`."""

    holdout_folds = 3  # the held-out third that chooses reg
    # Problems of at most this many logits choose reg by the mean over all three held-out thirds (a single third's
    # NLL is too noisy a guide on small problems); larger ones by the first third alone.
    cross_validate_below = 0

    def _loss(self, reg: float) -> Callable[[list[Tensor], Tensor, Tensor], Tensor]:
        """The objective at strength `reg` as a function of (params, x, y) (reg = 0: the mean NLL)."""
        raise NotImplementedError

    def _solve(self, x: Tensor, y: Tensor, reg: float, start: list[Tensor], max_iter: int) -> list[Tensor]:
        """The parameters minimising the objective at strength `reg` from `start`."""
        raise NotImplementedError

    def _full(self, params: list[Tensor]) -> list[Tensor]:
        """The parameters of finite strengths for a solution of reg = inf (or the solution itself)."""
        return params

    def _choose_reg(self, x: Tensor, y: Tensor, limit: list[Tensor]) -> tuple[float, list[Tensor]]:
        """The strength (inf or one of `reg_grid`) with the lowest NLL on a held-out third of the rows (the mean
        over the three thirds up to `cross_validate_below` logits; the stronger one on a tie), and a starting point
        for the final fit; `limit` starts the fit of reg = inf."""
        n, n_classes = x.shape
        if n < self.holdout_folds or n - math.ceil(n / self.holdout_folds) < n_classes:
            strongest = max(self.reg_grid)
            warnings.warn(f"{self.name}: {n} rows are too few to hold out a third and choose reg (each of "
                          f"{n_classes} classes needs rows in the rest); used the strongest of reg_grid, "
                          f"{strongest:g}", CalibrationWarning, stacklevel=4)
            return strongest, self._full(limit)
        folds = stratified_folds(y, self.holdout_folds, seed=0).to(x.device)
        n_paths = self.holdout_folds if x.numel() <= self.cross_validate_below else 1
        splits = [(x[folds != k], y[folds != k], x[folds == k], y[folds == k]) for k in range(n_paths)]
        path_iter = max(1, self.max_iter // 5)
        nll = self._loss(0.0)

        def held_out_nll(solutions: list[list[Tensor]]) -> float:
            return sum(float(nll(p, held_x, held_y)) for p, (_, _, held_x, held_y) in zip(solutions, splits)) / n_paths

        solutions = [self._full(self._solve(fit_x, fit_y, math.inf, limit, path_iter))
                     for fit_x, fit_y, _, _ in splits]
        best_reg, best_nll = math.inf, held_out_nll(solutions)
        best_start, last = self._full(limit), best_nll
        for reg in sorted(self.reg_grid, reverse=True):  # from the strongest, each fit from where the last ended
            solutions = [self._solve(fit_x, fit_y, reg, p, path_iter)
                         for p, (fit_x, fit_y, _, _) in zip(solutions, splits)]
            held_nll = held_out_nll(solutions)
            if held_nll < best_nll:
                best_reg, best_nll, best_start = reg, held_nll, solutions[0]
            if held_nll > last:  # weaker strengths only fit the noise further
                break
            last = held_nll
        return best_reg, best_start


class VectorScaling(_RegularisationPath):
    """Vector scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"), a multiclass form of Platt
    scaling, regularised towards temperature scaling.

    Multiclass form: full, p = softmax(w * z + b) with a weight w_k and a bias b_k per class, fitted by minimising

        mean NLL + reg * (sum_j (w_j - mean w)^2 + sum_j b_j^2) / C

    Guo et al. fit it unregularised (reg = 0), and its 2 C parameters then overfit at hundreds of classes (worse
    out of sample than temperature scaling at 1,000). The penalty pulls the weights towards their mean and the
    biases towards 0 (the intercept part is Kull et al.'s 2019 ODIR); its limit reg = inf is temperature
    scaling. With `reg=None`, reg is chosen among `reg_grid` and inf on a held-out third of the rows as in
    `MatrixScaling` (by the mean over the three thirds in turn for problems of at most 2^18 logits), along a path
    that starts at the fitted temperature (w = 1 / T, b = 0), so the chosen fit is
    never worse on that third than temperature scaling; then the model is refitted on all rows from there
    (`reg_` holds the choice). Each fit is LBFGS on the NLL and its gradient computed in one pass, in float32 first
    then float64 for large problems (more than 2^18 logits). It may change the predicted class (per-class weights
    and biases reorder the logits).

    Parameters
    ----------
    reg : float | None
        The strength of the penalty (0: Guo et al.'s unregularised form; math.inf: temperature scaling); None
        chooses it on held-out rows.
    reg_grid : tuple[float, ...]
        The strengths tried when `reg` is None (besides inf).
    max_iter : int
        LBFGS iterations of the final fit (a fifth of them per strength of the path).

    Examples
    --------
    >>> _ = torch.manual_seed(0); z = torch.randn(2000, 3); y = torch.distributions.Categorical(logits=z).sample()
    >>> cal = VectorScaling(reg=0.0).fit(z - torch.tensor([2.0, 0.0, 0.0]), y)  # class 0's logit too low by 2
    >>> round(float(cal.bias[0] - cal.bias[1:].mean()), 1)
    2.0
    """

    name = "vector"
    description = ("softmax(w * z + b): a weight and a bias per class, fitted by NLL (Guo et al. 2017), "
                   "regularised towards temperature scaling")
    form = "full"
    may_change_prediction = True
    per_class = True
    cross_validate_below = FLOAT32_FIRST

    def __init__(self, reg: float | None = None,
                 reg_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4),
                 max_iter: int = 200):
        """A vector scaling to fit."""
        super().__init__()
        if reg is not None and not (isinstance(reg, float) and reg == math.inf):
            reg = check_number(reg, "reg")
        if not reg_grid:
            raise ValueError(f"reg_grid must hold finite numbers >= 0, got {reg_grid!r}")
        self.reg, self.reg_grid = reg, tuple(check_number(r, "each of reg_grid") for r in reg_grid)
        self.max_iter = check_int(max_iter, "max_iter")
        self.reg_: float | None = None
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None

    def _loss(self, reg: float) -> Callable[[list[Tensor], Tensor, Tensor], Tensor]:
        return _vector_nll(reg)

    def _solve(self, x: Tensor, y: Tensor, reg: float, start: list[Tensor], max_iter: int) -> list[Tensor]:
        if math.isinf(reg):  # temperature scaling
            return [torch.full_like(x[0], 1 / _quiet_temperature(x, y)), torch.zeros_like(x[0])]
        return _fit_parameters(_vector_nll(reg), start, x, y, max_iter, x.numel())

    def _fit(self, z: Tensor, y: Tensor) -> None:
        limit = [torch.full_like(z[0], 1 / _quiet_temperature(z, y)), torch.zeros_like(z[0])]
        if self.reg is not None:
            self.reg_, start = float(self.reg), limit
        else:
            self.reg_, start = self._choose_reg(z, y, limit)
        solution = limit if math.isinf(self.reg_) else self._solve(z, y, self.reg_, start, self.max_iter)
        self.weight, self.bias = (t.cpu() for t in solution)

    def _probs(self, z: Tensor) -> Tensor:
        weight = self.weight.to(z)
        return _scaled_softmax(z, lambda x: x * weight, self.bias.to(z))

    def _params_repr(self) -> str:
        return f"n_classes={self.n_classes}, reg={self.reg_:g}"


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


class MatrixScaling(_RegularisationPath):
    """Matrix scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") with off-diagonal and
    intercept regularisation (ODIR: Kull et al., "Beyond temperature scaling: Obtaining well-calibrated multiclass
    probabilities with Dirichlet calibration", NeurIPS 2019).

    Multiclass form: full, p = softmax(W x + b) with x = z, fitted by minimising

        mean NLL + reg * (sum_{i != j} W_ij^2 / (C (C - 1)) + sum_j b_j^2 / C)

    Unregularised, its C^2 + C parameters overfit at tens of classes; ODIR pulls the off-diagonal weights and the
    biases towards 0 but leaves the diagonal (a per-class temperature) free. Its limit reg = inf, a diagonal W
    alone (b = 0), is fitted first, from the fitted temperature (W = I / T). With `reg=None`, reg is chosen among
    `reg_grid` and inf by the NLL of a seeded third of the fitting rows held out (Kull et al. choose theirs by
    cross-validation), along a path from the strongest strength to the weakest, each fit starting where the
    previous one ended and the path stopping once the held-out NLL rises; then the model is refitted on
    all rows from there (`reg_` holds the choice). Since the diagonal is a candidate, the chosen fit is never worse
    on the held-out third than that diagonal fit, which starts from temperature scaling. Each fit is LBFGS with a
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

    def __init__(self, reg: float | None = None,
                 reg_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4),
                 max_iter: int = 500, max_classes: int = 200):
        """A regularised matrix scaling to fit."""
        super().__init__()
        if reg is not None and not (isinstance(reg, float) and reg == math.inf):
            reg = check_number(reg, "reg")
        if not reg_grid:
            raise ValueError(f"reg_grid must hold finite numbers >= 0, got {reg_grid!r}")
        self.reg, self.reg_grid = reg, tuple(check_number(r, "each of reg_grid") for r in reg_grid)
        self.max_iter = check_int(max_iter, "max_iter")
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
        return _fit_parameters(_matrix_nll(reg), start, x, y, max_iter, work)

    def _loss(self, reg: float) -> Callable[[list[Tensor], Tensor, Tensor], Tensor]:
        return _matrix_nll(reg)

    def _full(self, params: list[Tensor]) -> list[Tensor]:
        """[W, b] of a diagonal solution [d], or the solution itself."""
        return [torch.diag(params[0]), torch.zeros_like(params[0])] if len(params) == 1 else params

    def _fit(self, z: Tensor, y: Tensor) -> None:
        x = self._features(z)
        diagonal = [torch.full_like(x[0], 1 / _quiet_temperature(x, y))]
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
        return _scaled_softmax(self._features(z), lambda x: x @ weight.T, self.bias.to(z))

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

        _minimise([logit_w], nll, self.max_iter)
        self.weights = logit_w.detach().softmax(0).cpu()

    def _probs(self, z: Tensor) -> Tensor:
        w = self.weights.to(z)
        return w[0] * self.scaling._probs(z) + w[1] * _scaled_softmax(z, lambda x: x) + w[2] / z.shape[1]

    def _params_repr(self) -> str:
        w = ", ".join(f"{float(v):.3f}" for v in self.weights)
        return f"temperature={self.temperature:.4g}, weights=({w})"
