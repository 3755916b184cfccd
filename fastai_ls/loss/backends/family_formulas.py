"""The calibration-loss family's formulas as their papers write them, with torch operations that autograd
differentiates to any order, on a batch laid out as `Rows`: the loss classes' path for probability targets, and the
reference backend's (`torch.func` transforms, forward-mode AD, second derivatives). The fused backends compute the
same losses in closed form (`family.family_rows`, the kernels) and are tested against these.

Every row loss is sum_c w_c q_c f_c(x) + (sum_c w_c q_c) * R(x), with q the target (one-hot for class ids), w the
class weights, f_c a per-class term (-log p_c for cross-entropy) and R a per-row penalty.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fastai_ls.loss.formula import reduce_loss

__all__ = ["Rows", "log_softmax_rows", "cross_entropy_plus", "complement_pow", "modulated_cross_entropy",
           "focal_rows", "adaptive_focal_rows", "ada_focal_gamma", "ada_focal_rows", "row_max", "margin_rows",
           "maxsup_rows", "logitnorm_rows", "confidence_penalty_rows", "z_loss_rows", "formula_rows", "ROW_FORMULAS",
           "LOGITNORM_DELTA"]

LOGITNORM_DELTA = 1e-7  # Wei et al.'s z / (tau (||z|| + 1e-7)): all-zero logits divide by it, not by 0


@dataclass
class Rows:
    """A batch as (M, C) rows, class axis last, ready for a row formula.

    `x`: the logits in their compute dtype (ignored rows zeroed, so that their gradient is exactly 0); `y`: class ids
    (ignored rows read as 0) or None; `q`: probability targets or None; `w`: class weights in the compute dtype or
    None; `mass`: sum_c w_c q_c per row (w_y for ids, 1.0 without weights), the factor of the row penalty;
    `ignored`: the ignored-row mask or None; `divisor`: the 'mean' divisor; `shape`: the shape of a 'none' loss."""

    x: Tensor
    y: Tensor | None
    q: Tensor | None
    w: Tensor | None
    mass: Tensor | float
    ignored: Tensor | None
    divisor: Tensor | float
    shape: torch.Size

    def target_sum(self, f: Tensor) -> Tensor:
        """sum_c w_c q_c f_c per row, for a per-class term `f` (M, C)."""
        if self.q is None:
            return self.weighted(self.true_class(f))
        wq = self.q if self.w is None else self.q * self.w
        return (wq * f).sum(1)

    def smoothed_sum(self, f: Tensor, eps: float) -> Tensor:
        """sum_c w_c q'_c f_c per row for the smoothed target q' = (1 - eps) q + eps / C."""
        if not eps:
            return self.target_sum(f)
        wf = f.sum(1) if self.w is None else (f * self.w).sum(1)
        return (1 - eps) * self.target_sum(f) + (eps / f.shape[1]) * wf

    def true_class(self, f: Tensor) -> Tensor:
        """f_y (M,) of a per-class term (M, C), for class-id targets."""
        return f.gather(1, self.y[:, None]).squeeze(1)

    def weighted(self, f_y: Tensor) -> Tensor:
        """w_y f_y per row, for class-id targets."""
        return f_y if self.w is None else self.w[self.y] * f_y

    def cross_entropy(self, log_p: Tensor) -> Tensor:
        """-sum_c w_c q_c log p_c per row, from log-probabilities (M, C)."""
        return -self.target_sum(log_p)

    def reduce(self, loss: Tensor, reduction: str) -> Tensor:
        """Per-row `loss` with ignored rows zeroed, reduced PyTorch's way."""
        if self.ignored is not None:
            loss = loss.masked_fill(self.ignored, 0.0)
        return reduce_loss(loss, self.divisor, reduction, self.shape)


def log_softmax_rows(x: Tensor) -> Tensor:
    """log p (M, C) of rows of logits: torch's log-softmax, one fused pass each way."""
    return x.log_softmax(1)


def cross_entropy_plus(rows: Rows, penalty: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Per-row cross-entropy plus the target mass times `penalty(x, log_p)` (M,): the row loss of every
    "cross-entropy plus a penalty on the logits" member of the family."""
    log_p = log_softmax_rows(rows.x)
    return rows.cross_entropy(log_p) + rows.mass * penalty(rows.x, log_p)


def complement_pow(log_p: Tensor, gamma: float | Tensor) -> Tensor:
    """(1 - p)^gamma from log p. Where p rounds to 1 the factor is its value 0^gamma with a zero gradient: the
    derivative of (1 - p)^gamma is infinite there for gamma < 1, while the focal term's own limit is 0."""
    base = -log_p.expm1()
    certain = base <= 0
    at_certainty = torch.zeros((), dtype=base.dtype, device=base.device).pow(gamma)  # 1 for gamma = 0, else 0
    return torch.where(certain, at_certainty, base.masked_fill(certain, 1.0).pow(gamma))


def modulated_cross_entropy(rows: Rows, eps: float, factor: Callable[[Tensor], Tensor | None]) -> Tensor:
    """-sum_c w_c q'_c m_c log p_c per row, with q' the target smoothed by `eps` and m = `factor(log_p)` (None: 1).
    For class ids without smoothing only the true class's term is computed."""
    log_p = log_softmax_rows(rows.x)
    if rows.q is None and not eps:
        log_p = rows.true_class(log_p)
        m = factor(log_p)
        return rows.weighted(-log_p if m is None else -m * log_p)
    m = factor(log_p)
    return rows.smoothed_sum(-log_p if m is None else -m * log_p, eps)


def focal_rows(rows: Rows, gamma: float, eps: float = 0.0) -> Tensor:
    """Softmax focal loss per row (Lin et al. 2017; Mukhoti et al. 2020): -sum_c w_c q'_c (1 - p_c)^gamma log p_c,
    q' the target smoothed by `eps`; for class ids without smoothing -w_y (1 - p_y)^gamma log p_y."""
    return modulated_cross_entropy(rows, eps, (lambda log_p: complement_pow(log_p, gamma)) if gamma
                                   else (lambda log_p: None))


def adaptive_focal_rows(rows: Rows, threshold: float = 0.2, gamma_below: float = 5.0, gamma_above: float = 3.0,
                        eps: float = 0.0) -> Tensor:
    """FLSD-53 per row (Mukhoti et al. 2020): the focal loss with gamma_c = `gamma_below` where p_c < `threshold`,
    else `gamma_above`, chosen without a gradient."""
    log_threshold = math.log(threshold) if threshold else -math.inf

    def factor(log_p: Tensor) -> Tensor:
        gamma = (log_p.detach() < log_threshold).to(log_p.dtype) * (gamma_below - gamma_above) + gamma_above
        return complement_pow(log_p, gamma)

    return modulated_cross_entropy(rows, eps, factor)


def ada_focal_gamma(p: Tensor, gammas: Tensor, edges: Tensor | None) -> Tensor:
    """AdaFocal's gamma for probabilities `p`, without a gradient: that of p's bin (e_b, e_b+1] of `edges`, or with
    `edges` None of the equal-width bin that ceil(p B) - 1 names."""
    g = gammas.detach().to(device=p.device, dtype=p.dtype)
    p = p.detach()
    if edges is None:
        b = (p * g.numel()).ceil().long().sub(1).clamp(0, g.numel() - 1)
    else:
        b = torch.bucketize(p, edges.detach().to(device=p.device, dtype=p.dtype)[1:-1])
    return g[b]


def ada_focal_rows(rows: Rows, switch: float, gammas: Tensor, edges: Tensor | None = None) -> Tensor:
    """AdaFocal per row (Ghosh et al. 2022): -sum_c w_c q_c f_c log p_c with f_c = (1 - p_c)^g_c where
    g_c = `ada_focal_gamma`(p_c) >= `switch`, else the inverse focal factor (1 + p_c)^|g_c|."""

    def factor(log_p: Tensor) -> Tensor:
        gamma = ada_focal_gamma(log_p.exp(), gammas, edges)
        focal = gamma >= switch
        # Each branch's exponent is 0 where the other applies: pow(., 0) is 1 with a zero gradient, so the unused
        # branch never adds a 0 * inf gradient.
        return complement_pow(log_p, gamma.where(focal, 0.0)) * (1 + log_p.exp()).pow(gamma.abs().where(~focal, 0.0))

    return modulated_cross_entropy(rows, 0.0, factor)


def row_max(x: Tensor, keepdim: bool = False) -> Tensor:
    """z_max per row, differentiated on the first largest logit only (`max(dim)`, as the papers' code and the fused
    kernels take it; `amax` would share the gradient among tied logits: at all-equal logits, a zero-initialized
    head's, MaxSup's penalty gradient would be 0 here and alpha (1 - 1/C) on class 0 in the kernels)."""
    return x.max(1, keepdim=keepdim).values


def margin_rows(rows: Rows, margin: float, alpha: float) -> Tensor:
    """MbLS per row (Liu et al. 2022): CE + alpha (1/C) sum_k relu(z_max - z_k - margin)."""
    return cross_entropy_plus(rows, lambda x, log_p: alpha * (row_max(x, True) - x - margin).relu().mean(1))


def maxsup_rows(rows: Rows, alpha: float) -> Tensor:
    """MaxSup per row (Zhou et al. 2025): CE + alpha (z_max - mean_k z_k)."""
    return cross_entropy_plus(rows, lambda x, log_p: alpha * (row_max(x) - x.mean(1)))


def logitnorm_rows(rows: Rows, tau: float) -> Tensor:
    """LogitNorm per row (Wei et al. 2022): the cross-entropy of z / (tau (||z||_2 + 1e-7))."""
    x = rows.x / (tau * (rows.x.norm(dim=1, keepdim=True) + LOGITNORM_DELTA))
    return rows.cross_entropy(log_softmax_rows(x))


def confidence_penalty_rows(rows: Rows, beta: float) -> Tensor:
    """The confidence penalty per row (Pereyra et al. 2017): CE - beta H(p)."""
    # -beta * H(p), with 0 log 0 = 0 for a -inf logit (a masked class): its p is 0, and so is its term.
    return cross_entropy_plus(rows, lambda x, log_p: beta * (log_p.exp() * log_p.masked_fill(log_p == -math.inf, 0.0))
                              .sum(1))


# The fused family's kinds (`family.KINDS`) and their formulas, which take the kinds' `params` as keywords.
ROW_FORMULAS: dict[str, Callable[..., Tensor]] = {
    "focal": focal_rows, "adaptive_focal": adaptive_focal_rows, "margin": margin_rows, "maxsup": maxsup_rows,
    "logitnorm": logitnorm_rows, "confidence_penalty": confidence_penalty_rows, "ada_focal": ada_focal_rows}


def z_loss_rows(rows: Rows, z_loss: float) -> Tensor:
    """The z-loss z_loss * logsumexp(x)^2 of the raw logits per row, times the row's target mass (w_y for class
    ids), which every member of the family may add (Chowdhery et al. 2022, PaLM)."""
    return rows.mass * z_loss * rows.x.logsumexp(1).square()


def formula_rows(rows: Rows, kind: str, params: dict, eps: float = 0.0, z_loss: float = 0.0) -> Tensor:
    """The row losses of the fused family's loss `kind` (`ROW_FORMULAS`) with its `params`, label smoothing `eps`
    (the focal losses) and the z-loss."""
    loss = ROW_FORMULAS[kind](rows, **params, **({"eps": eps} if eps else {}))
    return loss + z_loss_rows(rows, z_loss) if z_loss else loss
