"""The smooth reliability diagram of a `CalibrationState` (Błasiok & Nakkiran), with its bootstrap band."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from fastai_ls.calibration.intervals import bootstrap_histograms, percentile_intervals
from fastai_ls.calibration.plots.layout import (
    COUNT,
    OVER,
    as_state,
    axes_for,
    legend_under,
    overlay_scale,
)
from fastai_ls.calibration.smooth import smooth_curve, smooth_ece
from fastai_ls.validation import check_ci

if TYPE_CHECKING:  # matplotlib is imported only when a plot is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_smooth_reliability"]


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
    state = as_state(source, epoch)
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

    fig, ax, low, overlay = axes_for(ax, "density")
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
        band_colours = np.tile(to_rgba(OVER), (len(steps), 1))
        band_colours[:, 3] = 0.2 * fade[steps]
        ax.add_collection(PolyCollection(quads, facecolors=band_colours, linewidths=0, antialiaseds=False, zorder=2))
    points = np.stack([t, accuracy], 1)
    colours = np.tile(to_rgba(OVER), (len(t) - 1, 1))
    colours[:, 3] = fade[:-1]
    ax.add_collection(LineCollection(np.stack([points[:-1], points[1:]], 1), linewidths=0.5 + 3.5 * np.sqrt(share[:-1]),
                                     colors=colours, capstyle="round", zorder=3))
    ax.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="accuracy (kernel-smoothed)")
    ax.set_title(text if title is None else f"{title}\n{text}")
    if overlay:
        low.plot(t, density, color=COUNT, lw=1.2)
        overlay_scale(low, float(density.max()))
    else:
        low.fill_between(t, 0, density, color=COUNT, lw=0)
        low.set_ylim(0, 1.1 * float(density.max()))
    handles = [Line2D([], [], color=OVER, lw=2.5, label="smoothed accuracy\n(bolder where more rows)")]
    if ci is not None:
        handles.append(Patch(color=OVER, alpha=0.2, label=f"{ci:.0%} bootstrap band\n(fades where fewer rows)"))
    handles += [Line2D([], [], color="grey", ls="--", lw=1, label="perfect calibration"),
               Line2D([], [], color=COUNT, lw=1.2 if overlay else 6,
                      label="confidence density\n(right axis)" if overlay else "confidence density (panel)"),
               Line2D([], [], lw=0, label=f"kernel bandwidth {sigma:.3f}")]
    legend_under(fig, ax, low, overlay, handles)
    return fig
