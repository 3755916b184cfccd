"""Tables and figures of calibration: the bins of a state as a DataFrame, the binned and the smooth reliability
diagram, the risk-coverage plot and the per-epoch history.

Every plot takes a `CalibrationState` or anything holding one per epoch (a `CalibrationCallback`), imports
matplotlib only when it draws, returns the figure, and draws either a figure of its own, or onto a caller's pair of
axes (both with a panel below for the counts or the density), or onto a caller's one axes (the counts or density
then on a labelled right-hand axis). Every colour is in the legend, and the legend sits under the axes, where it
hides no data.
"""

from __future__ import annotations

from fastai_ls.calibration.plots.history import plot_history
from fastai_ls.calibration.plots.reliability import BIN_COLUMNS, bin_frame, plot_reliability
from fastai_ls.calibration.plots.selective import plot_risk_coverage, plot_selective
from fastai_ls.calibration.plots.smooth_reliability import plot_smooth_reliability

__all__ = ["BIN_COLUMNS", "bin_frame", "plot_reliability", "plot_smooth_reliability", "plot_risk_coverage",
           "plot_history", "plot_selective"]
