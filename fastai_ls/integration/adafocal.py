"""`AdaFocalCallback`: with the `CalibrationCallback`, updates an `AdaFocalLoss`'s per-bin gammas after each
validation pass of a fit from that callback's counters, with no extra pass over the data."""

from __future__ import annotations

from fastai.callback.core import Callback

from fastai_ls.calibration.state import CalibrationState
from fastai_ls.integration.callback import CalibrationCallback
from fastai_ls.loss.adafocal import AdaFocalLoss

__all__ = ["AdaFocalCallback"]


class AdaFocalCallback(Callback):
    """After each validation pass of a fit, `AdaFocalLoss.update` from the `CalibrationCallback`'s fine counters of
    that pass (top-label confidence and accuracy per cell, merged into equal-mass bins). Passes outside a fit
    (`validate`, `get_preds`) and nested ones leave the gammas alone. Both callbacks must be on the learner, e.g.
    `cbs=[CalibrationCallback(), AdaFocalCallback()]`.

    Examples
    --------
    >>> cb = AdaFocalCallback()
    >>> cb.order > CalibrationCallback.order
    True
    """

    order = CalibrationCallback.order + 1  # after the calibration callback has counted the pass

    def __init__(self):
        """No options: the loss holds the update's parameters."""
        self._loss: AdaFocalLoss | None = None
        self._calibration: CalibrationCallback | None = None
        self._armed = False  # set by a fit's training phase, spent by its validation pass
        self._before: CalibrationState | None = None  # the calibration callback's state before this pass

    def before_fit(self):
        """Find the loss before MixUp/CutMix wrap it, and the calibration callback."""
        # No error here: validate() and get_preds() fire before_fit too, and an error there would keep the
        # learner's lock (see `before_train`).
        loss = self.learn.loss_func
        self._loss = loss if isinstance(loss, AdaFocalLoss) else None
        self._calibration = next((cb for cb in self.learn.cbs if isinstance(cb, CalibrationCallback)), None)
        self._armed = False

    def before_train(self):
        """Only a real fit trains: check what the update needs, then take the next validation pass."""
        if self._loss is None:
            raise TypeError(f"AdaFocalCallback updates an AdaFocalLoss, but the learner's loss is "
                            f"{type(self.learn.loss_func).__name__}: pass loss_func=AdaFocalLoss()")
        if self._calibration is None:
            raise ValueError("AdaFocalCallback reads the CalibrationCallback's counters: add one, "
                             "cbs=[CalibrationCallback(), AdaFocalCallback()]")
        self._armed = True

    def before_validate(self):
        self._before = self._calibration.state if self._calibration is not None else None

    def after_validate(self):
        """Step the gammas once per epoch, from the pass the calibration callback has just scored."""
        if not self._armed:
            return
        state = self._calibration.state
        if state is None or state is self._before:  # no labelled batch in this pass
            return
        self._armed = False
        self._loss.update(state.fine)

    def after_fit(self):
        self._armed, self._before = False, None
