"""The comparison table of post-hoc calibrators as the command prints it, and the method it recommends."""

from __future__ import annotations

import pandas as pd

from fastai_ls.calibration.best_calibrator import best_method

__all__ = ["SHOWN", "best_method", "comparison_text"]

# The columns of a comparison table shown on the console, with their headers.
SHOWN = {"error_rate": "error rate", "ece": "ECE", "smece": "smooth ECE", "nll": "NLL", "brier": "Brier",
         "aurc": "AURC"}


def comparison_text(table: pd.DataFrame, digits: int = 4, shown: tuple[str, ...] = tuple(SHOWN)) -> str:
    """A `compare_calibrators` table as console text: one row per method, `estimate [lower, upper]` per metric,
    whether the method may change the predicted class, and the mean seconds of one fit.

    Parameters
    ----------
    table : pandas.DataFrame
        A `compare_calibrators` table (with or without interval columns).
    digits : int
        Digits after the decimal point.
    shown : tuple of str
        The metric columns to show (default: those of `SHOWN`).

    Returns
    -------
    str

    Examples
    --------
    >>> t = pd.DataFrame({"error_rate": [0.1], "ece": [0.05], "ece_lo": [0.03], "ece_hi": [0.07], "smece": [0.04],
    ...                   "nll": [0.3], "brier": [0.2], "aurc": [0.02], "fit_s": [0.0],
    ...                   "may_change_prediction": [False]}, index=pd.Index(["uncalibrated"], name="method"))
    >>> print(comparison_text(t))  # doctest: +NORMALIZE_WHITESPACE
                  error rate                      ECE smooth ECE    NLL  Brier   AURC changes class  fit s
    method
    uncalibrated      0.1000  0.0500 [0.0300, 0.0700]     0.0400 0.3000 0.2000 0.0200            no  0.000
    """
    from fastai_ls.calibration.report import interval_text

    text = interval_text(table, [name for name in shown if name in table.columns], digits).rename(columns=SHOWN)
    text["changes class"] = table["may_change_prediction"].map({True: "may", False: "no"})
    text["fit s"] = table["fit_s"].map(lambda s: f"{s:.3f}")
    return text.to_string()
