"""Calibration's math, tensors in and tensors out (no fastai): the streamed counters (`state.py`), the metrics
computed from them (`metrics.py`), one-call functions on predictions in memory (`functional.py`) and the tables
and figures (`plots.py`)."""

from fastai_ls.calibration.functional import calibration_error, calibration_metrics
from fastai_ls.calibration.plots import plot_history, plot_reliability
from fastai_ls.calibration.state import CalibrationState

__all__ = ["CalibrationState", "calibration_error", "calibration_metrics", "plot_reliability", "plot_history"]

# Post-hoc calibrators (`calibrators/`) and their cross-fitted comparison (`compare.py`).
from fastai_ls.calibration.calibrators import CALIBRATORS, CalibrationWarning, Calibrator, get_calibrator  # noqa: E402
from fastai_ls.calibration.compare import compare_calibrators  # noqa: E402

__all__ += ["CALIBRATORS", "Calibrator", "CalibrationWarning", "get_calibrator", "compare_calibrators"]
