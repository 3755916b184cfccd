"""Label smoothing and calibration for fastai.

`import fastai_ls` is cheap: each public name is imported from its module on first use (PEP 562), so that the
package, and the `fastai-ls` command's parser, load neither torch nor fastai until a name that needs them is used.
`from fastai_ls import X` and `fastai_ls.X` work as with eager imports.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for IDEs and type checkers; at run time `__getattr__` below imports each name on first use
    from fastai_ls.calibration import CalibrationState, calibration_error, calibration_metrics
    from fastai_ls.calibration.compare_scores import compare_confidence_scores
    from fastai_ls.calibration.confidence_scores import confidence_scores
    from fastai_ls.calibration.plots import (
        plot_history,
        plot_reliability,
        plot_risk_coverage,
        plot_selective,
        plot_smooth_reliability,
    )
    from fastai_ls.calibration.selective import augrc, aurc
    from fastai_ls.digits import digits_learner
    from fastai_ls.integration import distributed
    from fastai_ls.integration.adafocal import AdaFocalCallback
    from fastai_ls.integration.callback import CalibrationCallback
    from fastai_ls.integration.compare_losses import compare_losses
    from fastai_ls.integration.maxsup_schedule import MaxSupSchedule
    from fastai_ls.integration.posthoc import (
        applied_calibrator,
        apply_calibrator,
        compare_calibrators,
        fit_calibrator,
        remove_calibrator,
        save_predictions,
    )
    from fastai_ls.integration.temperature import TemperatureFit, apply_temperature, fit_temperature, remove_temperature
    from fastai_ls.loss.adafocal import AdaFocalLoss, AdaFocalLossFlat, ada_focal_loss
    from fastai_ls.loss.confidence_penalty import (
        ConfidencePenaltyLoss,
        ConfidencePenaltyLossFlat,
        confidence_penalty_loss,
    )
    from fastai_ls.loss.focal import (
        AdaptiveFocalLoss,
        AdaptiveFocalLossFlat,
        FocalLoss,
        FocalLossFlat,
        adaptive_focal_loss,
        focal_loss,
    )
    from fastai_ls.loss.logitnorm import LogitNormLoss, LogitNormLossFlat, logitnorm_loss
    from fastai_ls.loss.margin import MarginLabelSmoothing, MarginLabelSmoothingFlat, margin_label_smoothing
    from fastai_ls.loss.maxsup import MaxSupLoss, MaxSupLossFlat, maxsup_loss
    from fastai_ls.loss.modules import (
        LabelSmoothingCrossEntropy,
        LabelSmoothingCrossEntropyFlat,
        label_smoothing_cross_entropy,
    )
    from fastai_ls.pets import make_pets_like_tree, pets_learner

__version__ = "0.1.0"

# Each public name and the module that defines it; a submodule (in `_SUBMODULES`) is named by itself.
_SOURCES = {
    "LabelSmoothingCrossEntropy": "fastai_ls.loss.modules",
    "LabelSmoothingCrossEntropyFlat": "fastai_ls.loss.modules",
    "label_smoothing_cross_entropy": "fastai_ls.loss.modules",
    "AdaptiveFocalLoss": "fastai_ls.loss.focal",
    "AdaptiveFocalLossFlat": "fastai_ls.loss.focal",
    "FocalLoss": "fastai_ls.loss.focal",
    "FocalLossFlat": "fastai_ls.loss.focal",
    "adaptive_focal_loss": "fastai_ls.loss.focal",
    "focal_loss": "fastai_ls.loss.focal",
    "MarginLabelSmoothing": "fastai_ls.loss.margin",
    "MarginLabelSmoothingFlat": "fastai_ls.loss.margin",
    "margin_label_smoothing": "fastai_ls.loss.margin",
    "MaxSupLoss": "fastai_ls.loss.maxsup",
    "MaxSupLossFlat": "fastai_ls.loss.maxsup",
    "maxsup_loss": "fastai_ls.loss.maxsup",
    "LogitNormLoss": "fastai_ls.loss.logitnorm",
    "LogitNormLossFlat": "fastai_ls.loss.logitnorm",
    "logitnorm_loss": "fastai_ls.loss.logitnorm",
    "ConfidencePenaltyLoss": "fastai_ls.loss.confidence_penalty",
    "ConfidencePenaltyLossFlat": "fastai_ls.loss.confidence_penalty",
    "confidence_penalty_loss": "fastai_ls.loss.confidence_penalty",
    "AdaFocalLoss": "fastai_ls.loss.adafocal",
    "AdaFocalLossFlat": "fastai_ls.loss.adafocal",
    "ada_focal_loss": "fastai_ls.loss.adafocal",
    "MaxSupSchedule": "fastai_ls.integration.maxsup_schedule",
    "AdaFocalCallback": "fastai_ls.integration.adafocal",
    "CalibrationState": "fastai_ls.calibration",
    "calibration_error": "fastai_ls.calibration",
    "calibration_metrics": "fastai_ls.calibration",
    "CalibrationCallback": "fastai_ls.integration.callback",
    "plot_history": "fastai_ls.calibration.plots",
    "plot_reliability": "fastai_ls.calibration.plots",
    "plot_smooth_reliability": "fastai_ls.calibration.plots",
    "plot_risk_coverage": "fastai_ls.calibration.plots",
    "plot_selective": "fastai_ls.calibration.plots",
    "confidence_scores": "fastai_ls.calibration.confidence_scores",
    "aurc": "fastai_ls.calibration.selective",
    "augrc": "fastai_ls.calibration.selective",
    "compare_confidence_scores": "fastai_ls.calibration.compare_scores",
    "TemperatureFit": "fastai_ls.integration.temperature",  # deprecated
    "apply_temperature": "fastai_ls.integration.temperature",  # deprecated
    "fit_temperature": "fastai_ls.integration.temperature",  # deprecated
    "remove_temperature": "fastai_ls.integration.temperature",  # deprecated
    "fit_calibrator": "fastai_ls.integration.posthoc",
    "apply_calibrator": "fastai_ls.integration.posthoc",
    "remove_calibrator": "fastai_ls.integration.posthoc",
    "applied_calibrator": "fastai_ls.integration.posthoc",
    "compare_calibrators": "fastai_ls.integration.posthoc",
    "save_predictions": "fastai_ls.integration.posthoc",
    "compare_losses": "fastai_ls.integration.compare_losses",
    "pets_learner": "fastai_ls.pets",
    "make_pets_like_tree": "fastai_ls.pets",
    "digits_learner": "fastai_ls.digits",
    "distributed": "fastai_ls.integration.distributed",
}
_SUBMODULES = {"distributed"}
__all__ = [
    "LabelSmoothingCrossEntropy", "LabelSmoothingCrossEntropyFlat", "label_smoothing_cross_entropy",
    "AdaptiveFocalLoss", "AdaptiveFocalLossFlat", "FocalLoss", "FocalLossFlat", "adaptive_focal_loss", "focal_loss",
    "MarginLabelSmoothing", "MarginLabelSmoothingFlat", "margin_label_smoothing", "MaxSupLoss", "MaxSupLossFlat",
    "maxsup_loss", "LogitNormLoss", "LogitNormLossFlat", "logitnorm_loss", "ConfidencePenaltyLoss",
    "ConfidencePenaltyLossFlat", "confidence_penalty_loss", "AdaFocalLoss", "AdaFocalLossFlat", "ada_focal_loss",
    "MaxSupSchedule", "AdaFocalCallback",
    "CalibrationState", "calibration_error", "calibration_metrics",
    "CalibrationCallback", "plot_history", "plot_reliability", "plot_smooth_reliability", "plot_risk_coverage",
    "plot_selective", "confidence_scores", "aurc", "augrc", "compare_confidence_scores",
    "TemperatureFit", "apply_temperature", "fit_temperature", "remove_temperature",
    "fit_calibrator", "apply_calibrator", "remove_calibrator", "applied_calibrator", "compare_calibrators",
    "save_predictions", "compare_losses",
    "pets_learner", "make_pets_like_tree", "digits_learner", "distributed",
]  # the same names as `_SOURCES` and the imports above (tests/test_package.py checks it)


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (then it is an ordinary attribute of the package)."""
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'fastai_ls' has no attribute {name!r}")
    with warnings.catch_warnings():
        # fastai 2.8 applies torch.jit.script at import time, which torch 2.10+ deprecates: noise our users cannot
        # act on. (A module imported directly, `from fastai_ls.pets import ...`, shows it as `import fastai` does.)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
        module = importlib.import_module(source)
    value = module if name in _SUBMODULES else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
