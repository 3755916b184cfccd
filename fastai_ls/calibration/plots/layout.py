"""What every plot shares: the colours, the state of a source, the axes (a figure of its own with a panel below,
a caller's pair of axes, or a caller's one axes with a right-hand axis), the overlay's scale and the legend under
the axes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastai_ls.calibration.state import CalibrationState

if TYPE_CHECKING:  # matplotlib is imported only when a plot is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["ACCURACY", "OVER", "UNDER", "COUNT", "as_state", "axes_for", "overlay_scale", "legend_under"]

ACCURACY, OVER, UNDER, COUNT = "tab:blue", "tab:red", "tab:orange", "dimgrey"


def as_state(source, epoch: int = -1) -> CalibrationState:
    """A state, or the state of `epoch` of anything that keeps one per epoch (a `CalibrationCallback`)."""
    return source if isinstance(source, CalibrationState) else source.state_of(epoch)


def axes_for(ax, panel_label: str) -> tuple[Figure, Axes, Axes, bool]:
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
    low.set_ylabel(panel_label, color=COUNT, loc="bottom")
    low.tick_params(axis="y", colors=COUNT)
    ax.set_xlabel("confidence (top-label probability)")
    return ax.figure, ax, low, True


def overlay_scale(low: Axes, top: float) -> None:
    """Counts or density on the bottom quarter of the caller's axes, with ticks only where they are."""
    from matplotlib.ticker import MaxNLocator

    top = max(top, 1e-12)
    low.set_ylim(0, 4 * top)
    low.set_yticks([v for v in MaxNLocator(3).tick_values(0, top) if v <= top * 1.001])


def legend_under(fig: Figure, ax: Axes, low: Axes, overlay: bool, handles: list) -> None:
    """The legend under the axes (under the lower panel on a figure of our own)."""
    under = ax if overlay else low
    under.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16 if overlay else -0.5), ncol=2,
                 fontsize="small", frameon=False, handlelength=1.8, columnspacing=1.0)
    if not overlay and len(fig.axes) == 2:  # a figure of our own; a caller's grid is the caller's to lay out
        fig.tight_layout()

