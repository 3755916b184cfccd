"""Tables and figures of calibration: the bins of a state as a DataFrame, the binned and the smooth reliability
diagram, the risk-coverage plot and the per-epoch history.

Every plot takes a `CalibrationState` or anything holding one per epoch (a `CalibrationCallback`), imports
matplotlib only when it draws, returns the figure, and draws either a figure of its own, or onto a caller's pair of
axes (both with a panel below for the counts or the density), or onto a caller's one axes (the counts or density
then on a labelled right-hand axis). Every colour is in the legend, and the legend sits under the axes, where it
hides no data.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from fastai_ls.calibration.intervals import bootstrap_histograms, check_ci, check_seed, percentile_intervals
from fastai_ls.calibration.smooth import smooth_curve, smooth_ece
from fastai_ls.calibration.state import CalibrationState

if TYPE_CHECKING:  # matplotlib is imported only when a plot is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["BIN_COLUMNS", "bin_frame", "plot_reliability", "plot_smooth_reliability", "plot_risk_coverage",
           "plot_history"]

BIN_COLUMNS = ("lo", "hi", "count", "confidence", "accuracy", "gap", "accuracy_lo", "accuracy_hi")
_ACCURACY, _OVER, _UNDER, _COUNT = "tab:blue", "tab:red", "tab:orange", "dimgrey"


def bin_frame(state: CalibrationState, ci: float = 0.95) -> pd.DataFrame:
    """The equal-width bins of a state as a DataFrame: lo, hi, count, confidence, accuracy, gap = confidence -
    accuracy, and accuracy_lo/accuracy_hi, the Wilson interval of the accuracy at level `ci`.

    Parameters
    ----------
    state : CalibrationState
        The counters.
    ci : float
        Level of the per-bin accuracy intervals.
    """
    table = state.bin_table(ci)
    return pd.DataFrame({name: table[name].numpy() for name in BIN_COLUMNS})


def _as_state(source, epoch: int = -1) -> CalibrationState:
    """A state, or the state of `epoch` of anything that keeps one per epoch (a `CalibrationCallback`)."""
    return source if isinstance(source, CalibrationState) else source.state_of(epoch)


def _axes(ax, panel_label: str) -> tuple[Figure, Axes, Axes, bool]:
    """The figure, the main axes and the axes for counts or density: a panel below on a new figure or on the
    caller's pair of axes, or a right-hand axis labelled `panel_label` on the caller's one axes (then True)."""
    import matplotlib.pyplot as plt

    if ax is None or isinstance(ax, (tuple, list)):
        if ax is None:
            fig, (ax, low) = plt.subplots(2, 1, figsize=(5.5, 7.2), sharex=True,
                                          gridspec_kw={"height_ratios": [3, 1]})
        else:
            if len(ax) != 2:
                raise ValueError(f"ax must be one Axes, or a pair (diagram, panel below), got {len(ax)} axes")
            (ax, low), fig = ax, ax[0].figure
        low.set_ylabel(panel_label)
        low.set_xlabel("confidence (top-label probability)")
        return fig, ax, low, False
    low = ax.twinx()
    low.set_ylabel(panel_label, color=_COUNT, loc="bottom")
    low.tick_params(axis="y", colors=_COUNT)
    ax.set_xlabel("confidence (top-label probability)")
    return ax.figure, ax, low, True


def _overlay_scale(low: Axes, top: float) -> None:
    """Counts or density on the bottom quarter of the caller's axes, with ticks only where they are."""
    from matplotlib.ticker import MaxNLocator

    top = max(top, 1e-12)
    low.set_ylim(0, 4 * top)
    low.set_yticks([v for v in MaxNLocator(3).tick_values(0, top) if v <= top * 1.001])


def _legend(fig: Figure, ax: Axes, low: Axes, overlay: bool, handles: list) -> None:
    """The legend under the axes (under the lower panel on a figure of our own)."""
    under = ax if overlay else low
    under.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16 if overlay else -0.5), ncol=2,
                 fontsize="small", frameon=False, handlelength=1.8, columnspacing=1.0)
    if not overlay and len(fig.axes) == 2:  # a figure of our own; a caller's grid is the caller's to lay out
        fig.tight_layout()


def plot_reliability(
    source,
    ax: Axes | None = None,
    title: str | None = None,
    epoch: int = -1,
    ci: float = 0.95,
) -> Figure:
    """Binned reliability diagram: per equal-width bin, the accuracy (bar) with its Wilson interval, the mean
    confidence (black tick), the gap between them coloured by its direction, and the number of rows.

    Parameters
    ----------
    source : CalibrationState or CalibrationCallback
        A state, or a callback (then `epoch` picks the state).
    ax : matplotlib Axes or pair of Axes, optional
        None makes a figure with the counts in a panel below; a pair (diagram, panel) draws the same onto the
        caller's axes (as `fastai-ls demo` does); one Axes gets the counts as an outline on a labelled right-hand
        axis.
    title : str, optional
        Shown before the ECE: "<title>: ECE x.xx%".
    epoch : int
        The callback's epoch (default the last).
    ci : float
        Level of the per-bin accuracy intervals.

    Examples
    --------
    >>> fig = plot_reliability(cb, title='LS 0.1')  # or plot_reliability(cb.state, ax=axes[0]) # doctest: +SKIP
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    check_ci(ci)
    state = _as_state(source, epoch)
    table = bin_frame(state, ci)
    fig, ax, low, overlay = _axes(ax, "rows in bin")
    filled = table[table["count"] > 0]
    width = (table.hi - table.lo).to_numpy()[0]
    centre = ((filled.lo + filled.hi) / 2).to_numpy()
    acc, conf = filled.accuracy.to_numpy(), filled.confidence.to_numpy()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.bar(centre, acc, width=width, color=_ACCURACY, edgecolor="white", lw=0.5, zorder=2)
    # The gap as a narrower box from accuracy to confidence, opaque, so it never tints the accuracy bar: where the
    # model is under-confident it lies inside the bar, whose top still shows on both sides.
    over = conf > acc
    for mask, colour, hatch in ((over, _OVER, "//"), (~over, _UNDER, "\\\\")):
        if mask.any():
            ax.bar(centre[mask], (conf - acc)[mask], bottom=acc[mask], width=0.5 * width, color="white",
                   edgecolor=colour, hatch=hatch, lw=1, zorder=3)
    ax.hlines(conf, centre - width / 2, centre + width / 2, color="black", lw=2, zorder=4)
    lo, hi = filled.accuracy_lo.to_numpy(), filled.accuracy_hi.to_numpy()
    # Wilson's interval holds the estimate; the clip only removes rounding below 0.
    ax.errorbar(centre + 0.3 * width, acc, yerr=np.clip([acc - lo, hi - acc], 0, None), fmt="none", ecolor="black",
                elinewidth=1, capsize=2, zorder=5)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="accuracy")
    ece = f"ECE {100 * state.ece('l1'):.2f}%"
    ax.set_title(ece if title is None else f"{title}: {ece}")

    counts = table["count"].to_numpy()
    edges = np.r_[table.lo.to_numpy(), 1.0]
    if overlay:  # an outline on the bottom quarter: a filled overlay would tint the bars
        low.stairs(counts, edges, color=_COUNT, lw=1.2)
        _overlay_scale(low, float(counts.max()))
    else:
        bars = low.bar(centre, filled["count"], width=width, color=_COUNT, edgecolor="white", lw=0.5)
        low.bar_label(bars, labels=[f"{c:.0f}" for c in filled["count"]], fontsize=6, padding=1)
        low.set_ylim(0, 1.25 * max(float(counts.max()), 1.0))
    handles = [Patch(color=_ACCURACY, label="accuracy (bar top)"),
               Line2D([], [], color="black", lw=2, label="mean confidence"),
               Patch(facecolor="white", edgecolor=_OVER, hatch="//", label="gap: over-confident"),
               Patch(facecolor="white", edgecolor=_UNDER, hatch="\\\\", label="gap: under-confident"),
               Line2D([], [], color="black", lw=1, marker="_", markersize=6, label=f"{ci:.0%} interval of accuracy"),
               Line2D([], [], color="grey", ls="--", lw=1, label="perfect calibration"),
               Line2D([], [], color=_COUNT, lw=1.2 if overlay else 6,
                      label="rows in bin (right axis)" if overlay else "rows in bin (panel)")]
    _legend(fig, ax, low, overlay, handles)
    return fig


def plot_smooth_reliability(
    source,
    ax: Axes | None = None,
    title: str | None = None,
    epoch: int = -1,
    ci: float | None = 0.95,
    n_boot: int = 1000,
    seed: int | None = 0,
) -> Figure:
    """Smooth reliability diagram (Błasiok & Nakkiran 2024, drawn as relplot draws it): the kernel-smoothed accuracy
    against confidence at the smooth ECE's bandwidth, its bootstrap band, and the density of the confidences.
    The title gives smooth ECE with its percentile bootstrap interval.

    Parameters
    ----------
    source : CalibrationState or CalibrationCallback
        A state, or a callback (then `epoch` picks the state).
    ax : matplotlib Axes or pair of Axes, optional
        None makes a figure with the density in a panel below; a pair (diagram, panel) draws the same onto the
        caller's axes; one Axes gets the density on a labelled right-hand axis.
    title : str, optional
        Shown before the smooth ECE.
    epoch : int
        The callback's epoch (default the last).
    ci : float or None
        Level of the band and of the smooth ECE's interval; None for neither. They resample the fine cells split at
        the state's bin edges, so they need `n_fine >= n_bins`.
    n_boot : int
        Bootstrap replicates (each keeps the point estimate's bandwidth, as relplot's band does).
    seed : int, optional
        Seed of the bootstrap.

    Examples
    --------
    >>> fig = plot_smooth_reliability(cb, title='LS 0.1')  # doctest: +SKIP
    """
    from matplotlib.collections import LineCollection, PolyCollection
    from matplotlib.colors import to_rgba
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if ci is not None:
        check_ci(ci, n_boot)
    state = _as_state(source, epoch)
    bins, fine = state.bins.detach().cpu(), state.fine.detach().cpu()
    if not float(bins[:, 0].sum()) > 0:
        raise ValueError("no rows counted: nothing to draw")
    if ci is not None and state.n_fine < state.n_bins:
        raise ValueError(f"the smooth diagram's band and interval resample the fine cells split at the bin edges, so "
                         f"they need n_fine >= n_bins, got n_fine={state.n_fine} < n_bins={state.n_bins}: draw it "
                         f"without them (plot_smooth_reliability(..., ci=None)), or count with n_fine >= n_bins")
    value, sigma = (float(v) for v in smooth_ece(fine))
    curve = smooth_curve(fine, sigma)
    t, accuracy, density = curve["t"].numpy(), curve["accuracy"].numpy(), curve["density"].numpy()

    fig, ax, low, overlay = _axes(ax, "density")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    # Where almost no confidence falls the curve is extrapolation: the line, and the band with it, fade (and the
    # line thins) with the density, as relplot draws the line. A band cut off at a density threshold would start
    # with a sharp edge that says nothing about the data.
    # The DCT's rounding leaves the density a few 1e-15 below 0 where no confidence falls: that is 0.
    share = np.clip(density / density.max(), 0, None)
    fade = np.clip(3 * share, 0, 1)
    text = f"smECE {value:.3f}"
    if ci is not None:
        _, rep_fine, cells = bootstrap_histograms(bins, fine, n_boot, seed)
        band = smooth_curve(rep_fine, sigma, cells, fine.shape[0])["accuracy"]
        q = torch.tensor([(1 - ci) / 2, (1 + ci) / 2], dtype=band.dtype)
        band_lo, band_hi = torch.quantile(band, q, dim=0).numpy()
        smece = smooth_ece(rep_fine, cells, fine.shape[0])[0]
        value_lo, value_hi = percentile_intervals({"smece": smece}, ci)["smece"]
        text += f" [{value_lo:.3f}, {value_hi:.3f}]"
        # One quadrilateral per step of t, each as opaque as the line there (at most the band's 0.2).
        steps = np.flatnonzero(fade[:-1] > 0)
        quads = np.stack([np.stack([t[steps], band_lo[steps]], 1), np.stack([t[steps + 1], band_lo[steps + 1]], 1),
                          np.stack([t[steps + 1], band_hi[steps + 1]], 1), np.stack([t[steps], band_hi[steps]], 1)], 1)
        band_colours = np.tile(to_rgba(_OVER), (len(steps), 1))
        band_colours[:, 3] = 0.2 * fade[steps]
        ax.add_collection(PolyCollection(quads, facecolors=band_colours, linewidths=0, antialiaseds=False, zorder=2))
    points = np.stack([t, accuracy], 1)
    colours = np.tile(to_rgba(_OVER), (len(t) - 1, 1))
    colours[:, 3] = fade[:-1]
    ax.add_collection(LineCollection(np.stack([points[:-1], points[1:]], 1), linewidths=0.5 + 3.5 * np.sqrt(share[:-1]),
                                     colors=colours, capstyle="round", zorder=3))
    ax.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="accuracy (kernel-smoothed)")
    ax.set_title(text if title is None else f"{title}\n{text}")
    if overlay:
        low.plot(t, density, color=_COUNT, lw=1.2)
        _overlay_scale(low, float(density.max()))
    else:
        low.fill_between(t, 0, density, color=_COUNT, lw=0)
        low.set_ylim(0, 1.1 * float(density.max()))
    handles = [Line2D([], [], color=_OVER, lw=2.5, label="smoothed accuracy\n(bolder where more rows)")]
    if ci is not None:
        handles.append(Patch(color=_OVER, alpha=0.2, label=f"{ci:.0%} bootstrap band\n(fades where fewer rows)"))
    handles += [Line2D([], [], color="grey", ls="--", lw=1, label="perfect calibration"),
               Line2D([], [], color=_COUNT, lw=1.2 if overlay else 6,
                      label="confidence density\n(right axis)" if overlay else "confidence density (panel)"),
               Line2D([], [], lw=0, label=f"kernel bandwidth {sigma:.3f}")]
    _legend(fig, ax, low, overlay, handles)
    return fig


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

    state = _as_state(source, epoch)
    curve = {k: v.numpy() for k, v in state.risk_coverage().items()}
    metrics = state.metrics()
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 5))
    else:
        fig = ax.figure
    coverage = np.r_[0.0, curve["coverage"]]
    error_rate = 1 - metrics["accuracy"]
    best = np.clip(coverage - metrics["accuracy"], 0, None) / np.maximum(coverage, 1e-12)
    ax.plot(coverage, np.r_[curve["risk"][0], curve["risk"]], color=_ACCURACY, lw=2,
            label=f"selective risk: errors / accepted (area = AURC {metrics['aurc']:.4f})")
    ax.plot(coverage, np.r_[0.0, curve["generalized_risk"]], color=_UNDER, lw=2, ls="-.",
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


def plot_history(source) -> Figure:
    """ECE, NLL and accuracy over epochs, with their intervals where the history has them, from a
    `CalibrationCallback` or its `history` DataFrame.

    Parameters
    ----------
    source : CalibrationCallback or DataFrame
        The callback, or a history with columns epoch, ece, nll, accuracy (and optionally `<name>_lo`/`_hi`:
        drawn as a band, or as an error bar where only one epoch has one). A `CalibrationState`, one pass, is a
        TypeError: `plot_reliability` draws it.

    Examples
    --------
    >>> fig = plot_history(cb)  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if isinstance(source, pd.DataFrame):
        history = source
    elif isinstance(getattr(source, "history", None), pd.DataFrame):
        history = source.history
    else:
        hint = ": it is one validation pass; plot_reliability(state) draws it" \
            if isinstance(source, CalibrationState) else ""
        raise TypeError(f"plot_history takes a CalibrationCallback or its history DataFrame (one row per epoch), got "
                        f"{type(source).__name__}{hint}")
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, column, label in zip(axes, ("ece", "nll", "accuracy"), ("ECE", "NLL (nats)", "accuracy")):
        line, = ax.plot(history["epoch"], history[column], marker="o", label="estimate")
        lo, hi = history.get(f"{column}_lo"), history.get(f"{column}_hi")
        known = None if lo is None or hi is None else history[lo.notna() & hi.notna()]
        if known is not None and len(known) > 1:
            ax.fill_between(history["epoch"], lo, hi, alpha=0.25, lw=0, label="confidence interval")
        elif known is not None and len(known) == 1:  # a band over one epoch has no width: an error bar instead
            estimate = known[column].to_numpy()
            below, above = estimate - known[f"{column}_lo"].to_numpy(), known[f"{column}_hi"].to_numpy() - estimate
            ax.errorbar(known["epoch"], estimate, yerr=np.clip([below, above], 0, None), fmt="none",
                        ecolor=line.get_color(), capsize=4, label="confidence interval")
        if known is not None and len(known):
            ax.legend(fontsize="small")
        ax.set(xlabel="epoch", title=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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
