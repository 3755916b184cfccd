"""One `CalibrationCallback` per learner: attaching a second one (say `fit(cbs=...)` on `pets_learner()`, which has
one) takes the first out while it is attached, with a warning, and puts it back when it leaves, so that no column is
there twice and `learn.calibration` is always the callback in `learn.cbs`."""

from __future__ import annotations

import warnings

from fastai.learner import Learner

from fastai_ls.integration.fastai_compat import AttachAwareCallback, reattach

__all__ = ["replace_others", "put_back"]


def replace_others(cb: AttachAwareCallback, learn: Learner, kind: type) -> None:
    """Take the learner's other callbacks of type `kind` out, with a warning, remembering them on `cb`.

    Parameters
    ----------
    cb : CalibrationCallback
        The callback `learn.add_cb` is attaching.
    learn : Learner
        Its learner.
    kind : type
        `CalibrationCallback`.
    """
    others = [other for other in getattr(learn, "cbs", ()) if isinstance(other, kind) and other is not cb]
    if not others:
        return
    warnings.warn(f"this learner already has a CalibrationCallback (metrics {others[0].metric_names}): the new "
                  f"one (metrics {cb.metric_names}) replaces it, and puts it back when it is removed (as "
                  "fit(cbs=...) does at the end of the fit); learn.calibration is the new one meanwhile",
                  stacklevel=5)
    for other in others:
        learn.remove_cb(other)
    cb.__dict__["_replaced"] = others


def put_back(cb: AttachAwareCallback, learn: Learner) -> None:
    """Attach again the callbacks `cb` replaced, now that it leaves `learn`; `learn.calibration` is the last of them.

    Parameters
    ----------
    cb : CalibrationCallback
        The callback `learn.remove_cb` is taking out.
    learn : Learner
        Its learner.
    """
    replaced = cb.__dict__.pop("_replaced", [])
    if replaced:
        for other in replaced:
            reattach(other, learn)
        setattr(learn, cb.attribute_name, replaced[-1])
        cb.keep_attribute()
