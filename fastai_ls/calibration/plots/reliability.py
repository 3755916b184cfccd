"""The binned reliability diagram of a `CalibrationState` and its bins as a DataFrame."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from fastai_ls.calibration.plots.layout import (
    ACCURACY,
    COUNT,
    OVER,
    UNDER,
    as_state,
    axes_for,
    legend_under,
    overlay_scale,
)
from fastai_ls.calibration.state import CalibrationState
from fastai_ls.validation import check_ci

if TYPE_CHECKING:  # matplotlib is imported only when a plot is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["BIN_COLUMNS", "bin_frame", "plot_reliability"]

BIN_COLUMNS = ("lo", "hi", "count", "confidence", "accuracy", "gap", "accuracy_lo", "accuracy_hi")


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
    state = as_state(source, epoch)
    table = bin_frame(state, ci)
    fig, ax, low, overlay = axes_for(ax, "rows in bin")
    filled = table[table["count"] > 0]
    width = (table.hi - table.lo).to_numpy()[0]
    centre = ((filled.lo + filled.hi) / 2).to_numpy()
    acc, conf = filled.accuracy.to_numpy(), filled.confidence.to_numpy()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.bar(centre, acc, width=width, color=ACCURACY, edgecolor="white", lw=0.5, zorder=2)
    # The gap as a narrower box from accuracy to confidence, opaque, so it never tints the accuracy bar: where the
    # model is under-confident it lies inside the bar, whose top still shows on both sides.
    over = conf > acc
    for mask, colour, hatch in ((over, OVER, "//"), (~over, UNDER, "\\\\")):
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
        low.stairs(counts, edges, color=COUNT, lw=1.2)
        overlay_scale(low, float(counts.max()))
    else:
        bars = low.bar(centre, filled["count"], width=width, color=COUNT, edgecolor="white", lw=0.5)
        low.bar_label(bars, labels=[f"{c:.0f}" for c in filled["count"]], fontsize=6, padding=1)
        low.set_ylim(0, 1.25 * max(float(counts.max()), 1.0))
    handles = [Patch(color=ACCURACY, label="accuracy (bar top)"),
               Line2D([], [], color="black", lw=2, label="mean confidence"),
               Patch(facecolor="white", edgecolor=OVER, hatch="//", label="gap: over-confident"),
               Patch(facecolor="white", edgecolor=UNDER, hatch="\\\\", label="gap: under-confident"),
               Line2D([], [], color="black", lw=1, marker="_", markersize=6, label=f"{ci:.0%} interval of accuracy"),
               Line2D([], [], color="grey", ls="--", lw=1, label="perfect calibration"),
               Line2D([], [], color=COUNT, lw=1.2 if overlay else 6,
                      label="rows in bin (right axis)" if overlay else "rows in bin (panel)")]
    legend_under(fig, ax, low, overlay, handles)
    return fig
