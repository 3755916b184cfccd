"""The per-epoch history of a `CalibrationCallback`: ECE, NLL and accuracy with their intervals."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from fastai_ls.calibration.state import CalibrationState

if TYPE_CHECKING:  # matplotlib is imported only when a plot is drawn
    from matplotlib.figure import Figure

__all__ = ["plot_history"]


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
