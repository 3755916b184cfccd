"""Label smoothing and calibration for fastai."""

from fastai_ls.losses import LabelSmoothingCrossEntropy, LabelSmoothingCrossEntropyFlat, label_smoothing_cross_entropy

__version__ = "0.1.0"
__all__ = ["LabelSmoothingCrossEntropy", "LabelSmoothingCrossEntropyFlat", "label_smoothing_cross_entropy"]
