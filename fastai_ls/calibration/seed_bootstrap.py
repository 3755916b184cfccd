"""Intervals over images and seeds: metrics of several models, each trained from the same seeds and scored on the
same held-out rows of each seed, averaged over the seeds, with a two-level bootstrap.

A replicate draws as many seeds as there are, with replacement, and, for each seed drawn, that seed's held-out rows
with replacement (a multinomial draw of row counts); each model's replicate value is the mean over the drawn seeds
of its metric on the drawn rows (Davison & Hinkley 1997, §3.8: resampling at both stages, which errs on the wide
side). Every model sees the same draws, so a difference between two models is paired by seed and by row. The
metrics of a replicate come from row-count-weighted histograms, through the state's own binning and formulas."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from fastai_ls.calibration.counters import N_FINE
from fastai_ls.calibration.counting import bin_of
from fastai_ls.calibration.intervals import percentile_intervals
from fastai_ls.calibration.metrics import binned_errors
from fastai_ls.calibration.risk_coverage import aurc
from fastai_ls.calibration.smooth import smooth_ece
from fastai_ls.calibration.threads import one_thread
from fastai_ls.validation import check_ci, check_seed

__all__ = ["SEED_METRICS", "weighted_metrics", "seed_bootstrap"]

# The metrics of a model over seeds, in order.
SEED_METRICS = ("error_rate", "ece", "smece", "nll", "brier", "aurc")
_CHUNK = 256  # replicates whose histograms are held at once: 256 x 1000 fine cells x 3 float64 = 6 MB


def weighted_metrics(scores: Mapping[str, Tensor], weights: Tensor, n_bins: int = 15,
                     n_fine: int = N_FINE) -> dict[str, Tensor]:
    """Each metric of `SEED_METRICS` of the rows behind `scores` counted `weights` times, for each row of
    `weights`: with weights of 1, what `CalibrationState(n_bins=n_bins, n_fine=n_fine)` reports for the
    probabilities the scores came from (top-label ECE over `n_bins` equal-width bins, smooth ECE and AURC over
    `n_fine` cells, error rate, NLL, Brier).

    Parameters
    ----------
    scores : mapping of str to Tensor
        `row_scores` of N rows: 'confidence', 'correct', 'nll', 'brier', each (N,).
    weights : Tensor
        (R, N) non-negative row counts (or weights), one set per replicate.
    n_bins : int, default 15
        Equal-width bins of the ECE.
    n_fine : int, default N_FINE
        Fine cells of smooth ECE and AURC.

    Returns
    -------
    dict of str to Tensor
        (R,) float64 per metric.

    Examples
    --------
    >>> from fastai_ls.calibration.scores import row_scores
    >>> s = row_scores(torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]), torch.tensor([0, 1, 1]))
    >>> round(float(weighted_metrics(s, torch.ones(1, 3))["error_rate"]), 4)
    0.3333
    """
    conf = scores["confidence"].to(torch.float64)
    features = torch.stack([torch.ones_like(conf), conf, scores["correct"].to(torch.float64)], 1)  # (N, 3)
    w = weights.to(torch.float64)
    total = w.sum(1)
    out = {"error_rate": 1 - w @ features[:, 2] / total,
           "nll": w @ scores["nll"].to(torch.float64) / total, "brier": w @ scores["brier"].to(torch.float64) / total}
    coarse = bin_of(conf, n_bins)
    # Only the fine cells that hold rows: no replicate fills another, and empty cells change none of the metrics.
    cells, fine_cell = bin_of(conf, n_fine).unique(sorted=True, return_inverse=True)
    ece, smece, area = [], [], []
    with one_thread():  # small kernels: threads waiting for each other cost more than they share
        for part in w.split(_CHUNK):
            rows = part[:, :, None] * features  # (r, N, 3)
            bins = rows.new_zeros(len(part), n_bins, 3).index_add_(1, coarse, rows)
            fine = rows.new_zeros(len(part), len(cells), 3).index_add_(1, fine_cell, rows)
            ece.append(binned_errors(bins)[0])
            smece.append(smooth_ece(fine, cells, n_fine)[0])
            area.append(aurc(fine))
    out.update(ece=torch.cat(ece), smece=torch.cat(smece), aurc=torch.cat(area))
    return {name: out[name] for name in SEED_METRICS}


def _check_rows(models: Mapping[str, Sequence[Mapping[str, Tensor]]]) -> list[int]:
    """The number of rows of each seed, after a ValueError unless every model has the same seeds with the same
    number of rows."""
    if not models:
        raise ValueError("no models to compare")
    sizes = None
    for name, seeds in models.items():
        these = [len(s["nll"]) for s in seeds]
        if not these or min(these) < 1:
            raise ValueError(f"{name}: every seed needs held-out rows, got {these}")
        if sizes is not None and these != sizes:
            raise ValueError(f"every model must be scored on the same rows of the same seeds: {name} has "
                             f"{these} rows per seed, the first model {sizes}")
        sizes = these
    return sizes


def seed_bootstrap(models: Mapping[str, Sequence[Mapping[str, Tensor]]], baseline: str | None = None,
                   ci: float = 0.95, n_boot: int = 1000, seed: int | None = 0, n_bins: int = 15,
                   n_fine: int = N_FINE) -> dict[tuple[str, str], dict[str, float]]:
    """Each model's metrics averaged over its seeds, with percentile intervals over seeds and rows, and its paired
    difference from `baseline` with the interval of the same replicates.

    Parameters
    ----------
    models : mapping of str to sequence of mappings
        Model name to its `row_scores` per seed; every model's seed k holds the same rows in the same order.
    baseline : str, optional
        The model the differences are taken from (default: the first).
    ci : float, default 0.95
        Confidence level.
    n_boot : int, default 1000
        Replicates.
    seed : int, optional
        Seed of the draws (None: a fresh one).
    n_bins : int, default 15
        Equal-width bins of the ECE.
    n_fine : int, default N_FINE
        Fine cells of smooth ECE and AURC.

    Returns
    -------
    dict
        (model, metric) to estimate, lower, upper, and difference, difference_lower, difference_upper (model minus
        baseline; 0 for the baseline itself).

    Examples
    --------
    >>> out = seed_bootstrap({"ce": ce_scores_per_seed, "ls": ls_scores_per_seed})  # doctest: +SKIP
    >>> out[("ls", "ece")]["difference_upper"] < 0  # doctest: +SKIP
    True
    """
    check_ci(ci, n_boot)
    check_seed(seed)
    sizes = _check_rows(models)
    baseline = next(iter(models)) if baseline is None else baseline
    if baseline not in models:
        raise ValueError(f"baseline {baseline!r} is not one of the models: {', '.join(models)}")
    n_seeds = len(sizes)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_seeds, size=(n_boot, n_seeds))  # the seeds each replicate draws
    draws = {k: torch.from_numpy(rng.multinomial(n, np.full(n, 1 / n), size=int((picks == k).sum())))
             for k, n in enumerate(sizes)}
    where = {k: torch.from_numpy(picks == k) for k in range(n_seeds)}
    ones = {k: torch.ones(1, n) for k, n in enumerate(sizes)}
    point, replicates = {}, {}
    for name, per_seed in models.items():
        values = {m: torch.empty(n_boot, n_seeds, dtype=torch.float64) for m in SEED_METRICS}
        estimates = {m: 0.0 for m in SEED_METRICS}
        for k, scores in enumerate(per_seed):
            for m, v in weighted_metrics(scores, ones[k], n_bins, n_fine).items():
                estimates[m] += float(v) / n_seeds
            for m, v in weighted_metrics(scores, draws[k], n_bins, n_fine).items():
                values[m][where[k]] = v
        point[name] = estimates
        replicates[name] = {m: v.mean(1) for m, v in values.items()}
    out = {}
    for name in models:
        limits = percentile_intervals(replicates[name], ci)
        gaps = percentile_intervals({m: replicates[name][m] - replicates[baseline][m] for m in SEED_METRICS}, ci)
        for m in SEED_METRICS:
            out[(name, m)] = {"estimate": point[name][m], "lower": limits[m][0], "upper": limits[m][1],
                              "difference": point[name][m] - point[baseline][m],
                              "difference_lower": gaps[m][0], "difference_upper": gaps[m][1]}
    return out
