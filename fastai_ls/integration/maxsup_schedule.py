"""`MaxSupSchedule`: MaxSup's alpha raised linearly over training, as the paper does (Zhou et al., NeurIPS 2025:
0.1 to 0.2 on ImageNet)."""

from __future__ import annotations

from fastai.callback.core import Callback

from fastai_ls.loss.base import check_parameter
from fastai_ls.loss.maxsup import MaxSupLoss

__all__ = ["MaxSupSchedule"]


class MaxSupSchedule(Callback):
    """Set the learner's `MaxSupLoss` alpha to start + (end - start) * t before each training batch, t the fraction
    of the fit's training done (fastai's `pct_train`, 0 at the first batch). Each fit restarts the schedule; the
    loss keeps the last alpha afterwards (what validation, `get_preds` and an exported learner use).

    Parameters
    ----------
    start : float, default 0.1
        alpha at the start of each fit, >= 0.
    end : float, default 0.2
        alpha reached at the end of the fit, >= 0.

    Examples
    --------
    >>> cb = MaxSupSchedule(0.1, 0.2)
    >>> cb.alpha_at(0.5)
    0.15000000000000002
    """

    run_valid = False

    def __init__(self, start: float = 0.1, end: float = 0.2):
        """Check and store the range (see the class's Parameters)."""
        self.start, self.end = check_parameter("start", start), check_parameter("end", end)
        self._loss: MaxSupLoss | None = None

    def alpha_at(self, pct_train: float) -> float:
        """alpha after the fraction `pct_train` of the fit."""
        return self.start + (self.end - self.start) * pct_train

    def before_fit(self):
        """Find the loss before MixUp/CutMix wrap it (their `before_train` swaps `learn.loss_func`)."""
        # No error here: validate() and get_preds() fire before_fit too, and an error there would keep the
        # learner's lock (see `before_train`).
        loss = self.learn.loss_func
        self._loss = loss if isinstance(loss, MaxSupLoss) else None

    def before_train(self):
        """Only a real fit trains: refuse a loss that has no alpha to schedule."""
        if self._loss is None:
            raise TypeError(f"MaxSupSchedule schedules a MaxSupLoss's alpha, but the learner's loss is "
                            f"{type(self.learn.loss_func).__name__}: pass loss_func=MaxSupLoss() (or MaxSupLossFlat())")

    def before_batch(self):
        self._loss.alpha = self.alpha_at(self.learn.pct_train)
