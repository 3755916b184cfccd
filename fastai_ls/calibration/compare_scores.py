"""Which confidence score should decide when to abstain? Every score of `confidence_scores.py` scored on held-out
logits, and a cross-fitted choice among them that keeps the softmax response unless another score is better beyond
its interval (Cattelan & Silva, UAI 2024, who tune p on held-out data and fall back to the softmax response when no
p helps)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from fastai_ls.calibration.calibrators.folds import stratified_folds
from fastai_ls.calibration.confidence_scores import NORMALISED, SCORE_NAMES, _check_p, _checked_logits, _scores
from fastai_ls.calibration.intervals import percentile_intervals
from fastai_ls.calibration.selective import _aurc_sum, _expected_errors, _Ranking
from fastai_ls.calibration.selective_bootstrap import bootstrap_selective, selective_table
from fastai_ls.calibration.threads import one_thread
from fastai_ls.validation import check_ci, check_class_ids, check_seed

__all__ = ["P_GRID", "check_held_out", "compare_confidence_scores", "softmax_response_note"]

# The norms tried for `pnorm` and `pnorm_softmax` (Cattelan & Silva try p = 0..9, where p = 0 is no normalisation).
P_GRID = tuple(range(1, 10))


def _aurc(scores: Tensor, errors: Tensor) -> float:
    return _aurc_sum(_expected_errors(_Ranking(scores), errors)) / len(scores)


def _label(key: tuple[str, float | None]) -> str:
    name, p = key
    return name if p is None else f"{name} p={p:g}"


def _best(values: dict, family: Sequence[str] | None) -> tuple[str, float | None]:
    """The candidate (of `family`'s names; None: any) with the lowest AURC in `values`, the first of equal values
    (the grid's smallest p; the softmax response before the others)."""
    keys = [k for k in values if family is None or k[0] in family]
    return min(keys, key=lambda k: values[k])


def _fall_back(candidates: dict, correct: Tensor, best: list, train: list, ci: float, n_boot: int,
               seed: int) -> list:
    """Each fold's best candidate if its AURC on the fold's training rows is below the softmax response's beyond the
    `ci` paired bootstrap interval of the difference, else the softmax response. The folds share one stream of
    replicates of all rows, each restricted to its training rows."""
    msp = ("msp", None)
    tested = [f for f, key in enumerate(best) if key != msp]
    if not tested:
        return best
    scores = {**{f"best {f}": candidates[best[f]] for f in tested}, **{f"msp {f}": candidates[msp] for f in tested}}
    subsets = {name: train[int(name.split()[1])] for name in scores}
    replicates = bootstrap_selective(scores, correct, n_boot, seed, subsets=subsets)
    chosen = list(best)
    for f in tested:
        difference = replicates[f"best {f}"]["aurc"] - replicates[f"msp {f}"]["aurc"]
        if not percentile_intervals({"d": difference}, ci)["d"][1] < 0:
            chosen[f] = msp
    return chosen


def check_held_out(logits: Tensor | np.ndarray, targets: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
    """Held-out `logits` (detached, on the CPU) and `targets` (int64), or an error naming the problem: logits as
    `confidence_scores` refuses them, targets that are not one integer class id in [0, C) per row (bool, float,
    (N, 1), ignored rows such as -100).

    Parameters
    ----------
    logits : Tensor | np.ndarray
        (N, C) logits.
    targets : Tensor | np.ndarray
        (N,) class ids.

    Returns
    -------
    tuple of Tensor
        The logits and the int64 targets (the caller's own are left as they were).

    Examples
    --------
    >>> check_held_out(torch.zeros(2, 3), torch.tensor([0, 3]))
    Traceback (most recent call last):
    ...
    ValueError: targets hold 1 class ids outside [0, 3) (first: 3 in row 1); drop ignored rows
    """
    if isinstance(logits, np.ndarray):
        logits = torch.from_numpy(logits)
    if isinstance(targets, np.ndarray):
        targets = torch.from_numpy(targets)
    z = _checked_logits(logits)
    n, n_classes = z.shape
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor or a numpy array, got {type(targets).__name__}")
    targets = check_class_ids(targets, n, n_classes, name="targets", rows="logits", column=False,
                              fix="drop ignored rows")
    return z, targets.cpu()


def compare_confidence_scores(
    logits: Tensor | np.ndarray,
    targets: Tensor | np.ndarray,
    folds: int = 5,
    seed: int = 0,
    ci: float = 0.95,
    n_boot: int = 1000,
    grid: Sequence[float] = P_GRID,
) -> pd.DataFrame:
    """Every confidence score of `SCORE_NAMES` on held-out logits, and the cross-fitted choice among them.

    Rows: `msp`, `max_logit`, `margin`, `energy`, `entropy`, `doctor` (`confidence_scores`), `pnorm` and
    `pnorm_softmax` with p chosen per fold from `grid` (the lowest AURC on the other folds; `pnorm_softmax` at
    temperature 1), and `selected`: per fold, the candidate (any score, any p) with the lowest AURC on the other
    folds, kept only if its AURC there is below the softmax response's beyond the `ci` paired bootstrap interval,
    else `msp`. Each fold is scored with what was chosen without it. When every fold made the same choice, the row
    is that score on all rows, the same value as a fixed score's row; when folds chose differently, the chosen
    scores are not comparable across folds, so each fold is ranked on its own and the row is the row-weighted mean
    over the folds (the `choice` column says which, and the comparison with `msp` is then with `msp` ranked in the
    same folds).

    Columns: `aurc`, `augrc` (exact, `selective.aurc`/`augrc`), each with `_lo`, `_hi` (percentile bootstrap over
    the rows, the same replicates for every row), `aurc_vs_msp`, `augrc_vs_msp` (row minus `msp` on the same rows,
    negative: ranks better) with their paired intervals, and `choice` (the p or candidate chosen, per fold when
    they differ). `table.attrs` holds `msp_ranks_worse`: whether a normalised score (`pnorm`, `pnorm_softmax`) has an
    AURC below the softmax response's beyond the paired interval (`softmax_response_note` says it in words),
    `accuracy`, `n`, `n_classes`, `folds`, `seed`, `ci`.

    Parameters
    ----------
    logits : Tensor | np.ndarray
        (N, C) held-out logits (log-probabilities will do for every score but `max_logit` and `energy`).
    targets : Tensor | np.ndarray
        (N,) class ids in [0, C).
    folds : int
        Stratified folds of the cross-fitted choice, >= 2.
    seed : int
        Seed of the folds and of the bootstrap.
    ci : float
        Level of the intervals and of the fallback rule.
    n_boot : int
        Bootstrap replicates.
    grid : sequence of float
        The p tried for `pnorm` and `pnorm_softmax`, each > 0.

    Returns
    -------
    pandas.DataFrame
        Indexed by score name, `selected` last.

    Examples
    --------
    >>> _ = torch.manual_seed(0); z = 3 * torch.randn(500, 4); y = torch.distributions.Categorical(logits=z).sample()
    >>> table = compare_confidence_scores(z, y, n_boot=200)
    >>> list(table.index)[-1], table.loc["selected", "choice"]
    ('selected', 'msp')
    """
    z, targets = check_held_out(logits, targets)
    check_ci(ci, n_boot)
    seed = check_seed(seed, allow_none=False)
    grid = [_check_p(p, "every p of grid") for p in grid]
    if not grid:
        raise ValueError("grid is empty: give the p to try, e.g. range(1, 10)")
    fold_of = stratified_folds(targets, folds, seed)
    # One thread: these are many passes over arrays of a few MB, which a second thread hardly speeds up and, on cores
    # other work keeps busy, slows down (2.5x on 2 busy cores).
    with one_thread():
        return _compare(z, targets, fold_of, folds, seed, ci, n_boot, grid)


def _compare(z: Tensor, targets: Tensor, fold_of: Tensor, folds: int, seed: int, ci: float, n_boot: int,
             grid: list) -> pd.DataFrame:
    n, n_classes = z.shape
    correct = z.argmax(1) == targets
    errors = 1.0 - correct.double()
    candidates = _scores(z, SCORE_NAMES, grid)
    train = [torch.nonzero(fold_of != f).squeeze(1) for f in range(folds)]
    values = [{key: _aurc(s[rows], errors[rows]) for key, s in candidates.items()} for rows in train]
    choices = {row: [_best(v, family) for v in values]
               for row, family in (("pnorm", ("pnorm",)), ("pnorm_softmax", ("pnorm_softmax",)), ("selected", None))}
    choices["selected"] = _fall_back(candidates, correct, choices["selected"], train, ci, n_boot, seed)

    scores, fold_rows, choice_text = {}, {}, {}
    for name in SCORE_NAMES:
        if name not in choices:
            scores[name], choice_text[name] = candidates[(name, None)], ""
    for row, chosen in choices.items():
        if len(set(chosen)) == 1:
            scores[row] = candidates[chosen[0]]
            choice_text[row] = (f"p={chosen[0][1]:g}" if row in NORMALISED else _label(chosen[0]))
        else:
            values = torch.empty(n, dtype=torch.float64)
            for f, key in enumerate(chosen):
                values[fold_of == f] = candidates[key][fold_of == f]
            scores[row], fold_rows[row] = values, fold_of
            shown = [f"p={k[1]:g}" if row in NORMALISED else _label(k) for k in chosen]
            choice_text[row] = "per fold: " + ", ".join(shown)
    table = selective_table(scores, correct, ci=ci, n_boot=n_boot, seed=seed, baseline="msp", folds=fold_rows)
    table["choice"] = pd.Series(choice_text)
    normalised = table.loc[list(NORMALISED)]
    table.attrs.update(msp_ranks_worse=bool((normalised["aurc_vs_msp_hi"] < 0).any()),
                       accuracy=float(correct.double().mean()), n=int(n), n_classes=int(n_classes), folds=folds,
                       seed=seed, ci=ci)
    return table


def softmax_response_note(table: pd.DataFrame) -> str:
    """One sentence from a `compare_confidence_scores` table: whether the softmax response ranks the rows worse
    than the best normalised score (lower AURC beyond the paired interval), as label smoothing makes it do (Xia
    et al., ICLR 2025), with the paired difference and its interval.

    Parameters
    ----------
    table : pandas.DataFrame
        A `compare_confidence_scores` table.

    Returns
    -------
    str

    Examples
    --------
    >>> t = pd.DataFrame({"aurc": [0.05, 0.04, 0.045], "aurc_vs_msp": [0.0, -0.01, -0.005],
    ...                   "aurc_vs_msp_lo": [0.0, -0.015, -0.01], "aurc_vs_msp_hi": [0.0, -0.005, 0.001],
    ...                   "choice": ["", "p=2", "p=3"]}, index=["msp", "pnorm", "pnorm_softmax"])
    >>> print(softmax_response_note(t))  # doctest: +NORMALIZE_WHITESPACE
    the softmax response ranks worse than pnorm (p=2): AURC 0.0500 vs 0.0400, difference -0.0100 [-0.0150,
    -0.0050] (paired); rank by pnorm (label smoothing is known to do this, Xia et al. 2025)
    """
    best = min(NORMALISED, key=lambda name: table.loc[name, "aurc"])
    row = table.loc[best]
    level = table.attrs.get("ci")
    interval = f"[{row['aurc_vs_msp_lo']:.4f}, {row['aurc_vs_msp_hi']:.4f}]"
    said = f"{best} ({row['choice']})" if row["choice"] else best
    numbers_ = (f"AURC {table.loc['msp', 'aurc']:.4f} vs {row['aurc']:.4f}, difference {row['aurc_vs_msp']:.4f} "
                f"{interval} ({f'{level:.0%} ' if level else ''}paired)")
    if row["aurc_vs_msp_hi"] < 0:
        return (f"the softmax response ranks worse than {said}: {numbers_}; rank by {best} (label smoothing is known "
                "to do this, Xia et al. 2025)")
    if math.isnan(row["aurc_vs_msp_hi"]) or row["aurc_vs_msp_lo"] <= 0:
        return (f"these rows do not show the softmax response ranking worse than the best normalised score, {said} "
                f"(the paired interval holds 0): {numbers_}")
    return f"the softmax response ranks better than the best normalised score, {said}: {numbers_}"
