"""Post-hoc calibrators (tensors in, tensors out): each is fitted on held-out logits and class ids and maps logits
to probabilities. `base.py` holds the interface and its input checks, `scaling.py` the softmax-of-rescaled-logits
family, `isotonic.py` and `binning.py` the non-parametric ones, `toplabel.py` the top-label scheme they share, and
`folds.py` the stratified folds of cross-fitting. `CALIBRATORS` maps each method's name to its class, in the order
of `fastai_ls.calibrator_names.CALIBRATOR_NAMES` (which the command reads without importing torch)."""

from __future__ import annotations

import difflib

from fastai_ls.calibration.calibrators.base import CalibrationWarning, Calibrator
from fastai_ls.calibration.calibrators.binning import HistogramCurve, TopLabelHistogramBinning
from fastai_ls.calibration.calibrators.folds import stratified_folds
from fastai_ls.calibration.calibrators.isotonic import IsotonicCalibration, IsotonicCurve, TopLabelIsotonic
from fastai_ls.calibration.calibrators.scaling import (
    DirichletCalibration,
    EnsembleTemperatureScaling,
    MatrixScaling,
    TemperatureScaling,
    VectorScaling,
)
from fastai_ls.calibrator_names import CALIBRATOR_NAMES

__all__ = ["Calibrator", "CalibrationWarning", "CALIBRATORS", "get_calibrator", "TemperatureScaling",
           "VectorScaling", "MatrixScaling", "DirichletCalibration", "EnsembleTemperatureScaling",
           "IsotonicCalibration", "TopLabelIsotonic", "TopLabelHistogramBinning", "IsotonicCurve", "HistogramCurve",
           "stratified_folds"]

_BY_NAME = {cls.name: cls for cls in (
    TemperatureScaling, VectorScaling, MatrixScaling, DirichletCalibration, IsotonicCalibration, TopLabelIsotonic,
    TopLabelHistogramBinning, EnsembleTemperatureScaling)}
CALIBRATORS: dict[str, type[Calibrator]] = {name: _BY_NAME[name] for name in CALIBRATOR_NAMES}


def get_calibrator(method: str | Calibrator, **options) -> Calibrator:
    """A new, unfitted calibrator for the method `method` (a name in `CALIBRATORS`), built with `options`; a
    `Calibrator` instance is returned as it is.

    Parameters
    ----------
    method : str | Calibrator
        One of 'temperature', 'vector', 'matrix', 'dirichlet', 'isotonic', 'top_label_isotonic', 'histogram',
        'ets', or a calibrator.
    **options
        Passed to the calibrator's constructor (e.g. `reg=0.01` for 'matrix').

    >>> get_calibrator('temperature')
    TemperatureScaling(unfitted)
    """
    if isinstance(method, Calibrator):
        if options:
            raise ValueError("options are for a method name; this calibrator is built already")
        return method
    if not isinstance(method, str) or method not in CALIBRATORS:
        close = difflib.get_close_matches(str(method), list(CALIBRATORS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown calibration method {method!r}{hint}; known: {', '.join(CALIBRATORS)}")
    return CALIBRATORS[method](**options)
