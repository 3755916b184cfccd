"""Bootstrap intervals of the exact selective metrics (`selective.py`), and paired differences between confidence
scores.

A bootstrap replicate draws N rows with replacement; it is the multiplicity of each row, and every score is scored
on the same replicate rows, so the differences between two scores pair up (Efron & Tibshirani 1993).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence

import pandas as pd
import torch
from torch import Tensor

from fastai_ls.calibration.intervals import percentile_intervals
from fastai_ls.calibration.selective import _aurc_sum, _expected_errors, _positions, _Ranking, check_selective_input
from fastai_ls.calibration.threads import one_thread
from fastai_ls.validation import check_ci, check_seed

__all__ = ["bootstrap_selective", "selective_table"]

# Replicates are drawn and scored this many rows x replicates at a time, so that memory stays bounded (about 30 MB
# per array) whatever N and `n_boot`.
_CHUNK_ELEMENTS = 4_000_000


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
    with one_thread():
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
        s += _aurc_sum(e)
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
    >>> from fastai_ls.calibration.confidence_scores import confidence_scores
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
    with one_thread():
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
