"""Selective classification from held-out logits: confidence scores, and the exact sort-based metrics of the rows
they rank, with bootstrap intervals.

A score ranks the rows; accepting the k highest-scoring rows, E(k) is the expected number of errors among them when
rows with equal scores are taken in random order, so that ties share their errors evenly (a tied group of c rows
with e errors, entered after K rows with E errors, gives E(K + i) = E + e i / c). Then AURC = (1/N) sum_k E(k)/k
(Geifman, Uziel & El-Yaniv, ICLR 2019) and AUGRC = (1/N) sum_k E(k)/N (Traub et al., NeurIPS 2024). Both are computed
from E(k) row by row, after one sort: no histogram, no harmonic-number approximation.

`CalibrationState` streams the softmax response's AURC and AUGRC from its fine histogram instead, where rows in one
confidence cell are tied; `streamed_error_bound` states how far that can be from the exact value here.

A bootstrap replicate draws N rows with replacement; it is the multiplicity of each row, and every score is scored
on the same replicate rows, so the differences between two scores pair up (Efron & Tibshirani 1993).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence

import pandas as pd
import torch
from torch import Tensor

from fastai_ls.calibration.calibrators.base import clean_logits
from fastai_ls.calibration.intervals import _one_thread, check_ci, check_seed, percentile_intervals

__all__ = ["SCORE_NAMES", "NORMALISED", "confidence_scores", "check_selective_input", "expected_errors", "aurc",
           "augrc", "risk_at_coverage", "coverage_at_risk", "selective_accuracy", "bootstrap_selective",
           "selective_table", "streamed_error_bound"]

SCORE_NAMES = ("msp", "max_logit", "margin", "energy", "entropy", "doctor", "pnorm", "pnorm_softmax")
# The scores that normalise the logits (Cattelan & Silva 2024), which undo most of what label smoothing does to the
# ranking (Xia et al. 2025).
NORMALISED = ("pnorm", "pnorm_softmax")
# Replicates are drawn and scored this many rows x replicates at a time, so that memory stays bounded (about 30 MB
# per array) whatever N and `n_boot`.
_CHUNK_ELEMENTS = 4_000_000
# The largest finite |logit| scored: differences and sums of C such values stay finite in float64.
_LARGEST_LOGIT = 1e300


# --- confidence scores --------------------------------------------------------------------------------------------


def _check_p(p: float, name: str = "p") -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not p > 0:  # also refuses NaN
        raise ValueError(f"{name} must be a positive number (the norm's order, e.g. 2; inf for the max norm), got "
                         f"{p!r}")
    return float(p)


def _check_logits(logits: Tensor) -> Tensor:
    """`logits` detached on the CPU, or a ValueError naming the problem (shape, dtype, NaN or +inf rows)."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[1] < 2 or logits.shape[0] < 1:
        raise ValueError(f"logits must be (N, C) with N >= 1 rows and C >= 2 classes, got shape "
                         f"{tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    logits = logits.detach().cpu()
    bad = (logits.isnan() | (logits == math.inf)).any(1) | (logits == -math.inf).all(1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"logits hold NaN or +inf (or no finite value) in {int(bad.sum())} of {len(logits)} rows "
                         f"(first: row {i}); drop those rows")
    # Differences and sums of logits past this overflow float64 and give NaN scores.
    huge = (logits.isfinite() & (logits.abs() > _LARGEST_LOGIT)).any(1)
    if bool(huge.any()):
        i = int(huge.nonzero()[0, 0])
        raise ValueError(f"logits hold finite values beyond +-{_LARGEST_LOGIT:g} in {int(huge.sum())} of "
                         f"{len(logits)} rows (first: row {i}), which overflow float64 in the scores")
    return logits


def _row_blocks(n: int, n_classes: int) -> Iterator[slice]:
    """Row ranges of about 2**18 logits: the float64 temporaries of the scores (2 MB each) stay in the cache through
    the ~70 passes over them, and memory stays bounded whatever N."""
    step = max(1, 2**18 // n_classes)
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def _block_scores(logits: Tensor, names: Sequence[str], grid: Sequence[float],
                  temperature: float) -> dict[tuple[str, float | None], Tensor]:
    """(name, p) -> scores of a block of rows (p None for the scores without one; `pnorm` and `pnorm_softmax` at
    every p of `grid`)."""
    z = clean_logits(logits, torch.float64)[0] if bool((logits == -math.inf).any()) else logits.double()
    out = {}
    top2 = z.topk(2, dim=1).values
    lse = z.logsumexp(1)
    for name in names:
        if name == "msp":
            out[(name, None)] = (top2[:, 0] - lse).exp()
        elif name == "max_logit":
            out[(name, None)] = top2[:, 0]
        elif name == "margin":
            out[(name, None)] = (top2[:, 0] - lse).exp() - (top2[:, 1] - lse).exp()
        elif name == "energy":
            out[(name, None)] = lse
        elif name in ("entropy", "doctor"):
            log_p = z - lse[:, None]
            probs = log_p.exp()
            if name == "entropy":
                out[(name, None)] = (probs * log_p).sum(1)
            else:
                top = probs.max(1)
                rest = (probs * (1 + top.values[:, None] - probs)).scatter_(1, top.indices[:, None], 0.0).sum(1)
                out[(name, None)] = -rest / (probs * probs).sum(1)
    normalised = [name for name in NORMALISED if name in names]
    if not normalised:
        return out
    # ||c||_p = m ||c / m||_p with m = max |c|: no overflow at large p, and integer powers by repeated products.
    centred = z - z.mean(1, keepdim=True)
    top = centred.amax(1)
    scale = centred.abs().amax(1)
    constant = scale == 0  # equal logits: no evidence, the least confident values (pnorm 0, pnorm_softmax 1/C)
    scale = torch.where(constant, 1.0, scale)
    ratio = centred.abs_().div_(scale[:, None])  # `centred` is |c| / m from here
    shifted = None
    power, order = None, 0
    for p in sorted(set(grid)):
        if p == math.inf:
            root = torch.ones_like(scale)
        elif float(p).is_integer() and p <= 64:
            if power is None:
                power, order = ratio.clone(), 1
            while order < p:
                power.mul_(ratio)
                order += 1
            root = power.sum(1).pow(1 / p)
        else:
            root = ratio.pow(p).sum(1).pow(1 / p)
        overflow = ~constant & ~root.isfinite()
        if bool(overflow.any()):
            raise ValueError(f"p={p:g} is too small for these logits: ||z - mean z||_p overflows float64 in "
                             f"{int(overflow.sum())} rows, so every such row would tie at the lowest score; use a "
                             "larger p (e.g. 1 to 9)")
        norm = scale * root
        if "pnorm" in normalised:
            out[("pnorm", p)] = torch.where(constant, 0.0, top / norm)
        if "pnorm_softmax" in normalised:
            if shifted is None:
                shifted = z - z.amax(1, keepdim=True)  # c - max c
            # max_k softmax(c / (t ||c||))_k = 1 / sum_k exp((c_k - max c) / (t ||c||))
            total = (shifted * (1 / (temperature * norm))[:, None]).exp_().sum(1)
            out[("pnorm_softmax", p)] = torch.where(constant, 1 / z.shape[1], 1 / total)
    return out


def _scores(logits: Tensor, names: Sequence[str], grid: Sequence[float],
            temperature: float = 1.0) -> dict[tuple[str, float | None], Tensor]:
    """`_block_scores` of checked logits, block by block."""
    parts = [_block_scores(logits[rows], names, grid, temperature) for rows in _row_blocks(*logits.shape)]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def confidence_scores(
    logits: Tensor,
    scores: Sequence[str] | None = None,
    p: float = 2,
    temperature: float = 1.0,
) -> dict[str, Tensor]:
    """Confidence scores of each row, computed in float64 from the (N, C) logits: higher is more confident.

    - `msp`: the softmax response max_k p_k (Hendrycks & Gimpel 2017).
    - `max_logit`: max_k z_k.
    - `margin`: the softmax margin p_(1) - p_(2), the two largest probabilities.
    - `energy`: log sum_k exp z_k, the negative free energy (Liu et al. 2020).
    - `entropy`: the negative entropy sum_k p_k log p_k.
    - `doctor`: -D_alpha = -(1 - sum_k p_k^2) / sum_k p_k^2, minus DOCTOR's statistic (Granese et al., NeurIPS 2021),
      so that higher is more confident. (D_beta = (1 - max p) / max p ranks the rows as `msp` does.) 1 - sum p^2
      is summed as sum over k != argmax of p_k (1 + p_max - p_k), of non-negative terms, so that it does not cancel
      on confident rows.
    - `pnorm`: MaxLogit-pNorm, max_k (z_k - mean z) / ||z - mean z||_p (Cattelan & Silva, UAI 2024).
    - `pnorm_softmax`: p-NormSoftmax, max_k softmax((z - mean z) / (temperature ||z - mean z||_p))_k (the same).

    A -inf logit (a class ruled out) stands for the row's lowest finite logit minus 104, as in the calibrators.
    `pnorm` and `pnorm_softmax` are exact from log-probabilities too (centring cancels the log-sum-exp), and
    so are `msp`, `margin`, `entropy` and `doctor`; `max_logit` and `energy` need the logits themselves. A row of
    equal logits gets `pnorm` 0 and `pnorm_softmax` 1/C, the least confident values. Rows are taken in blocks, so
    the float64 temporaries stay small (2 MB each).

    Parameters
    ----------
    logits : Tensor
        (N, C) logits (or log-probabilities); NaN and +inf are refused.
    scores : sequence of str, optional
        The names to compute, from `SCORE_NAMES` (default: all).
    p : float
        Order of the norm of `pnorm` and `pnorm_softmax`, > 0 (`math.inf` for the max norm).
    temperature : float
        The temperature of `pnorm_softmax`, > 0.

    Returns
    -------
    dict of str to Tensor
        Score name to an (N,) float64 CPU tensor, in the order asked for.

    Examples
    --------
    >>> s = confidence_scores(torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0]]), ["msp", "pnorm"])
    >>> [round(v, 4) for v in s["msp"].tolist()], [round(v, 4) for v in s["pnorm"].tolist()]
    ([0.787, 0.4223], [0.8165, 0.4082])
    """
    names = list(SCORE_NAMES if scores is None else scores)
    unknown = [name for name in names if name not in SCORE_NAMES]
    if isinstance(scores, str) or unknown or not names or len(set(names)) < len(names):
        raise ValueError(f"scores must be distinct names from {', '.join(SCORE_NAMES)}, got {scores!r}")
    p = _check_p(p)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    logits = _check_logits(logits)
    with _one_thread():  # ~70 passes over small blocks: a second thread saves little and waits on busy cores
        computed = _scores(logits, names, [p], float(temperature))
    return {name: computed[(name, p if name in NORMALISED else None)] for name in names}


# --- exact metrics of one ranking ---------------------------------------------------------------------------------


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
    if not scores.is_floating_point():
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
    with _one_thread():
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
    return float((e / torch.arange(1, len(e) + 1, dtype=torch.float64)).mean())


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


# --- the bootstrap ------------------------------------------------------------------------------------------------


def _generator(seed: int | None) -> torch.Generator:
    """A private generator (the global random state is neither read nor changed) seeded with `seed`, or with a
    fresh seed for None."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
        return generator
    return generator.manual_seed(seed)


def _replicate_weights(n: int, n_boot: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Multiplicities (n, B) of each row (n draws with replacement per replicate; replicates along the columns, so
    that reordering the rows moves contiguous memory), the `n_boot` replicates in successive chunks of B. A chunk's
    draws come from `generator` after the previous chunk's. float32, in which sums of counts are exact up to 2**24
    rows and cumulative sums run 3x faster than in int32 (float64 above that)."""
    size = max(1, _CHUNK_ELEMENTS // max(n, 1))
    dtype = torch.float32 if n < 2**24 else torch.float64
    for start in range(0, n_boot, size):
        b = min(size, n_boot - start)
        cells = torch.randint(0, n, (b, n), generator=generator, dtype=torch.int32)
        cells.mul_(b).add_(torch.arange(b, dtype=torch.int32)[:, None])  # row * B + replicate: < 2**31
        yield torch.bincount(cells.flatten(), minlength=n * b).to(dtype).view(n, b)


class _Plan:
    """What a replicate needs of one ranking of the rows `rows` (global row ids; default all), in decreasing score:
    the groups of tied rows that hold an error (only they add to E(k)), and for each row the segment it falls in
    between the boundaries of those groups, so that one `index_add_` of the weights counts the rows ranked ahead of
    every boundary (4x faster than a cumulative sum over all rows, and no reordering of the weights)."""

    def __init__(self, scores: Tensor, errors: Tensor, rows: Tensor | None = None):
        ranking = _Ranking(scores)
        n = len(scores)
        error_positions = (errors[ranking.order] > 0).nonzero().squeeze(1)
        groups, group_of_error = torch.unique_consecutive(ranking.group[error_positions], return_inverse=True)
        starts = torch.cat([torch.zeros(1, dtype=torch.long), ranking.ends[:-1]])
        start, end = starts[groups], ranking.ends[groups]
        self.untied = bool((end - start == 1).all())  # each error its own group: c = e = its multiplicity
        self.rows = rows
        self.order = ranking.order if rows is None else rows[ranking.order]  # global ids, in decreasing score
        self.error_rows = self.order[error_positions]
        self.group_of_error, self.n_groups = group_of_error, len(groups)
        boundaries = start if self.untied else torch.unique(torch.cat([start, end]))
        self.start = torch.searchsorted(boundaries, start)  # the boundary of each group's start (and end)
        self.end = None if self.untied else torch.searchsorted(boundaries, end)
        # Segment of each row (in the order of `rows`): boundaries at or before its sorted position.
        segment_at = torch.searchsorted(boundaries, torch.arange(n), right=True)
        self.segment = torch.empty(n, dtype=torch.long)
        self.segment[ranking.order] = segment_at
        self.n_segments = len(boundaries) + 1
        # Per sorted position, its group's first and last-plus-one positions (for the risk at a coverage).
        self.group_start, self.group_end = starts[ranking.group], ranking.ends[ranking.group]


def _harmonic_tables(n: int) -> tuple[Tensor, Tensor]:
    """H(m) = sum_{i<=m} 1/i and sum_{i<m} H(i) = m H(m) - m, for m = 0..n."""
    h = torch.cat([torch.zeros(1, dtype=torch.float64), (1 / torch.arange(1, n + 1, dtype=torch.float64)).cumsum(0)])
    m = torch.arange(n + 1, dtype=torch.float64)
    return h, m * h - m


def _replicate_sums(plan: _Plan, weights: Tensor, tables: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Per replicate (columns of `weights`, multiplicities by global row id): S = sum_k E(k)/k, T = sum_k E(k) and
    the replicate's rows n', for its rows ranked as `plan` says.

    Swapping the sums, an error at position q adds sum_{k=q..n'} 1/k = H(n') - H(q - 1) to S and n' - q + 1 to T.
    A tied group of c rows (a replicate's copies of a row tie too) with e errors after K rows has an error at each
    of its positions with probability e/c, which gives e H(n') - (e/c) sum_{j<c} H(K + j) to S and
    e (n' - K - (c - 1)/2) to T. Only groups that hold an error add anything: past counting the rows ahead of
    each, the work is over the error rows. The counts are whole numbers, exact in the weights' dtype."""
    harmonic, harmonic_sum = tables
    source = weights if plan.rows is None else weights.index_select(0, plan.rows)
    ahead = source.new_zeros(plan.n_segments, source.shape[1]).index_add_(0, plan.segment, source).cumsum_(0)
    n = ahead[-1]
    before = ahead.index_select(0, plan.start)
    error_weights = weights.index_select(0, plan.error_rows)
    if plan.untied:
        through = before + error_weights
        errors = error_weights.double()
        count = errors.clamp_min(1)
    else:
        through = ahead.index_select(0, plan.end)
        errors = error_weights.new_zeros(plan.n_groups, weights.shape[1]).index_add_(
            0, plan.group_of_error, error_weights).double()
        count = (through - before).double().clamp_min_(1)  # a group without rows has no errors either
    sum_h = harmonic_sum.take(through.long()).sub_(harmonic_sum.take(before.long()))  # sum_{j<c} H(K + j)
    n_double = n.double()
    s = (errors * (harmonic.take(n.long())[None, :] - sum_h / count)).sum(0)
    t = (errors * (n_double[None, :] - before.double() - (count - 1) / 2)).sum(0)
    return s, t, n_double


def _replicate_risk(plan: _Plan, weights: Tensor, positions: Tensor) -> Tensor:
    """E(k) / k at the sorted positions `positions` (M,) of each replicate: (B, M). (Every group here, not only
    those with errors: a position may fall in a group without one.)"""
    ranked = weights.index_select(0, plan.order).double()
    rows = ranked.cumsum(0).T.contiguous()  # (B, n): rows up to each sorted position
    wrong = torch.zeros(len(weights), dtype=torch.float64)
    wrong[plan.error_rows] = 1.0
    errors_upto = (ranked * wrong[plan.order][:, None]).cumsum(0).T.contiguous()
    k = positions.double()[None, :].expand(len(rows), -1).contiguous()
    j = torch.searchsorted(rows, k)  # the sorted position whose copies hold the k-th replicate row
    start, end = plan.group_start[j], plan.group_end[j]
    first = lambda m: torch.where(m > 0, rows.gather(1, (m - 1).clamp_min(0)), 0.0)  # noqa: E731
    first_e = lambda m: torch.where(m > 0, errors_upto.gather(1, (m - 1).clamp_min(0)), 0.0)  # noqa: E731
    before, through = first(start), first(end)
    e_before, e_through = first_e(start), first_e(end)
    rate = (e_through - e_before) / (through - before).clamp_min(1)
    return (e_before + rate * (k - before)) / k


def bootstrap_selective(
    scores: dict[str, Tensor],
    correct: Tensor,
    n_boot: int = 1000,
    seed: int | None = 0,
    folds: dict[str, Tensor] | None = None,
    coverages: Sequence[float] | None = None,
    subsets: dict[str, Tensor] | None = None,
) -> dict[str, dict[str, Tensor]]:
    """AURC and AUGRC of every score on `n_boot` bootstrap replicates of the rows, all scores on the same
    replicates (so that `a[name] - b[name]` are paired differences). Replicates are drawn and scored in chunks:
    memory stays about 100 MB whatever N and `n_boot`.

    Parameters
    ----------
    scores : dict of str to Tensor
        Name to (N,) confidence scores of the same rows.
    correct : Tensor
        (N,) bool (or 0/1).
    n_boot : int
        Replicates, >= 2.
    seed : int, optional
        Seed of the draws (a private torch generator); None draws a fresh one.
    folds : dict of str to Tensor, optional
        For a score named here, an (N,) fold id per row: the score ranks the rows within each fold only (scores
        chosen fold by fold are not comparable across folds), and its metric is the row-weighted mean over the
        folds: AURC = (1/N) sum over folds of sum_k E_f(k)/k, AUGRC = sum over folds of (n_f/N) AUGRC_f.
    coverages : sequence of float, optional
        Also the selective risk at these coverages (key 'risk', (n_boot, M)), for the scores without folds.
    subsets : dict of str to Tensor, optional
        For a score named here, the row ids it is scored on: each replicate's copies of those rows (a bootstrap of
        them whose size varies a little from replicate to replicate), so that several subsets share the draws.

    Returns
    -------
    dict of str to dict of str to Tensor
        Name to {'aurc': (n_boot,), 'augrc': (n_boot,)[, 'risk': (n_boot, M)]} float64.

    Examples
    --------
    >>> s = {"a": torch.tensor([0.9, 0.8, 0.1, 0.5]), "b": torch.tensor([0.1, 0.8, 0.9, 0.5])}
    >>> reps = bootstrap_selective(s, torch.tensor([1, 1, 0, 1]), n_boot=200)
    >>> bool((reps["a"]["aurc"] <= reps["b"]["aurc"]).all())
    True
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < 2:
        raise ValueError(f"n_boot must be an int >= 2, got {n_boot!r}")
    seed = check_seed(seed)
    checked = {name: check_selective_input(s, correct) for name, s in scores.items()}
    if not checked:
        raise ValueError("scores is empty")
    errors = next(iter(checked.values()))[1]
    n = len(errors)
    folds, subsets = folds or {}, subsets or {}
    if set(folds) & set(subsets):
        raise ValueError("a score is ranked within folds or on a subset of the rows, not both")
    _check_rows(folds, subsets, checked, n)
    plans, same_as = {}, {}

    def same(a: dict, x: str, y: str) -> bool:
        return (x in a) == (y in a) and (x not in a or torch.equal(a[x].cpu(), a[y].cpu()))

    for name, (s, _) in checked.items():
        # A score given twice (a chosen score is also a row of its own) is scored once.
        twin = next((other for other in plans if torch.equal(checked[other][0], s) and same(folds, name, other)
                     and same(subsets, name, other)), None)
        if twin is not None:
            same_as[name] = twin
        elif name in subsets:
            idx = subsets[name].cpu().long()
            plans[name] = (_Plan(s[idx], errors[idx], idx),)
        elif name in folds:
            fold_of = folds[name].cpu()
            parts = [torch.nonzero(fold_of == f).squeeze(1) for f in torch.unique(fold_of).tolist()]
            plans[name] = [_Plan(s[idx], errors[idx], idx) for idx in parts]
        else:
            plans[name] = _Plan(s, errors)
    positions = _positions(coverages, n)[0] if coverages is not None else None
    tables = _harmonic_tables(n)
    out = {name: {"aurc": torch.empty(n_boot, dtype=torch.float64), "augrc": torch.empty(n_boot, dtype=torch.float64)}
           for name in checked}
    if positions is not None:
        for name in checked:
            if name not in folds:
                out[name]["risk"] = torch.empty(n_boot, len(positions), dtype=torch.float64)
    with _one_thread():
        _fill(out, plans, n, n_boot, seed, tables, positions)
    for name, twin in same_as.items():
        out[name] = {metric: values.clone() for metric, values in out[twin].items()}
    return out


def _check_rows(folds: dict, subsets: dict, scores: dict, n: int) -> None:
    """A ValueError unless `folds` and `subsets` name given scores, each fold assignment is (N,) and each subset
    holds integer row ids in [0, N)."""
    for label, given in (("folds", folds), ("subsets", subsets)):
        unknown = [name for name in given if name not in scores]
        if unknown:
            raise ValueError(f"{label} name scores that are not given: {', '.join(map(repr, unknown))}")
    for name, fold_of in folds.items():
        if not isinstance(fold_of, Tensor) or fold_of.shape != (n,):
            raise ValueError(f"folds[{name!r}] must be an ({n},) tensor of fold ids, one per row, got "
                             f"{tuple(getattr(fold_of, 'shape', ()))}")
    for name, idx in subsets.items():
        if not isinstance(idx, Tensor) or idx.dim() != 1 or len(idx) == 0 or idx.is_floating_point() or \
                idx.is_complex() or idx.dtype == torch.bool or bool(((idx < 0) | (idx >= n)).any()):
            raise ValueError(f"subsets[{name!r}] must be a non-empty 1-d tensor of integer row ids in [0, {n})")


def _fill(out: dict, plans: dict, n: int, n_boot: int, seed: int | None, tables: tuple[Tensor, Tensor],
          positions: Tensor | None) -> None:
    """`bootstrap_selective`'s replicates, chunk by chunk, written into `out`."""
    start = 0
    for weights in _replicate_weights(n, n_boot, _generator(seed)):
        stop = start + weights.shape[1]
        for name, plan in plans.items():
            if isinstance(plan, tuple):  # on a subset of the rows
                s, t, rows = _replicate_sums(plan[0], weights, tables)
                rows = rows.clamp_min(1)
                out[name]["aurc"][start:stop], out[name]["augrc"][start:stop] = s / rows, t / (rows * rows)
            elif isinstance(plan, list):  # ranked within each fold
                s = t_over_n = 0.0
                for part in plan:
                    part_s, part_t, part_n = _replicate_sums(part, weights, tables)
                    s, t_over_n = s + part_s, t_over_n + part_t / part_n.clamp_min(1)
                out[name]["aurc"][start:stop], out[name]["augrc"][start:stop] = s / n, t_over_n / n
            else:
                s, t, _ = _replicate_sums(plan, weights, tables)
                out[name]["aurc"][start:stop], out[name]["augrc"][start:stop] = s / n, t / (n * n)
                if "risk" in out[name]:
                    out[name]["risk"][start:stop] = _replicate_risk(plan, weights, positions)
        start = stop


def _fold_metrics(scores: Tensor, errors: Tensor, fold_of: Tensor | None) -> tuple[float, float]:
    """Exact AURC and AUGRC; with `fold_of`, ranked within each fold and combined as `bootstrap_selective` says."""
    n = len(scores)
    parts = [torch.arange(n)] if fold_of is None else \
        [torch.nonzero(fold_of == f).squeeze(1) for f in torch.unique(fold_of).tolist()]
    s = t = 0.0
    for idx in parts:
        e = _expected_errors(_Ranking(scores[idx]), errors[idx])
        s += float((e / torch.arange(1, len(e) + 1, dtype=torch.float64)).sum())
        t += float(e.sum()) / len(e)
    return s / n, t / n


def selective_table(
    scores: dict[str, Tensor],
    correct: Tensor,
    ci: float = 0.95,
    n_boot: int = 1000,
    seed: int | None = 0,
    baseline: str | None = "msp",
    folds: dict[str, Tensor] | None = None,
) -> pd.DataFrame:
    """One row per score: exact `aurc` and `augrc` with their percentile bootstrap intervals (`_lo`, `_hi`), and
    with a `baseline` the paired differences `aurc_vs_<baseline>`, `augrc_vs_<baseline>` (row minus baseline on the
    same replicate rows; negative: the row ranks better) with their intervals. A row scored within `folds` is
    compared with the baseline scored within the same folds.

    Parameters
    ----------
    scores : dict of str to Tensor
        Name to (N,) confidence scores of the same rows.
    correct : Tensor
        (N,) bool (or 0/1).
    ci : float
        Level of the intervals.
    n_boot : int
        Bootstrap replicates.
    seed : int, optional
        Seed of the bootstrap.
    baseline : str, optional
        The score the others are compared with (a key of `scores`); None for no differences.
    folds : dict of str to Tensor, optional
        Scores ranked within folds, as in `bootstrap_selective`.

    Returns
    -------
    pandas.DataFrame

    Examples
    --------
    >>> s = confidence_scores(torch.tensor([[3., 0.], [1., 0.], [0., 2.], [0., .5]]), ["msp", "margin"])
    >>> t = selective_table(s, torch.tensor([1, 0, 1, 1]), n_boot=100)
    >>> float(t.loc["margin", "aurc_vs_msp"])
    0.0
    """
    check_ci(ci, n_boot)
    folds = dict(folds or {})
    if baseline is not None and baseline not in scores:
        raise ValueError(f"baseline {baseline!r} is not one of the scores ({', '.join(scores)})")
    compared = dict(scores)
    # The baseline within the folds of each fold-wise row (one copy per distinct fold assignment).
    paired_baseline = {}
    if baseline is not None:
        for fold_of in list(folds.values()):
            key = next((k for k, f in paired_baseline.items() if torch.equal(f, fold_of)), None)
            if key is None:
                key = f"{baseline} (per fold {len(paired_baseline)})"
                compared[key], folds[key] = scores[baseline], fold_of
                paired_baseline[key] = fold_of
    replicates = bootstrap_selective(compared, correct, n_boot, seed, folds=folds)
    errors = check_selective_input(next(iter(scores.values())), correct)[1]
    with _one_thread():
        return _table(scores, errors, replicates, ci, baseline, folds, paired_baseline)


def _table(scores: dict, errors: Tensor, replicates: dict, ci: float, baseline: str | None, folds: dict,
           paired_baseline: dict) -> pd.DataFrame:
    """`selective_table`'s rows from its replicates."""
    rows = {}
    for name, s in scores.items():
        row = {}
        point = _fold_metrics(s.detach().cpu().double(), errors, folds.get(name))
        for metric, value in zip(("aurc", "augrc"), point):
            lo, hi = percentile_intervals({metric: replicates[name][metric]}, ci)[metric]
            row.update({metric: value, f"{metric}_lo": lo, f"{metric}_hi": hi})
        if baseline is not None:
            base = next((k for k, f in paired_baseline.items() if name in folds and torch.equal(f, folds[name])),
                        baseline)
            base_point = _fold_metrics(scores[baseline].detach().cpu().double(), errors, folds.get(base))
            for i, metric in enumerate(("aurc", "augrc")):
                d = replicates[name][metric] - replicates[base][metric]
                lo, hi = percentile_intervals({metric: d}, ci)[metric]
                row.update({f"{metric}_vs_{baseline}": point[i] - base_point[i], f"{metric}_vs_{baseline}_lo": lo,
                            f"{metric}_vs_{baseline}_hi": hi})
        rows[name] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "score"
    return table


# --- the streamed values --------------------------------------------------------------------------------------------


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
