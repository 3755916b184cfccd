"""The figures read without the docs: every colour drawn is in the legend, accuracy, confidence, the direction of the
gap and the count of every bin can be read off, for over- and under-confident models, on a figure of their own and
on a caller's axes side by side (issue 12's misread diagram is a regression test here)."""

from __future__ import annotations

import warnings

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from calibration_data import sample, state_from
from matplotlib.colors import to_rgb
from matplotlib.patches import Rectangle

from fastai_ls.calibration import CalibrationState
from fastai_ls.calibration.plots import (
    bin_frame,
    plot_history,
    plot_reliability,
    plot_risk_coverage,
    plot_smooth_reliability,
)
from fastai_ls.cli.demo import reliability_figure

matplotlib.use("Agg")
WHITE = (1.0, 1.0, 1.0)
MODELS = {"over-confident": "uniform, over-confident", "under-confident": "skewed, under-confident"}


@pytest.fixture(scope="module")
def states():
    return {name: state_from(*sample(case, 359, seed=1)) for name, case in MODELS.items()}


def rgb(colour) -> tuple[float, float, float]:
    return tuple(round(c, 3) for c in to_rgb(colour))


def legends(fig):
    return [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]


def legend_colours(fig) -> set:
    colours = set()
    for legend in legends(fig):
        for handle in legend.legend_handles:
            if hasattr(handle, "get_facecolor") and not hasattr(handle, "get_xdata"):
                colours |= {rgb(handle.get_facecolor()), rgb(handle.get_edgecolor())}
            else:
                colours.add(rgb(handle.get_color()))
    return colours


def drawn_colours(ax) -> set:
    colours = set()
    for patch in ax.patches:
        colours |= {rgb(patch.get_facecolor()), rgb(patch.get_edgecolor())}
    for line in ax.lines:
        colours.add(rgb(line.get_color()))
    for collection in ax.collections:
        colours |= {rgb(c) for c in collection.get_facecolors()} | {rgb(c) for c in collection.get_edgecolors()}
        colours |= {rgb(c) for c in np.atleast_2d(collection.get_colors())} if hasattr(collection, "get_colors") \
            else set()
    return colours - {WHITE}  # the background, and the opaque face that keeps a gap box from tinting a bar


def draw(plot, states, layout):
    """Each model on a figure of its own, both side by side on a caller's axes, or (`fastai-ls demo`'s figures) side
    by side with their panels."""
    if layout == "own figure":
        return [plot(state, title=name) for name, state in states.items()]
    if layout == "demo":
        return [reliability_figure(states, smooth=plot is plot_smooth_reliability)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, (name, state) in zip(axes, states.items()):
        assert plot(state, ax=ax, title=name) is fig
    fig.tight_layout()
    return [fig]


@pytest.mark.slow
@pytest.mark.parametrize("plot, layout", [
    (plot, layout) for plot in (plot_reliability, plot_smooth_reliability, plot_risk_coverage)
    for layout in ("own figure", "side by side", "demo") if not (layout == "demo" and plot is plot_risk_coverage)
])  # the demo draws no risk-coverage figure
def test_every_colour_drawn_is_explained_in_a_legend_and_every_axis_is_labelled(plot, layout, states):
    for fig in draw(plot, states, layout):
        explained = legend_colours(fig)
        for ax in fig.axes:
            assert drawn_colours(ax) <= explained, ax.get_title()
            if ax.get_visible() and (ax.lines or ax.patches or ax.collections):
                assert ax.get_ylabel(), "an axis without a label"
        assert any(ax.get_xlabel() for ax in fig.axes)
        plt.close(fig)


@pytest.mark.parametrize("layout", ["own figure", "side by side"])
def test_the_reliability_diagram_shows_accuracy_confidence_gap_direction_and_count_of_every_bin(layout, states):
    figures = draw(plot_reliability, states, layout)
    axes = [fig.axes[0] for fig in figures] if layout == "own figure" else [figures[0].axes[0], figures[0].axes[1]]
    for ax, state in zip(axes, states.values()):
        table = bin_frame(state)
        filled = table[table["count"] > 0]
        bars = [p for p in ax.patches if isinstance(p, Rectangle) and rgb(p.get_facecolor()) == rgb("tab:blue")]
        width = bars[0].get_width()
        # Accuracy: the blue bar of each bin reaches its accuracy; nothing opaque of another colour covers its top.
        np.testing.assert_allclose(sorted(b.get_height() for b in bars), sorted(filled.accuracy))
        gaps = [p for p in ax.patches if isinstance(p, Rectangle) and p not in bars]
        assert all(g.get_width() < width and rgb(g.get_facecolor()) == WHITE for g in gaps)
        # The gap: from accuracy to confidence, red where over-confident, orange where under-confident.
        for _, row in filled.iterrows():
            centre = (row.lo + row.hi) / 2
            box = [g for g in gaps if abs(g.get_x() + g.get_width() / 2 - centre) < 1e-9]
            assert len(box) == 1
            assert box[0].get_y() == pytest.approx(row.accuracy)
            assert box[0].get_y() + box[0].get_height() == pytest.approx(row.confidence)
            assert rgb(box[0].get_edgecolor()) == rgb("tab:red" if row.confidence > row.accuracy else "tab:orange")
        labels = [t.get_text() for legend in legends(ax.figure) for t in legend.get_texts()]
        assert "gap: over-confident" in labels and "gap: under-confident" in labels
        assert "mean confidence" in labels and "95% interval of accuracy" in labels
        # Count: a labelled panel below (bars with their numbers) or a labelled right-hand axis.
        count_ax = [a for a in ax.figure.axes if a.get_ylabel() == "rows in bin"]
        assert len(count_ax) >= 1
        if layout == "own figure":
            shown = [t.get_text() for t in count_ax[0].texts]
            assert shown == [f"{c:.0f}" for c in filled["count"]]
        else:
            steps = [p for p in count_ax[ax is axes[1]].patches]
            np.testing.assert_allclose(steps[0].get_data().values, table["count"])
    for fig in figures:
        plt.close(fig)


def test_under_confidence_is_drawn_inside_the_bar_without_a_colour_that_is_not_in_the_legend(states):
    # Issue 12: the red gap was drawn over the blue bar, which stopped at the confidence, and a purple band that
    # is not in the legend covered the rest.
    fig = plot_reliability(states["under-confident"])
    ax = fig.axes[0]
    assert all(p.get_alpha() in (None, 1.0) for p in ax.patches)  # no blend of two colours anywhere
    assert drawn_colours(ax) <= legend_colours(fig)
    plt.close(fig)


def test_the_smooth_diagrams_title_gives_smooth_ece_with_the_bootstrap_interval_of_the_metrics(states):
    state = states["over-confident"]
    fig = plot_smooth_reliability(state, n_boot=300, seed=3)
    metrics = state.metrics(ci=0.95, n_boot=300, seed=3)
    assert fig.axes[0].get_title() == f"smECE {metrics['smece']:.3f} [{metrics['smece_lo']:.3f}, " \
                                      f"{metrics['smece_hi']:.3f}]"
    plt.close(fig)


def test_the_risk_coverage_plot_draws_the_curve_of_the_state(states):
    state = states["under-confident"]
    fig = plot_risk_coverage(state)
    curve = state.risk_coverage()
    selective = fig.axes[0].lines[0]
    np.testing.assert_allclose(selective.get_xdata()[1:], curve["coverage"].numpy())
    np.testing.assert_allclose(selective.get_ydata()[1:], curve["risk"].numpy())
    plt.close(fig)


def test_the_smooth_diagram_of_confidences_bunched_near_one_draws_without_a_warning():
    # Regression (found on `fastai-ls demo`'s cross-entropy model): where no confidence falls the smoothed density
    # came out a few 1e-15 below 0, and the line width sqrt(share) warned "invalid value encountered in sqrt".
    g = torch.Generator().manual_seed(0)
    confidence = 0.97 + 0.03 * torch.rand(359, generator=g)
    probs = torch.cat([confidence[:, None], ((1 - confidence) / 9)[:, None].expand(-1, 9)], 1)
    state = CalibrationState(10)
    state.update(probs, (torch.rand(359, generator=g) > 0.985).long())
    with np.errstate(invalid="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plot_smooth_reliability(state, n_boot=50)
    widths = np.concatenate([c.get_linewidths() for c in fig.axes[0].collections if len(c.get_linewidths()) > 1])
    assert np.isfinite(widths).all() and widths.min() >= 0.5
    plt.close(fig)


def panel_layout(fig) -> list[tuple[str, str]]:
    """(y label, kind of what is drawn) of each axes, left to right, top to bottom."""
    axes = sorted(fig.axes, key=lambda ax: (-round(ax.get_position().y0, 2), ax.get_position().x0))
    return [(ax.get_ylabel(), "bars" if ax.patches else "fill" if ax.collections else "lines") for ax in axes]


@pytest.mark.slow
@pytest.mark.parametrize("smooth", [False, True])
def test_the_demo_figure_draws_counts_in_a_panel_below_as_plot_reliability_does(states, smooth):
    # Issue 20: the demo drew counts as an outline on a right-hand axis, cb.plot_reliability() as bars in a panel.
    plot = plot_smooth_reliability if smooth else plot_reliability
    own = [panel_layout(plot(state, n_boot=50) if smooth else plot(state)) for state in states.values()]
    demo = panel_layout(reliability_figure(states, smooth=smooth))
    assert demo == [own[0][0], own[1][0], own[0][1], own[1][1]]  # two diagrams above, their panels below
    plt.close("all")


def one_epoch_history(state, ci=0.95) -> pd.DataFrame:
    return pd.DataFrame([{"epoch": 0, **state.metrics(ci=ci, n_boot=100)}])


def test_plot_history_after_one_epoch_draws_the_interval_its_legend_names(states):
    # Issue 20: after one epoch the legend listed a confidence interval, and the band over one epoch drew nothing.
    history = one_epoch_history(states["over-confident"])
    fig = plot_history(history)
    for ax, column in zip(fig.axes, ("ece", "nll", "accuracy")):
        assert "confidence interval" in [t.get_text() for t in ax.get_legend().get_texts()]
        bars = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
        assert len(bars) == 1
        (segment,) = bars[0].lines[2][0].get_segments()
        np.testing.assert_allclose(segment[:, 1], [history[f"{column}_lo"][0], history[f"{column}_hi"][0]])
    plt.close(fig)
    two = pd.concat([history, history.assign(epoch=1)], ignore_index=True)
    fig = plot_history(two)
    assert all(not ax.containers and ax.collections for ax in fig.axes)  # a band from epoch 0 to 1
    plt.close(fig)


def test_plot_history_without_intervals_has_no_interval_in_its_legend(states):
    fig = plot_history(one_epoch_history(states["over-confident"], ci=None))
    assert all(ax.get_legend() is None and not ax.containers and not ax.collections for ax in fig.axes)
    plt.close(fig)


def test_plot_history_of_a_state_is_a_type_error_saying_what_it_takes(states):
    # Issue 20: plot_history(state) raised AttributeError.
    with pytest.raises(TypeError, match=r"takes a CalibrationCallback or its history DataFrame .* got "
                                        r"CalibrationState: .* plot_reliability\(state\)"):
        plot_history(states["over-confident"])


def band_opacities(fig) -> tuple[np.ndarray, np.ndarray]:
    """The opacity of each step of the smooth diagram's band, and where each step starts."""
    ax = fig.axes[0]
    bands = [c for c in ax.collections if type(c).__name__ != "LineCollection"]
    assert len(bands) == 1
    colours = bands[0].get_facecolors()
    assert {rgb(c[:3]) for c in colours} == {rgb("tab:red")}
    return colours[:, 3], np.array([path.vertices[0, 0] for path in bands[0].get_paths()])


@pytest.mark.parametrize("model", list(MODELS))
def test_the_smooth_band_fades_with_the_density_instead_of_starting_with_a_sharp_edge(states, model):
    # Issue 20: the band was drawn at full opacity only where the density passed 1% of its peak: a sharp edge.
    fig = plot_smooth_reliability(states[model], n_boot=100)
    opacity, starts = band_opacities(fig)
    assert opacity.max() == pytest.approx(0.2) and np.abs(np.diff(opacity)).max() < 0.02
    assert starts[0] == 0 or opacity[0] < 0.01  # the band starts at the axis, or faded out
    assert starts[-1] >= 0.99 or opacity[-1] < 0.01
    legend = [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]
    assert "95% bootstrap band\n(fades where fewer rows)" in legend
    plt.close(fig)


def test_the_smooth_diagram_without_intervals_draws_no_band_even_on_a_coarse_fine_grid():
    # Issue 19: with ci=None and n_fine < n_bins the diagram told the user to pass ci=None.
    state = state_from(*sample("uniform, over-confident", 200, seed=0), n_bins=15, n_fine=10)
    fig = plot_smooth_reliability(state, ci=None)
    assert [c for c in fig.axes[0].collections if type(c).__name__ != "LineCollection"] == []
    assert "[" not in fig.axes[0].get_title()
    assert "bootstrap band" not in str([t.get_text() for t in legends(fig)[0].get_texts()])
    plt.close(fig)
    with pytest.raises(ValueError, match=r"need n_fine >= n_bins, got n_fine=10 < n_bins=15: draw it without them "
                                         r"\(plot_smooth_reliability\(..., ci=None\)\)"):
        plot_smooth_reliability(state, ci=0.95)
