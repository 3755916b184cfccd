"""Confidence intervals of calibration metrics, from a state's histograms: no row is kept.

A sample-level bootstrap replicate draws n rows with replacement. Rows are exchangeable within a (cell, correct or
not) category, so a replicate is one multinomial draw of n over those categories, and every metric of the replicate
is computed from its counts by the same formula as the point estimate (`metrics.top_label_metrics`), for all
replicates at once. The categories are the cells of the fine grid, split where an equal-width bin edge falls inside
one (`joint_cells` recovers those splits exactly from the two histograms), so the bootstrap ECE uses exactly the
bins of the point estimate. What the histograms cannot give is each row's own confidence: a resampled row carries
the mean confidence of its cell, an error of at most the cell width 1/K in any confidence-weighted sum.

Percentile intervals (Efron & Tibshirani 1993) are reported for the histogram metrics; NLL and Brier, means of
per-row values whose squares the state also sums, get the normal interval mean +- z * standard error.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from statistics import NormalDist

import numpy as np
import torch
from torch import Tensor

from fastai_ls.calibration.metrics import TOP_LABEL_NAMES, top_label_metrics
from fastai_ls.calibration.threads import one_thread
from fastai_ls.validation import check_interval_grid, check_seed

__all__ = ["BOOTSTRAP_NAMES", "MAX_ROWS", "joint_cells", "bootstrap_histograms", "bootstrap_metrics",
           "percentile_intervals",
           "normal_interval", "wilson_interval"]

# The metrics that get a percentile bootstrap interval: every metric the two histograms determine.
BOOTSTRAP_NAMES = TOP_LABEL_NAMES


def _z(ci: float) -> float:
    return NormalDist().inv_cdf((1 + ci) / 2)


def joint_cells(bins: Tensor, fine: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The common refinement of the equal-width bins `(M, 3)` and the fine cells `(K, 3)`, K >= M.

    A fine cell with a bin edge strictly inside it is split in two; its lower part is everything in the bins up to
    that edge minus everything in the fine cells before it, which both histograms give exactly. Returns the
    refined counters `(J, 3)` in increasing confidence and, per refined cell, its fine cell and its bin.

    Parameters
    ----------
    bins : Tensor
        `(M, 3)` float64 counters per equal-width bin: count, sum of confidence, number correct.
    fine : Tensor
        `(K, 3)` the same counters on the fine grid.

    Examples
    --------
    >>> bins = torch.tensor([[1., .2, 0.], [2., 1.5, 2.]])  # bins (0, 1/2] and (1/2, 1]
    >>> fine = torch.tensor([[1., .2, 0.], [1., .6, 1.], [1., .9, 1.]])  # cells of 1/3: the middle one is split
    >>> cells, fine_of, bin_of = joint_cells(bins, fine)
    >>> cells[:, 0].tolist(), fine_of.tolist(), bin_of.tolist()
    ([1.0, 0.0, 1.0, 1.0], [0, 1, 1, 2], [0, 0, 1, 1])
    """
    n_bins, n_cells = bins.shape[0], fine.shape[0]
    check_interval_grid(n_bins, n_cells)
    # Bin m = ((m)/M, (m+1)/M], cell j = (j/K, (j+1)/K] (0-based); edge m/M lies strictly inside cell m*K // M
    # unless m*K is a multiple of M. Integer arithmetic: no rounding decides which cells are split.
    split_edges = [m for m in range(1, n_bins) if (m * n_cells) % n_bins]
    split_cells = torch.tensor([m * n_cells // n_bins for m in split_edges], dtype=torch.long)
    in_bins_below = bins.cumsum(0)[torch.tensor(split_edges, dtype=torch.long) - 1]
    lower = in_bins_below - (fine.cumsum(0) - fine)[split_cells]
    whole = fine[split_cells]
    # Weighted counts are not whole numbers, and the difference of the two sums leaves a rounding error (up to about
    # K float64 epsilons of all the rows) where a part is empty: within it, the part is empty. Else it would be a
    # bootstrap category of its own, and weights of 0.1 drew other replicates than weights of 1.
    noise = n_cells * torch.finfo(torch.float64).eps * float(bins[:, 0].sum())
    lower = torch.where(lower.abs() <= noise, 0.0, lower)
    lower = torch.where((whole - lower).abs() <= noise, whole, lower)
    # Float sums can leave a split a rounding error outside its cell: keep 0 <= correct <= count <= the cell's.
    lower = torch.minimum(lower.clamp_min(0), whole)
    lower[:, 2] = torch.minimum(lower[:, 2], lower[:, 0])
    upper = whole - lower
    upper[:, 2] = torch.minimum(upper[:, 2].clamp_min(0), upper[:, 0])

    cells, fine_of = fine.clone(), torch.arange(n_cells)
    cells[split_cells] = lower
    # Each upper part goes right after its cell's lower part.
    position = torch.arange(n_cells) + torch.bincount(split_cells + 1, minlength=n_cells + 1)[:n_cells].cumsum(0)
    refined = fine.new_zeros(n_cells + len(split_edges), 3)
    refined_fine_of = torch.empty(len(refined), dtype=torch.long)
    refined[position], refined_fine_of[position] = cells, fine_of
    upper_position = position[split_cells] + 1
    refined[upper_position], refined_fine_of[upper_position] = upper, split_cells
    # Bin of each refined cell: the bin holding its lower end, plus one for the upper part of a split cell.
    bin_of = refined_fine_of * n_bins // n_cells
    bin_of[upper_position] += 1
    return refined, refined_fine_of, bin_of


# Replicates are drawn and summarised at most this many at a time, so that a bootstrap's memory stays bounded (about
# 130 MB at 1000 fine cells) whatever `n_boot`: all at once, 10,000 replicates took 0.7 GB and 100,000 would take
# 7 GB. Draws made in chunks from one generator are the draws made at once, so the chunk size changes no interval.
CHUNK = 1000
# ... and at most this many replicate cells at a time (replicates times the cells of the fine grid, or of the
# refined cells, whichever is more): a fine grid of 200,000 cells took 8.3 GB in chunks of 1000 replicates. It
# leaves the chunk at CHUNK up to 1100 cells (the default 1000 fine cells split by up to 100 bins).
CHUNK_CELLS = 1_100_000
# A replicate draws at most this many rows (the multinomial sampler takes int64 counts; a count above 2**53 cannot
# be told from its neighbours in float64): weights of 1e19 per row were an OverflowError.
MAX_ROWS = 2**53


def _chunk_size(n_cells: int) -> int:
    """How many replicates of `n_cells` cells each one chunk holds: CHUNK, or fewer for a large grid (at least 1)."""
    return max(1, min(CHUNK, CHUNK_CELLS // max(n_cells, 1)))


def _resample(cells: Tensor, n_boot: int, seed: int | None,
              rng: np.random.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Replicate counts `(n_boot, J)` of rows and of correct rows: one multinomial draw of n (rounded; weighted
    rows are drawn in proportion to their weight) over the (cell, correct or not) categories, from `rng` (default:
    a new generator seeded with `seed`)."""
    count, correct = cells[:, 0].numpy(), cells[:, 2].numpy()
    weights = np.concatenate([correct, np.clip(count - correct, 0, None)])
    # Empty categories cost a binomial draw each: leave them out. Weighted counts are not whole numbers, and where
    # every row of a split cell is correct, its count and correct parts differ by their sums' rounding (about
    # 1e-13 rows): such a category is empty too, else weights of 0.1 drew other replicates than weights of 1.
    noise = len(weights) * np.finfo(np.float64).eps * float(weights.sum())
    used = np.flatnonzero(weights > noise)
    n_rows = int(round(float(weights.sum())))
    rng = np.random.default_rng(seed) if rng is None else rng
    draws = rng.multinomial(n_rows, weights[used] / weights[used].sum(), size=n_boot)
    full = np.zeros((n_boot, weights.shape[0]))
    full[:, used] = draws
    n_joint = cells.shape[0]
    rep_correct = torch.from_numpy(np.ascontiguousarray(full[:, :n_joint]))
    return rep_correct + torch.from_numpy(np.ascontiguousarray(full[:, n_joint:])), rep_correct


def bootstrap_histograms(bins: Tensor, fine: Tensor, n_boot: int = 1000,
                         seed: int | None = 0) -> tuple[Tensor, Tensor, Tensor]:
    """`n_boot` bootstrap replicates of the histograms `bins` `(M, 3)` and `fine` `(K, 3)` of the same rows:
    `(n_boot, M, 3)` bins and `(n_boot, K', 3)` fine cells, float64, of which only the K' cells with rows in `fine`
    are kept (no replicate can fill another); the third tensor gives their indices. The same `seed` gives the same
    replicates (numpy's PCG64 generator). All replicates are held at once (about 70 kB each at 1000 cells); for
    metrics of many replicates, `bootstrap_metrics` holds only a chunk of them at a time.

    Parameters
    ----------
    bins, fine : Tensor
        `(M, 3)` and `(K, 3)` float64 counters (count, sum of confidence, number correct) of the same rows.
    n_boot : int
        Replicates.
    seed : int, optional
        Seed of the generator; None draws a fresh one.
    """
    check_seed(seed)
    with one_thread():
        chunks = list(_replicate_chunks(bins, fine, n_boot, seed))
    return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks]), chunks[0][2]


def _replicate_chunks(bins: Tensor, fine: Tensor, n_boot: int,
                      seed: int | None) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """The replicates of `bootstrap_histograms`, `_chunk_size` at a time (run it under `one_thread`)."""
    n_rows = float(bins[:, 0].sum())
    if not 0 <= n_rows <= MAX_ROWS:
        raise ValueError(f"a bootstrap replicate draws as many rows as the histograms count, at most 2**53, but they "
                         f"count {n_rows:.6g}: pass counts of rows (for weighted rows, scaled to the effective number "
                         "of rows, as `CalibrationState` does)")
    cells, fine_of, bin_of = joint_cells(bins, fine)
    keep = cells[:, 0] > 0
    cells, fine_of, bin_of = cells[keep], fine_of[keep], bin_of[keep]
    used = fine[:, 0] > 0
    # Position of each kept refined cell among the fine cells with rows.
    fine_index = used.nonzero().squeeze(1)
    compact_of = torch.cumsum(used.long(), 0)[fine_of] - 1
    mean_conf = cells[:, 1] / cells[:, 0]
    rng = np.random.default_rng(seed)
    # The metrics of a replicate work on the whole fine grid (smooth ECE's), the draws on the refined cells.
    chunk = _chunk_size(max(len(cells), fine.shape[0] + 1, bins.shape[0]))
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        rep_count, rep_correct = _resample(cells, size, seed, rng)
        # Counters stored channel by channel, (3, size, cells), and seen as (size, cells, 3): each channel the
        # formulas read is then one contiguous block.
        replicates = torch.stack([rep_count, rep_count * mean_conf, rep_correct])
        rep_fine = replicates.new_zeros(3, size, len(fine_index)).index_add_(2, compact_of, replicates)
        rep_bins = replicates.new_zeros(3, size, bins.shape[0]).index_add_(2, bin_of, replicates)
        yield rep_bins.permute(1, 2, 0), rep_fine.permute(1, 2, 0), fine_index


def bootstrap_metrics(bins: Tensor, fine: Tensor, n_boot: int = 1000, seed: int | None = 0) -> dict[str, Tensor]:
    """Every metric of `BOOTSTRAP_NAMES` on `n_boot` bootstrap replicates of the rows behind the histograms
    `bins` `(M, 3)` and `fine` `(K, 3)` (`bootstrap_histograms`): a dict of `(n_boot,)` float64 tensors. The
    replicates are made and summarised a chunk at a time (at most `CHUNK` replicates and `CHUNK_CELLS` replicate
    cells), so memory grows neither with `n_boot` nor with the size of the fine grid.

    Parameters
    ----------
    bins, fine, n_boot, seed
        As for `bootstrap_histograms`.

    Examples
    --------
    >>> bins, fine = torch.tensor([[10., 8., 7.]]), torch.tensor([[10., 8., 7.]])
    >>> bootstrap_metrics(bins, fine, n_boot=500)['accuracy'].shape
    torch.Size([500])
    """
    check_seed(seed)
    # Written into tensors made before any chunk: small results kept from chunk to chunk would pin the memory of
    # each chunk's freed temporaries (glibc's heap), and the process would grow with n_boot after all.
    out = {name: torch.empty(n_boot, dtype=torch.float64) for name in BOOTSTRAP_NAMES}
    start = 0
    with one_thread():
        for rep_bins, rep_fine, fine_index in _replicate_chunks(bins, fine, n_boot, seed):
            for name, values in top_label_metrics(rep_bins, rep_fine, fine_index, fine.shape[0]).items():
                out[name][start:start + len(values)] = values
            start += rep_bins.shape[0]
    return out


def percentile_intervals(replicates: dict[str, Tensor], ci: float) -> dict[str, tuple[float, float]]:
    """The (1 - ci) / 2 and (1 + ci) / 2 quantiles of each metric's replicates (linear interpolation).

    Parameters
    ----------
    replicates : dict
        Per metric, a 1-D tensor of bootstrap replicates.
    ci : float
        The confidence level.
    """
    q = torch.tensor([(1 - ci) / 2, (1 + ci) / 2], dtype=torch.float64)
    return {name: tuple(float(v) for v in torch.nanquantile(values, q)) for name, values in replicates.items()}


def normal_interval(mean: float, standard_error: float, ci: float, low: float = -math.inf,
                    high: float = math.inf) -> tuple[float, float]:
    """mean -+ z * standard_error, z the normal quantile of (1 + ci) / 2, clipped to the metric's range [low, high]
    (on few rows the symmetric interval of a skewed metric such as NLL reaches below 0, where no value can be).

    Parameters
    ----------
    mean, standard_error : float
        The estimate and its standard error.
    ci : float
        The confidence level.
    low, high : float
        The range of the metric (default: unbounded).

    Examples
    --------
    >>> [round(v, 3) for v in normal_interval(1.0, 0.1, 0.95)]
    [0.804, 1.196]
    >>> [round(v, 3) for v in normal_interval(0.1, 0.1, 0.95, low=0.0)]
    [0.0, 0.296]
    """
    half = _z(ci) * standard_error
    return max(mean - half, low), min(mean + half, high)


def wilson_interval(correct: Tensor, count: Tensor, ci: float) -> tuple[Tensor, Tensor]:
    """Wilson's score interval (1927) of a proportion correct / count, elementwise; NaN where count = 0. Unlike
    p -+ z sqrt(p (1 - p) / n), it stays inside [0, 1] and is not empty when p is 0 or 1, as it is in the
    reliability diagram's small bins.

    Parameters
    ----------
    correct, count : Tensor
        Successes and trials, elementwise (float; weighted counts are taken as they are).
    ci : float
        The confidence level.

    Examples
    --------
    >>> [round(float(v), 3) for v in wilson_interval(torch.tensor([0.]), torch.tensor([5.]), 0.95)]
    [0.0, 0.434]
    """
    z = _z(ci)
    n = count.clamp_min(1e-300)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * torch.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    empty = count <= 0
    return (torch.where(empty, math.nan, (centre - half).clamp(0, 1)),
            torch.where(empty, math.nan, (centre + half).clamp(0, 1)))
