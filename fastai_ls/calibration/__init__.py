"""Calibration's math, tensors in and tensors out (no fastai): what every entry point accepts as input
(`checks.py`), the streamed counters (`state.py`), the metrics computed from them (`metrics.py`, with smooth ECE in
`smooth.py` and the risk-coverage curve in `risk_coverage.py`), their confidence intervals (`intervals.py`),
one-call functions on predictions in memory (`functional.py`), the tables (`report.py`) and figures (`plots.py`),
the post-hoc calibrators (`calibrators/`) with their cross-fitted comparison (`compare.py`), and selective
classification: confidence scores (`confidence_scores.py`), their exact risk-coverage metrics (`selective.py`) with
bootstrap intervals (`selective_bootstrap.py`), and the cross-fitted choice of a score (`compare_scores.py`)."""

from fastai_ls.calibration.calibrators import CALIBRATORS, CalibrationWarning, Calibrator, get_calibrator
from fastai_ls.calibration.compare import compare_on_logits
from fastai_ls.calibration.functional import calibration_error, calibration_metrics
from fastai_ls.calibration.plots import plot_history, plot_reliability, plot_risk_coverage, plot_smooth_reliability
from fastai_ls.calibration.state import CalibrationState

__all__ = ["CalibrationState", "calibration_error", "calibration_metrics", "plot_reliability",
           "plot_smooth_reliability", "plot_risk_coverage", "plot_history", "CALIBRATORS", "Calibrator",
           "CalibrationWarning", "get_calibrator", "compare_on_logits"]


def __getattr__(name: str):
    if name == "compare_calibrators":  # renamed (issue 16): the top-level name is the fastai layer's
        from fastai_ls._deprecation import warn_renamed

        warn_renamed("fastai_ls.calibration.compare_calibrators",
                     "fastai_ls.compare_calibrators (or fastai_ls.calibration.compare_on_logits)")
        return compare_on_logits
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
