"""Label smoothing and calibration for fastai."""

import warnings

with warnings.catch_warnings():
    # fastai 2.8 applies torch.jit.script at import time, which torch 2.10+ deprecates: noise our users cannot act on.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    from fastai_ls import distributed
    from fastai_ls.calibration import CalibrationState, calibration_error, calibration_metrics
    from fastai_ls.calibration.plots import plot_history, plot_reliability
    from fastai_ls.callback import CalibrationCallback
    from fastai_ls.digits import digits_learner
    from fastai_ls.losses import (
        LabelSmoothingCrossEntropy,
        LabelSmoothingCrossEntropyFlat,
        label_smoothing_cross_entropy,
    )
    from fastai_ls.pets import pets_learner
    from fastai_ls.posthoc import (
        TemperatureFit,
        apply_calibrator,
        apply_temperature,
        compare_calibrators,
        fit_calibrator,
        fit_temperature,
        remove_calibrator,
        remove_temperature,
    )

__version__ = "0.1.0"
__all__ = [
    "LabelSmoothingCrossEntropy", "LabelSmoothingCrossEntropyFlat", "label_smoothing_cross_entropy",
    "CalibrationState", "calibration_error", "calibration_metrics",
    "CalibrationCallback", "plot_history", "plot_reliability",
    "TemperatureFit", "apply_temperature", "fit_temperature", "remove_temperature",
    "fit_calibrator", "apply_calibrator", "remove_calibrator", "compare_calibrators",
    "pets_learner", "digits_learner", "distributed",
]
