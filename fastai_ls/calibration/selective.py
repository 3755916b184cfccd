"""Selective classification: the exact sort-based metrics of the rows a confidence score ranks
(`confidence_scores.py`).

A score ranks the rows; accepting the k highest-scoring rows, E(k) is the expected number of errors among them when
rows with equal scores are taken in random order, so that ties share their errors evenly (a tied group of c rows
with e errors, entered after K rows with E errors, gives E(K + i) = E + e i / c). Then AURC = (1/N) sum_k E(k)/k
(Geifman, Uziel & El-Yaniv, ICLR 2019) and AUGRC = (1/N) sum_k E(k)/N (Traub et al., NeurIPS 2024). Both are computed
from E(k) row by row, after one sort: no histogram, no harmonic-number approximation. `selective_bootstrap.py` adds
their intervals.

`CalibrationState` streams the softmax response's AURC and AUGRC from its fine histogram instead, where rows in one
confidence cell are tied; `streamed_error_bound` states how far that can be from the exact value here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastai_ls.calibration.threads import one_thread

__all__ = ["check_selective_input", "expected_errors", "aurc", "augrc", "risk_at_coverage", "coverage_at_risk",
           "selective_accuracy", "streamed_error_bound"]


def check_selective_input(scores: Tensor, correct: Tensor) -> tuple[Tensor, Tensor]:
    """float64 scores and float64 0/1 errors (1 - correct), both (N,) on the CPU, or a ValueError naming the
    problem: shapes that differ or are not (N,) with N >= 1, NaN scores, `correct` other than bool or 0/1.

    Parameters
    ----------
    scores : Tensor
        (N,) confidence scores, higher more confident.
    correct : Tensor
        (N,) whether each prediction is right: bool, or integers/floats 0 and 1.
    """
    for name, t in (("scores", scores), ("correct", correct)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if scores.dim() != 1 or scores.shape[0] < 1 or correct.shape != scores.shape:
        raise ValueError(f"scores and correct must both be (N,) with N >= 1, got {tuple(scores.shape)} and "
                         f"{tuple(correct.shape)}")
    if scores.is_complex():
        raise ValueError(f"scores must be real numbers, got {scores.dtype}")
    if not scores.is_floating_point():
        # Ranked in float64, where integers beyond 2**53 would round into false ties.
        if scores.dtype == torch.int64 and bool(((scores > 2**53) | (scores < -2**53)).any()):
            raise ValueError("integer scores beyond 2**53 in magnitude are not exact in float64; rescale them")
        scores = scores.double()
    if bool(scores.isnan().any()):
        raise ValueError(f"scores hold NaN in {int(scores.isnan().sum())} of {len(scores)} rows")
    if correct.is_complex() or not bool(((correct == 0) | (correct == 1)).all()):
        raise ValueError("correct must be bool, or 0 and 1 (1: the prediction is right)")
    return scores.detach().cpu().double(), 1.0 - correct.detach().cpu().double()


class _Ranking:
    """The rows sorted by decreasing score, and the groups of tied rows: `order` (N,), `ends` (G,) the exclusive end
    of each group in sorted order, `group` (N,) the group of each sorted position."""

    def __init__(self, scores: Tensor):
        self.order = torch.argsort(scores, descending=True, stable=True)
        ranked = scores[self.order]
        starts = torch.ones(len(ranked), dtype=torch.bool)
        starts[1:] = ranked[1:] != ranked[:-1]
        self.group = starts.long().cumsum(0) - 1
        self.ends = torch.cat([starts.nonzero().squeeze(1)[1:], torch.tensor([len(ranked)])])


def _expected_errors(ranking: _Ranking, errors: Tensor) -> Tensor:
    """E(k) for k = 1..N (see the module docstring)."""
    ranked = errors[ranking.order]
    after = ranked.cumsum(0)[ranking.ends - 1]  # errors up to the end of each group
    ends = ranking.ends.double()
    count = torch.diff(ends, prepend=ends.new_zeros(1))
    e = torch.diff(after, prepend=after.new_zeros(1))
    before, start = after - e, ends - count
    g = ranking.group
    k = torch.arange(1, len(ranked) + 1, dtype=torch.float64)
    return before[g] + e[g] * (k - start[g]) / count[g]


def _aurc_sum(e: Tensor) -> float:
    """sum_k E(k)/k of E(k), k = 1..n: n AURC."""
    return float((e / torch.arange(1, len(e) + 1, dtype=torch.float64)).sum())


def expected_errors(scores: Tensor, correct: Tensor) -> Tensor:
    """E(k), k = 1..N: the expected errors among the k highest-scoring rows, ties taken in random order.

    Parameters
    ----------
    scores : Tensor
        (N,) confidence scores, higher more confident.
    correct : Tensor
        (N,) bool (or 0/1): whether each prediction is right.

    Returns
    -------
    Tensor
        (N,) float64.

    Examples
    --------
    >>> expected_errors(torch.tensor([0.9, 0.5, 0.5]), torch.tensor([True, True, False])).tolist()
    [0.0, 0.5, 1.0]
    """
    scores, errors = check_selective_input(scores, correct)
    with one_thread():
        return _expected_errors(_Ranking(scores), errors)


def aurc(scores: Tensor, correct: Tensor) -> float:
    """Area under the risk-coverage curve, exact: (1/N) sum_k E(k)/k (module docstring). Lower is better.

    Parameters
    ----------
    scores : Tensor
        (N,) confidence scores, higher more confident.
    correct : Tensor
        (N,) bool (or 0/1): whether each prediction is right.

    Returns
    -------
    float

    Examples
    --------
    >>> aurc(torch.tensor([0.9, 0.2]), torch.tensor([True, False]))  # (0/1 + 1/2) / 2
    0.25
    """
    e = expected_errors(scores, correct)
    return _aurc_sum(e) / len(e)


def augrc(scores: Tensor, correct: Tensor) -> float:
    """Area under the generalised risk-coverage curve, exact: (1/N) sum_k E(k)/N (Traub et al. 2024). Lower is
    better.

    Parameters
    ----------
    scores : Tensor
        (N,) confidence scores, higher more confident.
    correct : Tensor
        (N,) bool (or 0/1): whether each prediction is right.

    Returns
    -------
    float

    Examples
    --------
    >>> augrc(torch.tensor([0.9, 0.2]), torch.tensor([True, False]))  # (0 + 1) / 2^2
    0.25
    """
    e = expected_errors(scores, correct)
    return float(e.sum() / (len(e) * len(e)))


def _shares(values: float | Sequence[float], name: str, meaning: str, lowest_allowed: bool) -> tuple[Tensor, bool]:
    """`values` (a number, or a sequence, array or tensor of numbers) as an (M,) float64 tensor in (0, 1] (in [0, 1]
    where `lowest_allowed`), and whether it was one number; else a ValueError naming `name`."""
    interval = "[0, 1]" if lowest_allowed else "(0, 1]"
    error = ValueError(f"{name} must be in {interval} ({meaning}), got {values!r}")
    if isinstance(values, (bool, str, bytes)):
        raise error
    try:
        shares = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise error from None
    low = shares < 0 if lowest_allowed else shares <= 0
    if shares.dim() > 1 or shares.numel() == 0 or bool((low | (shares > 1) | shares.isnan()).any()):
        raise error
    return shares.reshape(-1), shares.dim() == 0


def _positions(coverage: float | Sequence[float], n: int) -> tuple[Tensor, bool]:
    """The number of rows kept at each coverage: ceil(coverage N), at least 1."""
    values, scalar = _shares(coverage, "coverage", "a share of the rows", lowest_allowed=False)
    return (values * n - 1e-9).ceil().clamp(1, n).long(), scalar


def risk_at_coverage(scores: Tensor, correct: Tensor, coverage: float | Sequence[float]) -> float | Tensor:
    """The selective risk E(k)/k when the k = ceil(coverage N) highest-scoring rows are kept.

    Parameters
    ----------
    scores : Tensor
        (N,) confidence scores, higher more confident.
    correct : Tensor
        (N,) bool (or 0/1): whether each prediction is right.
    coverage : float or sequence of float
        Shares of rows kept, in (0, 1].

    Returns
    -------
    float or Tensor
        A float for one coverage, else an (M,) float64 tensor.

    Examples
    --------
    >>> risk_at_coverage(torch.tensor([0.9, 0.5, 0.1, 0.3]), torch.tensor([1, 1, 0, 1]), [0.5, 1.0]).tolist()
    [0.0, 0.25]
    """
    e = expected_errors(scores, correct)
    k, scalar = _positions(coverage, len(e))
    risk = e[k - 1] / k
    return float(risk[0]) if scalar else risk


def selective_accuracy(scores: Tensor, correct: Tensor, coverage: float | Sequence[float]) -> float | Tensor:
    """The accuracy of the k = ceil(coverage N) highest-scoring rows: 1 - `risk_at_coverage`.

    Parameters
    ----------
    scores : Tensor
        (N,) confidence scores, higher more confident.
    correct : Tensor
        (N,) bool (or 0/1): whether each prediction is right.
    coverage : float or sequence of float
        Shares of rows kept, in (0, 1].

    Returns
    -------
    float or Tensor

    Examples
    --------
    >>> selective_accuracy(torch.tensor([0.9, 0.5, 0.1, 0.3]), torch.tensor([1, 1, 0, 1]), 0.75)
    1.0
    """
    risk = risk_at_coverage(scores, correct, coverage)
    return 1 - risk


def coverage_at_risk(scores: Tensor, correct: Tensor, risk: float | Sequence[float]) -> float | Tensor:
    """The largest coverage k/N whose selective risk E(k)/k is at most `risk` (0 if none is).

    Parameters
    ----------
    scores : Tensor
        (N,) confidence scores, higher more confident.
    correct : Tensor
        (N,) bool (or 0/1): whether each prediction is right.
    risk : float or sequence of float
        Acceptable error rates among the kept rows, in [0, 1].

    Returns
    -------
    float or Tensor

    Examples
    --------
    >>> coverage_at_risk(torch.tensor([0.9, 0.5, 0.1, 0.3]), torch.tensor([1, 1, 0, 1]), 0.0)
    0.75
    """
    bounds, scalar = _shares(risk, "risk", "an error rate", lowest_allowed=True)
    e = expected_errors(scores, correct)
    k = torch.arange(1, len(e) + 1, dtype=torch.float64)
    # E(k)/k <= r as E(k) <= r k, with a relative slack for the rounding of E(k) (a tie's e i / c).
    ok = e[None, :] <= bounds[:, None] * k[None, :] * (1 + 1e-12) + 1e-12
    largest = torch.where(ok, k[None, :], 0.0).amax(1) / len(e)
    return float(largest[0]) if scalar else largest


def streamed_error_bound(fine: Tensor) -> dict[str, float]:
    """How far the AURC and AUGRC that `CalibrationState` streams from its fine histogram (`risk_coverage.py`) can
    be from the exact `aurc`/`augrc` of the softmax response of the same rows.

    The histogram keeps the rows' cells, not their order inside a cell: it takes a cell's rows as tied. The exact
    values rank them, so only each cell's share of E(k) can differ. In a cell of c rows with e errors after K rows,
    E(K + i) lies between the counts of its two extreme orders, errors last and errors first, max(0, i - (c - e))
    and min(i, e), and the streamed value takes e i / c. Summed over the cell:

    - AUGRC: |difference| <= sum over cells of e (c - e) / 2, over N^2 (both extreme orders reach it);
    - AURC: |difference| <= (1/N) sum over cells of the larger of the two extreme orders' sum_i |E(K + i) - e i/c|
      / (K + i), in closed form with harmonic numbers.

    The bound is reached only if every cell's rows fall in one extreme order; it is small where cells are small or
    nearly all right, and loose for a cell of many rows at the top (K = 0), as at confidence 1.

    Parameters
    ----------
    fine : Tensor
        A state's `(K, 3)` fine counters (count, sum of confidence, number correct), `state.fine`.

    Returns
    -------
    dict of str to float
        'aurc' and 'augrc': the bounds.

    Examples
    --------
    >>> streamed_error_bound(torch.tensor([[2., 1.8, 1.], [2., 0.4, 2.]]))["augrc"]  # 1 * 1 / 2 / 4^2
    0.03125
    """
    if not isinstance(fine, Tensor) or fine.dim() != 2 or fine.shape[1] != 3:
        raise ValueError(f"fine must be a state's (K, 3) fine counters, got {getattr(fine, 'shape', type(fine))}")
    fine = fine.detach().cpu().double()
    if not float(fine[:, 0].sum()) > 0:
        raise ValueError("fine counts no rows: there is no AURC or AUGRC to bound")
    count = fine[:, 0].flip(0)  # most confident first
    errors = (fine[:, 0] - fine[:, 2]).clamp_min(0).flip(0)
    errors = torch.minimum(errors, count)
    before = count.cumsum(0) - count
    n = float(count.sum())

    def h(x: Tensor) -> Tensor:
        return torch.digamma(x + 1)  # H(x) up to a constant, which cancels in every difference below

    c, e, k = count, errors, before
    ck = torch.where(c > 0, e * k / c.clamp_min(1e-300), 0.0)
    spread = ck * (h(k + c) - h(k))
    first = -k * (h(k + e) - h(k)) + e * (h(k + c) - h(k + e)) + spread
    last = (k + c - e) * (h(k + c) - h(k + c - e)) - spread
    cell = torch.where(c > 0, torch.maximum(first, last).clamp_min(0), 0.0)
    return {"aurc": float(cell.sum()) / n, "augrc": float((e * (c - e)).clamp_min(0).sum()) / (2 * n * n)}
