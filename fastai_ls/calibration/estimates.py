"""What the counters of a `CalibrationState` estimate: every metric of `METRIC_NAMES`, the per-bin table and the
intervals, read from a copy of the counters taken under the state's lock, in Kish's effective rows for weighted
data; and the consistency check that refuses counters no predictions could have given."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastai_ls.calibration.counters import CounterVector
from fastai_ls.calibration.counting import NLL_FLOOR, SCALAR_NAMES
from fastai_ls.calibration.intervals import (
    BOOTSTRAP_NAMES,
    MAX_ROWS,
    bootstrap_metrics,
    normal_interval,
    percentile_intervals,
    wilson_interval,
)
from fastai_ls.calibration.metrics import binned_errors, max_error, rms_error, top_label_metrics
from fastai_ls.validation import check_ci, check_interval_grid, check_seed

__all__ = ["METRIC_NAMES", "INTERVAL_NAMES", "INTERVAL_COLUMNS", "NORMS", "read_counters", "state_metrics",
           "state_intervals", "state_bin_table", "state_ece"]

NORMS = ("l1", "l2", "max")
# The metrics a state reports, in the order of `CalibrationCallback.history`'s columns (after `epoch`).
METRIC_NAMES = ("n", "n_invalid", "accuracy", "confidence", "ece", "mce", "rmsce", "ece_debiased", "adaptive_ece",
                "smece", "ks_error", "classwise_ece", "overconfidence", "underconfidence", "nll", "nll_se", "brier",
                "brier_se", "aurc", "augrc")
# The metrics with a confidence interval: a percentile bootstrap for those the histograms determine, the normal
# interval for NLL and Brier. Classwise ECE has none: the state keeps no per-row link between its class bins.
INTERVAL_NAMES = tuple(m for m in METRIC_NAMES if m in BOOTSTRAP_NAMES or m in ("nll", "brier"))
INTERVAL_COLUMNS = tuple(f"{m}_{end}" for m in INTERVAL_NAMES for end in ("lo", "hi"))


def read_counters(state: CounterVector) -> tuple[dict[str, float], Tensor, Tensor, CounterVector]:
    """The running sums by name, with `n_eff`, the bins and fine cells in effective rows, and the copy of the
    state they were read from (`_frozen`), on the CPU; a ValueError if no predictions could have given these
    counters.

    Weighted rows count as Kish's effective number of rows n_eff = (sum w)^2 / sum w^2: the histograms are
    scaled by n_eff / sum w, which no ratio of them notices, but the row counts behind the debiased ECE, the
    bootstrap and the Wilson intervals do. n_eff is the number of rows for unweighted rows and 0/1 weights
    (the scale is then exactly 1), and scaling every weight changes neither it nor any metric."""
    state = state._frozen()
    bad = int((~state.data.isfinite()).sum())
    wrong = f"{bad} of them are NaN or infinite (row weights above about 1e150 overflow when squared: only " \
        "their ratios matter, so scale them down)" if bad else None
    s = {name: float(v) for name, v in zip(SCALAR_NAMES, state.scalars.tolist())}
    wrong = wrong or _inconsistency(s, state.bins, state.fine, state.class_bins)
    if wrong:
        # Besides a spoiled `data` vector, what `update(check=False)` (the callback's per-batch path) counts
        # unchecked gives such counters: scores that are not probabilities, e.g. from a loss whose
        # `activation` returns logits.
        raise ValueError(f"these calibration counters cannot come from any predictions: {wrong}; a `data` vector "
                         "must be a state's own (`state.data`), unchanged, and what `update(check=False)` counts "
                         "(as `CalibrationCallback` does) must be probabilities, rows of non-negative values "
                         "summing to 1, not logits (a loss's `activation` must return probabilities)")
    n, weight_sq = s["n"], s["weight_sq"]
    scale = n / weight_sq if n > 0 else 1.0  # exactly 1 for 0/1 weights: then sum w^2 = sum w, term by term
    s["n_eff"] = n * scale
    if s["n_eff"] > MAX_ROWS:
        raise ValueError(f"these calibration counters cannot come from any predictions: their effective number "
                         f"of rows is {s['n_eff']:.6g}, more than 2**53")
    if scale == 1.0:
        return s, state.bins, state.fine, state
    return s, state.bins * scale, state.fine * scale, state


def state_bin_table(state: CounterVector, ci: float) -> dict[str, Tensor]:
    """`CalibrationState.bin_table`."""
    check_ci(ci)
    _, rows, _, frozen = read_counters(state)
    count, conf_sum, correct = frozen.bins.unbind(1)
    nonempty = count > 0
    conf = torch.where(nonempty, conf_sum / count.clamp_min(1e-300), math.nan)
    acc = torch.where(nonempty, correct / count.clamp_min(1e-300), math.nan)
    edges = torch.linspace(0, 1, state.n_bins + 1, dtype=torch.float64)
    acc_lo, acc_hi = wilson_interval(rows[:, 2], rows[:, 0], ci)
    return {"lo": edges[:-1], "hi": edges[1:], "count": count, "confidence": conf, "accuracy": acc,
            "gap": conf - acc, "accuracy_lo": acc_lo, "accuracy_hi": acc_hi}


def state_metrics(state: CounterVector, ci: float | None, n_boot: int, seed: int | None) -> dict[str, float]:
    """`CalibrationState.metrics`."""
    s, bins, fine, frozen = read_counters(state)  # in effective rows: the same ratios as the weighted sums
    n = s["n"]
    out = dict.fromkeys(METRIC_NAMES, math.nan) | {"n": n, "n_invalid": s["n_invalid"]}
    if n > 0:
        top = top_label_metrics(bins, fine)
        out.update({name: float(value) for name, value in top.items()})
        out.update(classwise_ece=_classwise_ece(frozen, n), nll=s["nll"] / n, brier=s["brier"] / n,
                   nll_se=_standard_error(s["nll_sq"], s["nll"], n, s["n_eff"]),
                   brier_se=_standard_error(s["brier_sq"], s["brier"], n, s["n_eff"]))
    if ci is not None:
        for name, (lo, hi) in _intervals(state, ci, n_boot, seed, out, bins, fine).items():
            out[f"{name}_lo"], out[f"{name}_hi"] = lo, hi
    return out


def state_intervals(state: CounterVector, ci: float, n_boot: int,
                    seed: int | None) -> dict[str, tuple[float, float]]:
    """`CalibrationState.intervals`."""
    _, bins, fine, frozen = read_counters(state)
    point = state_metrics(frozen, None, n_boot, seed)  # of the same counters as the bootstrap's
    return _intervals(state, ci, n_boot, seed, point, bins, fine)


def _intervals(state: CounterVector, ci: float, n_boot: int, seed: int | None, point: dict[str, float],
               bins: Tensor, fine: Tensor) -> dict[str, tuple[float, float]]:
    """The intervals from the point estimates and the histograms in effective rows (`read_counters`)."""
    check_ci(ci, n_boot)
    check_seed(seed)
    check_interval_grid(state.n_bins, state.n_fine)
    if not float(bins[:, 0].sum()) >= 1:
        return dict.fromkeys(INTERVAL_NAMES, (math.nan, math.nan))
    replicates = bootstrap_metrics(bins, fine, n_boot, seed)
    limits = percentile_intervals(replicates, ci)
    for name, high in (("nll", math.inf), ("brier", 2.0)):  # NLL >= 0; Brier's sum over classes is in [0, 2]
        limits[name] = normal_interval(point[name], point[f"{name}_se"], ci, low=0.0, high=high)
    return {name: limits[name] for name in INTERVAL_NAMES}


def state_ece(state: CounterVector, norm: str) -> float:
    """`CalibrationState.ece`."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    s, bins, _, _ = read_counters(state)
    if s["n"] <= 0:
        return math.nan
    return float({"l1": lambda: binned_errors(bins)[0], "l2": lambda: rms_error(bins),
                  "max": lambda: max_error(bins)}[norm]())


def _classwise_ece(state: CounterVector, n: float) -> float:
    if not state.classwise:
        return math.nan
    per_class = state.class_bins.cpu()  # (C, M, 3)
    return float((per_class[..., 2] - per_class[..., 1]).abs().sum((1,)).mean() / n)


# Per row of weight 1, the most that each running sum can add (NLL is capped at -log(NLL_FLOOR); a row may sum to
# 1 + SUM_ROUNDING, which the bounds leave room for).
_MOST_PER_ROW = {"confidence": 1.01, "correct": 1.0, "nll": -math.log(NLL_FLOOR), "brier": 2.01,
                 "nll_sq": math.log(NLL_FLOOR) ** 2, "brier_sq": 4.05}
_SLACK = 1e-6  # relative: sums of the same values in another order differ by far less


def _inconsistency(s: dict[str, float], bins: Tensor, fine: Tensor, class_bins: Tensor) -> str | None:
    """What makes these counters impossible (None if nothing does): negative counts, sums beyond what the counted
    rows can add, histograms that do not hold the n rows (e.g. a count of 1e300 put into a saved state)."""
    n, tiny = s["n"], 1e-300
    grids = {"bins": bins, "fine cells": fine, "class bins": class_bins.reshape(-1, 3)}
    if min(n, s["weight_sq"], *(float(g.min()) for g in grids.values() if g.numel())) < 0:
        return "a count or a sum of confidences is negative"
    if n > 0 and s["weight_sq"] <= 0:
        return "the squared row weights sum to 0 (weights below about 1e-150 underflow when squared: scale them up)"
    if s["weight_sq"] > n * n * (1 + _SLACK) + tiny:
        return f"the squared row weights sum to {s['weight_sq']:.6g}, more than the weights' sum squared ({n * n:.6g})"
    for name, most in _MOST_PER_ROW.items():
        if s[name] > most * n * (1 + _SLACK) + tiny:
            return f"{name} sums to {s[name]:.6g} over {n:.6g} rows, more than {most:.4g} per row"
    # Every counted row is in one bin, one fine cell and, for each class, one of that class's bins.
    totals = {"bins": bins[:, 0].sum().reshape(1), "fine cells": fine[:, 0].sum().reshape(1),
              "class bins": class_bins[..., 0].sum(1)}
    for name, grid in grids.items():
        far = (totals[name] - n).abs() > _SLACK * n + tiny
        if bool(far.any()):
            return f"the {name} hold {float(totals[name][far][0]):.6g} rows where n is {n:.6g}"
        if bool((grid[:, 1:] > grid[:, :1] * _MOST_PER_ROW["confidence"] + tiny).any()):
            return f"one of the {name} sums more confidence or correct rows than it holds rows"
    return None


def _standard_error(sum_sq: float, total: float, n: float, n_eff: float) -> float:
    """Standard error of a weighted mean from the running sums of the weighted values and squared values, the
    weights' sum `n` and the effective number of rows `n_eff` (NaN for n_eff < 2); for unweighted rows
    n_eff = n, and this is the standard error of a mean."""
    if not n_eff >= 2:
        return math.nan
    mean = total / n
    variance = max(sum_sq / n - mean * mean, 0.0) * n_eff / (n_eff - 1)
    return math.sqrt(variance / n_eff)
