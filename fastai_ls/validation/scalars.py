"""The checks of scalar options (counts, bounds, confidence levels, seeds, interval grids, folds), in the standard
library alone: the `fastai-ls` command runs them before it imports torch, so that a wrong option is refused at once."""

from __future__ import annotations

import math
import numbers

__all__ = ["check_int", "check_number", "check_ci", "check_seed", "check_interval_grid", "check_folds"]


def check_int(value: int, name: str, low: int = 1) -> int:
    """`value` as a Python int if it is an integer >= `low` (numpy's integers included, booleans not), else a
    ValueError naming `name`.

    Parameters
    ----------
    value : int
        The option's value.
    name : str
        The option's name, for the message.
    low : int
        The smallest value allowed.

    >>> check_int(3.0, "n_bins")
    Traceback (most recent call last):
    ValueError: n_bins must be an int >= 1, got 3.0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def check_number(value: float, name: str, low: float = 0.0, strict: bool = False) -> float:
    """`value` as a Python float if it is a finite real number >= `low` (> `low` with `strict`; numpy's scalars
    included, booleans not), else a ValueError naming `name`.

    Parameters
    ----------
    value : float
        The option's value.
    name : str
        The option's name, for the message.
    low : float
        The bound.
    strict : bool
        Whether `low` itself is refused.

    >>> check_number(2, "temperature", strict=True)
    2.0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or (value <= low if strict else value < low):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}, got {value!r}")
    return float(value)


def check_ci(ci: float, n_boot: int | None = None) -> None:
    """A ValueError unless 0 < ci < 1 and (if given) `n_boot` is an int >= 2.

    Parameters
    ----------
    ci : float
        A confidence level.
    n_boot : int, optional
        A number of bootstrap replicates.

    >>> check_ci(95)
    Traceback (most recent call last):
    ValueError: ci must be a confidence level strictly between 0 and 1 (e.g. 0.95), got 95
    """
    if isinstance(ci, bool) or not isinstance(ci, numbers.Real) or not 0 < ci < 1:
        raise ValueError(f"ci must be a confidence level strictly between 0 and 1 (e.g. 0.95), got {ci!r}")
    if n_boot is not None and (isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < 2):
        raise ValueError(f"n_boot must be an int >= 2, got {n_boot!r}")


def check_seed(seed: int | None, allow_none: bool = True) -> int | None:
    """`seed` if it can seed both numpy's and torch's generators: an int in [0, 2**64), or None where `allow_none`
    (a fresh seed); else a ValueError naming it (numpy's own message, "expected non-negative integer", does not).

    Parameters
    ----------
    seed : int, optional
        The seed to check.
    allow_none : bool
        Whether None (draw a fresh seed) is allowed.

    >>> check_seed(-1)
    Traceback (most recent call last):
    ValueError: seed must be an int from 0 to 2**64 - 1 or None, got -1
    """
    if seed is None and allow_none:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int from 0 to 2**64 - 1{' or None' if allow_none else ''}, got {seed!r}")
    return int(seed)


def check_interval_grid(n_bins: int, n_fine: int) -> None:
    """A ValueError unless the fine grid has at least as many cells as there are bins: the bootstrap resamples the
    fine cells, split at the bin edges (`fastai_ls.calibration.intervals.joint_cells`), so that its ECE uses the
    bins of the point estimate.

    Parameters
    ----------
    n_bins : int
        The equal-width bins of a `CalibrationState`.
    n_fine : int
        The cells of its fine grid.

    >>> check_interval_grid(n_bins=2000, n_fine=1000)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: intervals need at least as many fine cells as bins, got n_fine=1000 < n_bins=2000: pass n_fine >= ...
    """
    if n_fine < n_bins:
        raise ValueError(f"intervals need at least as many fine cells as bins, got n_fine={n_fine} < n_bins={n_bins}: "
                         f"pass n_fine >= {n_bins}, or no intervals (ci=None)")


def check_folds(n: int, n_classes: int, folds: int, option: str | None = None) -> None:
    """A ValueError unless cross-fitting `folds` folds of `n` rows leaves every calibrator at least `n_classes` rows
    to fit on: each fit leaves out one fold, and the stratified folds differ by at most one row, so the fewest rows a
    fit sees are `n - ceil(n / folds)`. The message says which number of folds is enough.

    Parameters
    ----------
    n : int
        Rows of the held-out logits.
    n_classes : int
        Classes (columns of the logits).
    folds : int
        Cross-fitting folds (an int >= 2).
    option : str, optional
        How the caller spells the option, for a command's message (``"--folds"``: also refuses more folds than rows,
        and too few rows for any number of folds, in the command's words); None for a function's ``folds=``.

    Examples
    --------
    >>> check_folds(12, 10, 5)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: folds=5 leaves 9 rows to fit each calibrator on (12 rows, 10 classes), fewer than the classes: ...
    >>> check_folds(12, 10, 5, option="--folds")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: --folds 5 fits each calibrator on 4 of the 5 folds, 9 of the 12 rows, ...: use --folds 6 or more
    """
    if option is not None:
        if n <= n_classes:
            raise ValueError(f"{n} rows for {n_classes} classes: each calibrator is fitted on all folds but one, which "
                             f"needs at least as many rows as classes, so at least {n_classes + 1} rows")
        if folds > n:
            raise ValueError(f"{option} {folds} is more than the {n} rows: use at most {option} {n}")
    fewest = n - -(-n // folds)
    if fewest >= n_classes:
        return
    # More folds leave more rows to each fit: n - ceil(n / f) >= C from f = ceil(n / (n - C)) on, if n > C.
    enough = -(-n // (n - n_classes)) if n > n_classes else None
    if option is not None:
        raise ValueError(f"{option} {folds} fits each calibrator on {folds - 1} of the {folds} folds, {fewest} of the "
                         f"{n} rows, fewer than the {n_classes} classes: use {option} {enough} or more")
    advice = f"use folds={enough} or more" if enough else "no number of folds works: add held-out rows"
    raise ValueError(f"folds={folds} leaves {fewest} rows to fit each calibrator on ({n} rows, "
                     f"{n_classes} classes), fewer than the classes: {advice}")
