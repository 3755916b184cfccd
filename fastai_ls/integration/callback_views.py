"""Deprecated: the tables and figures `CalibrationCallback` used to draw itself. Each works for one more release,
with a `FutureWarning` naming the function that takes the `CalibrationState` instead; `cb.state_of(epoch)` is the
state of an epoch, `cb.history` the table of all of them.

| deprecated                              | use                                                                  |
|-----------------------------------------|----------------------------------------------------------------------|
| `cb.report(epoch, ci)`                  | `report_frame(cb.state_of(epoch).metrics(ci=ci), ci)`                |
| `cb.risk_coverage(epoch)`               | `cb.state_of(epoch).risk_coverage()`                                 |
| `cb.bins(epoch)`                        | `bin_frame(cb.state_of(epoch))` (`CalibrationState.bins` is the      |
|                                         | tensor of counters; the table has its own name)                      |
| `cb.plot_reliability(epoch, ...)`       | `fastai_ls.plot_reliability(cb.state_of(epoch), ...)`                |
| `cb.plot_smooth_reliability(epoch, ...)`| `fastai_ls.plot_smooth_reliability(cb.state_of(epoch), ...)`         |
| `cb.plot_risk_coverage(epoch, ...)`     | `fastai_ls.plot_risk_coverage(cb.state_of(epoch), ...)`              |
| `cb.plot_history()`                     | `fastai_ls.plot_history(cb.history)`                                 |
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from fastai_ls._deprecation import warn_renamed
from fastai_ls.calibration import plots
from fastai_ls.calibration.report import report_frame

if TYPE_CHECKING:  # matplotlib is imported only when a plot is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["DeprecatedViews"]


class DeprecatedViews:
    """The deprecated table and plot methods of `CalibrationCallback` (which provides `state_of`, `history`, `ci`,
    `n_boot` and `seed`)."""

    def report(self, epoch: int = -1, ci: float | None = None) -> pd.DataFrame:
        """Deprecated: use `cb.state_of(epoch).report(ci)`."""
        warn_renamed("CalibrationCallback.report()", "cb.state_of(epoch).report(ci)")
        level = self.ci if ci is None else ci
        return report_frame(self.state_of(epoch).metrics(ci=level, n_boot=self.n_boot, seed=self.seed), level)

    def risk_coverage(self, epoch: int = -1) -> pd.DataFrame:
        """Deprecated: use `cb.state_of(epoch).risk_coverage()`."""
        warn_renamed("CalibrationCallback.risk_coverage()", "cb.state_of(epoch).risk_coverage()")
        return pd.DataFrame({k: v.numpy() for k, v in self.state_of(epoch).risk_coverage().items()})

    def bins(self, epoch: int = -1) -> pd.DataFrame:
        """Deprecated: use `bin_frame(cb.state_of(epoch))` (`CalibrationState.bins` is the tensor of counters)."""
        warn_renamed("CalibrationCallback.bins()", "fastai_ls.calibration.plots.bin_frame(cb.state_of(epoch))")
        return plots.bin_frame(self.state_of(epoch))

    def plot_reliability(self, epoch: int = -1, ax: Axes | None = None, title: str | None = None) -> Figure:
        """Deprecated: use `fastai_ls.plot_reliability(cb.state_of(epoch), ax=ax, title=title)`."""
        warn_renamed("CalibrationCallback.plot_reliability()", "fastai_ls.plot_reliability(cb.state_of(epoch))")
        return plots.plot_reliability(self.state_of(epoch), ax=ax, title=title, ci=self.ci or 0.95)

    def plot_smooth_reliability(self, epoch: int = -1, ax: Axes | None = None, title: str | None = None) -> Figure:
        """Deprecated: use `fastai_ls.plot_smooth_reliability(cb.state_of(epoch), ax=ax, title=title)`."""
        warn_renamed("CalibrationCallback.plot_smooth_reliability()",
                     "fastai_ls.plot_smooth_reliability(cb.state_of(epoch))")
        return plots.plot_smooth_reliability(self.state_of(epoch), ax=ax, title=title, ci=self.ci,
                                             n_boot=self.n_boot, seed=self.seed)

    def plot_risk_coverage(self, epoch: int = -1, ax: Axes | None = None, title: str | None = None) -> Figure:
        """Deprecated: use `fastai_ls.plot_risk_coverage(cb.state_of(epoch), ax=ax, title=title)`."""
        warn_renamed("CalibrationCallback.plot_risk_coverage()", "fastai_ls.plot_risk_coverage(cb.state_of(epoch))")
        return plots.plot_risk_coverage(self.state_of(epoch), ax=ax, title=title)

    def plot_history(self) -> Figure:
        """Deprecated: use `fastai_ls.plot_history(cb.history)`."""
        warn_renamed("CalibrationCallback.plot_history()", "fastai_ls.plot_history(cb.history)")
        return plots.plot_history(self.history)
