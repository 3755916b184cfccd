"""Selective classification from the fine histogram: accept the most confident rows first and count the errors.

Rows sorted by decreasing confidence, E_k the errors among the first k of n. The selective risk at coverage k/n is
E_k / k, the generalised risk E_k / n (Traub et al. 2024). Rows that share a fine cell are tied; they are taken
in random order and every value here is the exact expectation over that order (the expected errors among the first
i rows of a cell with c rows and e errors is e i / c), so a tie never favours the model.

Functions take `(..., K, 3)` CPU float64 counters (count, sum of confidence, number correct per cell, in increasing
confidence) and return one value per leading index.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["aurc", "augrc", "risk_coverage_curve"]


def _ranked(fine: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per cell (in increasing confidence): count c, errors e, and the rows K and errors E in the more confident
    cells, which are ranked ahead of it."""
    count = fine[..., 0]
    errors = (count - fine[..., 2]).clamp_min(0)
    count_cum, errors_cum = count.cumsum(-1), errors.cumsum(-1)
    return count, errors, count_cum[..., -1:] - count_cum, errors_cum[..., -1:] - errors_cum


def _harmonic(x: Tensor) -> Tensor:
    """H(x) = sum_{i<=x} 1/i, extended to real x >= 0 by the digamma function (weighted rows)."""
    return torch.digamma(x + 1) + 0.5772156649015329


def aurc(fine: Tensor) -> Tensor:
    """Area under the risk-coverage curve (Geifman, Uziel & El-Yaniv 2019): (1/n) sum_k E_k / k, the mean over k
    of the error rate of the k most confident rows. Lower is better; a perfect ranking at accuracy a scores
    1 - a + a ln(a) (0 for a = 1), a random one the error rate 1 - a.

    Parameters
    ----------
    fine : Tensor
        `(..., K, 3)` float64 counters per cell: count, sum of confidence, number correct.

    Examples
    --------
    >>> float(aurc(torch.tensor([[1., .2, 0.], [1., .9, 1.]])))  # the confident row right, the other wrong
    0.25
    """
    count, errors, before, errors_before = _ranked(fine)
    # sum_{i=1..c} (E + e i/c) / (K + i) = (E - e K/c) (H(K + c) - H(K)) + e
    c = count.clamp_min(1e-300)
    terms = (errors_before - errors * before / c) * (_harmonic(before + count) - _harmonic(before)) + errors
    return torch.where(count > 0, terms, 0.0).sum(-1) / count.sum(-1)


def augrc(fine: Tensor) -> Tensor:
    """Area under the generalised risk-coverage curve (Traub et al. 2024, "Overcoming Common Flaws in the
    Evaluation of Selective Classification Systems"): (1/n^2) sum_k E_k, the mean over coverages of the share of
    all rows that are accepted errors, which Traub et al. read as the average risk of undetected failures. Lower
    is better; a perfect ranking at accuracy a scores (1 - a)^2 / 2, a random one (1 - a) / 2.

    Parameters
    ----------
    fine : Tensor
        `(..., K, 3)` float64 counters per cell: count, sum of confidence, number correct.

    Examples
    --------
    >>> float(augrc(torch.tensor([[1., .2, 0.], [1., .9, 1.]])))  # (0 + 1) / 2^2
    0.25
    """
    count, errors, _, errors_before = _ranked(fine)
    # sum_{i=1..c} (E + e i/c) = c E + e (c + 1) / 2
    n = count.sum(-1)
    return (count * errors_before + errors * (count + 1) / 2).sum(-1) / (n * n)


def risk_coverage_curve(fine: Tensor) -> dict[str, Tensor]:
    """The risk-coverage curve of one `(K, 3)` histogram, one point per non-empty cell, most confident first:
    `threshold` (rows with confidence above it are accepted: the cell's lower edge), `coverage` (accepted / n),
    `risk` (errors / accepted) and `generalized_risk` (errors / n), the expected values over tied rows.

    Parameters
    ----------
    fine : Tensor
        `(K, 3)` float64 counters per cell: count, sum of confidence, number correct.
    """
    if fine.dim() != 2:
        raise ValueError(f"need one (K, 3) histogram, got {tuple(fine.shape)}")
    count, errors = fine[:, 0].flip(0), (fine[:, 0] - fine[:, 2]).clamp_min(0).flip(0)  # most confident first
    accepted, wrong = count.cumsum(0), errors.cumsum(0)
    n_cells = fine.shape[0]
    lower_edge = torch.arange(n_cells - 1, -1, -1, dtype=fine.dtype) / n_cells
    keep = count > 0
    n = accepted[-1]
    return {"threshold": lower_edge[keep], "coverage": accepted[keep] / n, "risk": wrong[keep] / accepted[keep],
            "generalized_risk": wrong[keep] / n}
