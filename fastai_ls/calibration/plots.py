"""Tables and figures of calibration: the bins of a state as a DataFrame, reliability diagrams, per-epoch history.
Every function takes a `CalibrationState` or anything holding them (a `CalibrationCallback`), imports matplotlib only
when it draws, and returns the figure."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from fastai_ls.calibration.state import CalibrationState

if TYPE_CHECKING:  # matplotlib is imported only when a plot is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["BIN_COLUMNS", "bin_frame", "plot_reliability", "plot_history"]

BIN_COLUMNS = ("lo", "hi", "count", "confidence", "accuracy", "gap")


def bin_frame(state: CalibrationState) -> pd.DataFrame:
    """The equal-width bins of a state as a DataFrame: lo, hi, count, confidence, accuracy, gap = conf - acc."""
    table = state.bin_table()
    return pd.DataFrame({name: table[name].numpy() for name in BIN_COLUMNS})


def _as_state(source, epoch: int = -1) -> CalibrationState:
    """A state, or the state of `epoch` of anything that keeps one per epoch (a `CalibrationCallback`)."""
    return source if isinstance(source, CalibrationState) else source.state_of(epoch)


def plot_reliability(
    source,  # a state, or a callback (then `epoch` picks the state)
    ax: Axes | None = None,  # Axes to draw on; None makes a figure with the histogram on its own axes below
    title: str | None = None,  # shown before the ECE: "<title>: ECE x.xx%"
    epoch: int = -1,  # the callback's epoch
) -> Figure:
    """Reliability diagram: accuracy per bin against the diagonal, the gap shaded, over a confidence histogram.

    >>> fig = plot_reliability(cb, title='LS 0.1')  # or plot_reliability(cb.state, ax=axes[0]) # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    state = _as_state(source, epoch)
    table = bin_frame(state)
    if ax is None:
        fig, (ax, hist_ax) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    else:
        fig, hist_ax = ax.figure, None
    width = table.hi - table.lo
    centre = (table.lo + table.hi) / 2
    filled = table["count"] > 0
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    ax.bar(centre[filled], table.accuracy[filled], width=width[filled], color="tab:blue", edgecolor="black",
           alpha=0.8, label="accuracy")
    # Shaded apart from the accuracy bar, so that over- (gap above) and under-confidence read at a glance.
    ax.bar(centre[filled], table.gap[filled], bottom=table.accuracy[filled], width=width[filled], color="tab:red",
           alpha=0.3, hatch="//", edgecolor="tab:red", label="gap to confidence")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    ece = f"ECE {100 * state.ece('l1'):.2f}%"
    ax.set_title(ece if title is None else f"{title}: {ece}")
    ax.legend(loc="upper left", fontsize="small")
    if hist_ax is None:  # the caller's axes: the histogram as faint bars over the bottom quarter
        hist_ax, alpha = ax.twinx(), 0.3
        hist_ax.set_yticks([])
        hist_ax.set_ylim(0, 4 * max(float(table["count"].max()), 1.0))
        ax.set_xlabel("confidence")
    else:
        alpha = 1.0
        hist_ax.set(ylabel="count", xlabel="confidence")
    hist_ax.bar(centre, table["count"], width=width, color="grey", edgecolor="black", alpha=alpha)
    return fig


def plot_history(source) -> Figure:
    """ECE, NLL and accuracy over epochs, from a `CalibrationCallback` or its `history` DataFrame.

    >>> fig = plot_history(cb)  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    history = source if isinstance(source, pd.DataFrame) else source.history
    fig, axes = plt.subplots(1, 3, figsize=(11, 3))
    for ax, column, label in zip(axes, ("ece", "nll", "accuracy"), ("ECE", "NLL (nats)", "accuracy")):
        ax.plot(history["epoch"], history[column], marker="o")
        ax.set(xlabel="epoch", title=label)
    fig.tight_layout()
    return fig
