"""The solver shared by the scaling calibrators: a softmax of a linear map of the logits that never overflows, LBFGS
on a float64 objective (solved in float32 first for large problems), and the warm-started regularisation path that
chooses a penalty's strength on held-out rows (vector and matrix scaling, Dirichlet calibration)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from fastai_ls.calibration.calibrators.base import CalibrationWarning, Calibrator
from fastai_ls.calibration.calibrators.folds import stratified_folds
from fastai_ls.validation import check_int, check_number

__all__ = ["FLOAT32_FIRST", "FLOAT64_REFINE", "scaled_softmax", "minimise", "fit_parameters", "RegularisationPath"]

# Problems of more multiply-adds per pass than this are first solved in float32, then refined in float64 (at most
# FLOAT64_REFINE iterations) from there.
FLOAT32_FIRST = 2**18
FLOAT64_REFINE = 10


def scaled_softmax(z: Tensor, linear: Callable[[Tensor], Tensor], bias: Tensor | None = None) -> Tensor:
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


def minimise(params: list[Tensor], objective: Callable[[], Tensor], max_iter: int,
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


def fit_parameters(loss: Callable[[list[Tensor], Tensor, Tensor], Tensor], start: list[Tensor], x: Tensor,
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
        minimise(single, lambda: loss(single, x32, y), max_iter, tolerance_grad=1e-5, tolerance_change=1e-6)
        params = [t.detach().double() for t in single]
        max_iter, tolerance_grad = min(max_iter, FLOAT64_REFINE), 1e-5
    double = [t.requires_grad_() for t in params]
    minimise(double, lambda: loss(double, x, y), max_iter, tolerance_grad)
    with torch.no_grad():
        if not float(loss(double, x, y)) < float(loss(start, x, y)):
            return [t.detach().clone() for t in start]
    return [t.detach() for t in double]



class RegularisationPath(Calibrator):
    """A calibrator whose regularisation strength `reg` is chosen on held-out rows along a warm-started path (see
    `MatrixScaling`). Subclasses set `reg`, `reg_grid`, `max_iter` and implement `_loss` and `_solve`."""

    holdout_folds = 3  # the held-out third that chooses reg
    # Problems of at most this many logits choose reg by the mean over all three held-out thirds (a single third's
    # NLL is too noisy a guide on small problems); larger ones by the first third alone.
    cross_validate_below = 0

    def __init__(self, reg: float | None, reg_grid: tuple[float, ...], max_iter: int):
        """Check and store the options every regularised calibrator has (see `MatrixScaling`)."""
        super().__init__()
        if reg is not None and not (isinstance(reg, float) and reg == math.inf):
            reg = check_number(reg, "reg")
        if not reg_grid:
            raise ValueError(f"reg_grid must hold finite numbers >= 0, got {reg_grid!r}")
        self.reg, self.reg_grid = reg, tuple(check_number(r, "each of reg_grid") for r in reg_grid)
        self.max_iter = check_int(max_iter, "max_iter")

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

