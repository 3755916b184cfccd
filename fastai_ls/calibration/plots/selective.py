"""Selective classification plots: the risk-coverage curve of a `CalibrationState`, and the risk-coverage curves
of confidence scores on held-out logits with their bootstrap bands."""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING

import numpy as np
import torch

from fastai_ls.calibration.plots.layout import (
    ACCURACY,
    UNDER,
    as_state,
)
from fastai_ls.validation import check_ci, check_seed

if TYPE_CHECKING:  # matplotlib is imported only when a plot is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_risk_coverage", "plot_selective"]


def plot_risk_coverage(
    source,
    ax: Axes | None = None,
    title: str | None = None,
    epoch: int = -1,
) -> Figure:
    """Risk-coverage plot: accept the most confident rows first; the selective risk (errors among the accepted,
    whose mean over coverage is AURC) and the generalised risk (accepted errors over all rows: AUGRC), beside the
    best selective risk any ranking could reach at this accuracy.

    Parameters
    ----------
    source : CalibrationState or CalibrationCallback
        A state, or a callback (then `epoch` picks the state).
    ax : matplotlib Axes, optional
        Axes to draw on; None makes a figure.
    title : str, optional
        Shown before AURC and AUGRC.
    epoch : int
        The callback's epoch (default the last).

    Examples
    --------
    >>> fig = plot_risk_coverage(cb)  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    state = as_state(source, epoch)
    curve = {k: v.numpy() for k, v in state.risk_coverage().items()}
    metrics = state.metrics()
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 5))
    else:
        fig = ax.figure
    coverage = np.r_[0.0, curve["coverage"]]
    error_rate = 1 - metrics["accuracy"]
    best = np.clip(coverage - metrics["accuracy"], 0, None) / np.maximum(coverage, 1e-12)
    ax.plot(coverage, np.r_[curve["risk"][0], curve["risk"]], color=ACCURACY, lw=2,
            label=f"selective risk: errors / accepted (area = AURC {metrics['aurc']:.4f})")
    ax.plot(coverage, np.r_[0.0, curve["generalized_risk"]], color=UNDER, lw=2, ls="-.",
            label=f"generalised risk: errors / all rows (area = AUGRC {metrics['augrc']:.4f})")
    ax.plot(coverage, best, color="grey", lw=1, ls=":", label="best selective risk at this accuracy")
    ax.axhline(error_rate, color="grey", lw=0.8, ls="--", label=f"error rate at full coverage ({error_rate:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, max(1.1 * float(curve["risk"].max()), 1.2 * error_rate, 1e-3)),
           xlabel="coverage (share of rows accepted, most confident first)", ylabel="risk")
    text = f"AURC {metrics['aurc']:.4f}, AUGRC {metrics['augrc']:.4f}"
    ax.set_title(text if title is None else f"{title}: {text}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), fontsize="small", frameon=False)
    if len(fig.axes) == 1:
        fig.tight_layout()
    return fig


def plot_selective(
    logits: torch.Tensor | np.ndarray,
    targets: torch.Tensor | np.ndarray,
    scores: list[str] | None = None,
    p: float = 2,
    ci: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
    coverages: int = 100,
) -> Figure:
    """Risk-coverage and generalised risk-coverage curves of confidence scores on held-out logits, one curve per
    score (`fastai_ls.confidence_scores`), each with its percentile bootstrap band: accept the highest-scoring rows
    first; the selective risk (errors among the accepted, whose mean over coverage is AURC) and the generalised risk
    (accepted errors over all rows: AUGRC), exact with ties sharing their errors.

    Parameters
    ----------
    logits : Tensor | np.ndarray
        (N, C) held-out logits.
    targets : Tensor | np.ndarray
        (N,) class ids in [0, C).
    scores : list of str, optional
        Score names (default: all of `SCORE_NAMES`).
    p : float
        The norm of `pnorm` and `pnorm_softmax`.
    ci : float
        Level of the bands.
    n_boot : int
        Bootstrap replicates of the bands.
    seed : int
        Seed of the bootstrap.
    coverages : int
        How many coverages the bands are computed at (evenly spaced in (0, 1]), >= 1.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> fig = plot_selective(logits, targets, scores=["msp", "pnorm"])  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    from fastai_ls.calibration.compare_scores import check_held_out
    from fastai_ls.calibration.confidence_scores import confidence_scores
    from fastai_ls.calibration.selective import expected_errors
    from fastai_ls.calibration.selective_bootstrap import bootstrap_selective

    check_ci(ci, n_boot)
    check_seed(seed)
    if isinstance(coverages, bool) or not isinstance(coverages, numbers.Integral) or coverages < 1:
        raise ValueError(f"coverages must be an int >= 1 (how many coverages the bands are computed at), got "
                         f"{coverages!r}")
    logits, targets = check_held_out(logits, targets)
    values = confidence_scores(logits, scores, p=p)
    correct = logits.argmax(1) == targets
    n = len(correct)
    grid = np.linspace(1 / coverages, 1, coverages)
    replicates = bootstrap_selective(values, correct, n_boot=n_boot, seed=seed, coverages=grid.tolist())
    kept = np.clip(np.ceil(grid * n - 1e-9), 1, n)
    q = [(1 - ci) / 2, (1 + ci) / 2]
    fig, (risk_ax, general_ax) = plt.subplots(1, 2, figsize=(11, 5))
    k = np.arange(1, n + 1)
    colours = plt.get_cmap("tab10")
    for i, (name, s) in enumerate(values.items()):
        e = expected_errors(s, correct).numpy()
        risk_reps = replicates[name]["risk"].numpy()
        band = np.quantile(risk_reps, q, axis=0)
        colour = colours(i % 10)
        risk_ax.plot(k / n, e / k, color=colour, lw=1.5, label=f"{name} (AURC {float(np.mean(e / k)):.4f})")
        risk_ax.fill_between(grid, band[0], band[1], color=colour, alpha=0.2, lw=0)
        general_ax.plot(k / n, e / n, color=colour, lw=1.5, label=f"{name} (AUGRC {float(e.sum()) / n / n:.4f})")
        general_ax.fill_between(grid, band[0] * kept / n, band[1] * kept / n, color=colour, alpha=0.2, lw=0)
    from matplotlib.patches import Patch

    for ax, ylabel, title in ((risk_ax, "selective risk (errors / accepted rows)", "risk-coverage (area: AURC)"),
                              (general_ax, "generalised risk (accepted errors / all rows)",
                               "generalised risk-coverage (area: AUGRC)")):
        ax.set(xlim=(0, 1), xlabel="coverage (share of rows accepted, highest score first)", ylabel=ylabel,
               title=title)
        handles, _ = ax.get_legend_handles_labels()
        handles.append(Patch(color="grey", alpha=0.3, label=f"{ci:.0%} bootstrap band ({n_boot} replicates)"))
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize="small", frameon=False,
                  ncol=2)
    fig.tight_layout()
    return fig
