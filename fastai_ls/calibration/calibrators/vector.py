"""Vector scaling: softmax(w * z + b), a weight and a bias per class, regularised towards temperature scaling."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from fastai_ls.calibration.calibrators.base import row_blocks
from fastai_ls.calibration.calibrators.solver import FLOAT32_FIRST, RegularisationPath, fit_parameters, scaled_softmax
from fastai_ls.calibration.calibrators.temperature import quiet_temperature

__all__ = ["VectorScaling"]


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

class VectorScaling(RegularisationPath):
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
        super().__init__(reg, reg_grid, max_iter)
        self.reg_: float | None = None
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None

    def _loss(self, reg: float) -> Callable[[list[Tensor], Tensor, Tensor], Tensor]:
        return _vector_nll(reg)

    def _solve(self, x: Tensor, y: Tensor, reg: float, start: list[Tensor], max_iter: int) -> list[Tensor]:
        if math.isinf(reg):  # temperature scaling
            return [torch.full_like(x[0], 1 / quiet_temperature(x, y)), torch.zeros_like(x[0])]
        return fit_parameters(_vector_nll(reg), start, x, y, max_iter, x.numel())

    def _fit(self, z: Tensor, y: Tensor) -> None:
        limit = [torch.full_like(z[0], 1 / quiet_temperature(z, y)), torch.zeros_like(z[0])]
        if self.reg is not None:
            self.reg_, start = float(self.reg), limit
        else:
            self.reg_, start = self._choose_reg(z, y, limit)
        solution = limit if math.isinf(self.reg_) else self._solve(z, y, self.reg_, start, self.max_iter)
        self.weight, self.bias = (t.cpu() for t in solution)

    def _probs(self, z: Tensor) -> Tensor:
        weight = self.weight.to(z)
        return scaled_softmax(z, lambda x: x * weight, self.bias.to(z))

    def _params_repr(self) -> str:
        return f"n_classes={self.n_classes}, reg={self.reg_:g}"


