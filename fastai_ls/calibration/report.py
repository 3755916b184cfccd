"""Metrics with their intervals as a table: one row per metric, estimate, lower, upper; and as text."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from fastai_ls.calibration.estimates import METRIC_NAMES
from fastai_ls.calibration.intervals import BOOTSTRAP_NAMES

__all__ = ["REPORT_COLUMNS", "report_frame", "format_interval", "interval_text"]

REPORT_COLUMNS = ("estimate", "lower", "upper", "interval")
# Standard errors are reported as the width of their metric's interval, not as rows of their own.
_REPORTED = tuple(m for m in METRIC_NAMES if not m.endswith("_se"))


def _method(name: str, ci: float | None) -> str:
    if ci is None or not (name in BOOTSTRAP_NAMES or name in ("nll", "brier")):
        return ""
    return f"{ci:.0%} {'percentile bootstrap' if name in BOOTSTRAP_NAMES else 'normal'}"


def report_frame(metrics: dict[str, float], ci: float | None = None) -> pd.DataFrame:
    """A tidy table of `CalibrationState.metrics(ci=...)`: index `metric`, columns `estimate`, `lower`, `upper`
    (NaN where a metric has no interval) and `interval` (how it was made, e.g. '95% percentile bootstrap').

    Parameters
    ----------
    metrics : dict
        A metrics dict, with `<name>_lo`/`<name>_hi` keys for the metrics that have an interval.
    ci : float, optional
        The level those intervals were made at (only to label them).

    Examples
    --------
    >>> float(report_frame({'ece': 0.05, 'ece_lo': 0.03, 'ece_hi': 0.07}, ci=0.95).loc['ece', 'upper'])
    0.07
    """
    names = [m for m in _REPORTED if m in metrics] + [m for m in metrics if m not in METRIC_NAMES
                                                      and not m.endswith(("_lo", "_hi"))]
    frame = pd.DataFrame({
        "estimate": [metrics[m] for m in names],
        "lower": [metrics.get(f"{m}_lo", math.nan) for m in names],
        "upper": [metrics.get(f"{m}_hi", math.nan) for m in names],
        "interval": [_method(m, ci) if f"{m}_lo" in metrics else "" for m in names],
    }, index=pd.Index(names, name="metric"))
    return frame


def format_interval(estimate: float, lower: float = math.nan, upper: float = math.nan, digits: int = 4) -> str:
    """'estimate [lower, upper]', or the estimate alone when there is no interval.

    Parameters
    ----------
    estimate, lower, upper : float
        The values; a NaN bound means no interval.
    digits : int
        Digits after the decimal point.

    Examples
    --------
    >>> format_interval(0.02613, 0.0121, 0.0412)
    '0.0261 [0.0121, 0.0412]'
    """
    text = f"{estimate:.{digits}f}"
    if math.isnan(lower) or math.isnan(upper):
        return text
    return f"{text} [{lower:.{digits}f}, {upper:.{digits}f}]"


def interval_text(table: pd.DataFrame, names: Sequence[str] | None = None, digits: int = 4) -> pd.DataFrame:
    """A table of text: each metric column of `table` joined with its `<name>_lo` and `<name>_hi` columns into
    'estimate [lower, upper]' (the estimate alone where the bounds are missing or NaN), e.g. for printing the table
    of `compare_calibrators`.

    Parameters
    ----------
    table : pandas.DataFrame
        Numeric columns `<name>`, optionally with `<name>_lo` and `<name>_hi`.
    names : sequence of str, optional
        The metric columns to keep, in order (default: every column that is not a bound).
    digits : int
        Digits after the decimal point.

    Examples
    --------
    >>> frame = pd.DataFrame({'ece': [0.05], 'ece_lo': [0.03], 'ece_hi': [0.07], 'nll': [0.2]})
    >>> interval_text(frame).iloc[0].tolist()
    ['0.0500 [0.0300, 0.0700]', '0.2000']
    """
    if names is None:
        names = [c for c in table.columns if not (str(c).endswith(("_lo", "_hi")) and str(c)[:-3] in table.columns)]
    text = {}
    for name in names:
        lower = table[f"{name}_lo"] if f"{name}_lo" in table.columns else pd.Series(math.nan, index=table.index)
        upper = table[f"{name}_hi"] if f"{name}_hi" in table.columns else pd.Series(math.nan, index=table.index)
        text[name] = [format_interval(float(e), float(lo), float(hi), digits)
                      for e, lo, hi in zip(table[name], lower, upper)]
    return pd.DataFrame(text, index=table.index)
