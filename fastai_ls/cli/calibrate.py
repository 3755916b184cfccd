"""`fastai-ls calibrate PREDICTIONS.npz`: which post-hoc calibrator suits these predictions? The cross-fitted
comparison of `compare_calibrators`, on outputs saved by any framework (the file's format: `archive.py`; the printed
table: `tables.py`).
"""

from __future__ import annotations

import functools
import io
import os
import sys
import textwrap
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import pandas as pd

from fastai_ls.cli.archive import read_predictions
from fastai_ls.cli.tables import best_method, comparison_text
from fastai_ls.validation import scalars

__all__ = ["check_csv_path", "quiet_bars", "calibrate"]

WIDTH = 110  # explanatory lines are wrapped to this many characters


def check_csv_path(out: str | Path, force: bool = False, source: str | Path | None = None) -> Path:
    """`out` if a CSV file can be written there (checked before a long run), else an OSError saying why. An
    existing file is replaced only with `force`, and never when it is `source`, the input (under any name).

    Parameters
    ----------
    out : str or Path
        The CSV file to write.
    force : bool, default False
        Replace `out` if it exists (`--force`).
    source : str or Path, optional
        The file the command reads, which `out` must not be.

    Returns
    -------
    Path

    Examples
    --------
    >>> check_csv_path("no/such/folder/table.csv")
    Traceback (most recent call last):
    OSError: cannot write no/such/folder/table.csv: no folder no/such/folder
    """
    out = Path(out)
    folder = out.parent
    if out.is_dir():
        raise OSError(f"cannot write {out}: it is a folder (give a file name, e.g. {out / 'calibrators.csv'})")
    if not folder.is_dir():
        raise OSError(f"cannot write {out}: no folder {folder}")
    if out.is_symlink() and not out.exists():  # the write would fail after the run, or create the link's target
        raise OSError(f"cannot write {out}: it is a link to {os.readlink(out)}, which does not exist")
    if out.exists():
        if source is not None and _same_file(out, Path(source)):
            raise OSError(f"--out {out} is the predictions file {source}: the table would replace the predictions; "
                          "give another file")
        if not out.is_file():
            raise OSError(f"cannot write {out}: it is not a regular file")
        if not force:
            raise OSError(f"{out} exists: pass --force to replace it, or give another --out")
    if not os.access(folder, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise OSError(f"cannot write {out}: permission denied")
    return out


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: through links, `..` and hard links too."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return a.resolve() == b.resolve()



@contextmanager
def quiet_bars(quiet: bool) -> Iterator[None]:
    """fastprogress's bars off inside the block when `quiet` (fastai's training and long comparisons use them);
    the tables it prints still are, and nothing else: no bar's fill character and carriage return before a row.

    Parameters
    ----------
    quiet : bool
        Turn the bars off; False leaves them as they are.

    Examples
    --------
    >>> import fastprogress.fastprogress as fastprogress
    >>> with quiet_bars(True):
    ...     fastprogress.NO_BAR
    True
    >>> fastprogress.NO_BAR
    False
    """
    if not quiet:
        yield
        return
    import fastprogress.fastprogress as fastprogress

    bar = fastprogress.ConsoleProgressBar
    previous, probing = fastprogress.NO_BAR, bar.__dict__["__init__"]
    fastprogress.NO_BAR, bar.__init__ = True, _without_encoding_probe(probing)
    try:
        yield
    finally:
        fastprogress.NO_BAR, bar.__init__ = previous, probing


def _without_encoding_probe(init):
    """A console bar's `__init__` that writes nothing: fastprogress's prints the bar's fill character and '\\r' to
    test the terminal's encoding, even with NO_BAR, and so put '█\\r' before each row of a table sent to a file.
    Its `__init__` writes nothing else, so the probe is all that goes to the sink."""

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        with redirect_stdout(io.StringIO()):
            init(self, *args, **kwargs)

    return __init__


def _say(text: str, width: int = WIDTH, file=None) -> None:
    print(textwrap.fill(text, width, subsequent_indent="  " if text.startswith("warning:") else ""), file=file)


def calibrate(
    path: str | Path,
    methods: list[str] | None = None,
    folds: int = 5,
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    quiet: bool = False,
) -> pd.DataFrame:
    """Run `compare_calibrators` on the predictions in `path`, print the table with 95% intervals and the best
    method by NLL, and write the table to `out` (CSV) if given. `CalibrationWarning`s of the fits go to stderr.

    Parameters
    ----------
    path : str or Path
        The predictions (format: the module docstring).
    methods : list of str, optional
        Method names (default: every calibrator, `CALIBRATORS`).
    folds : int, default 5
        Cross-fitting folds (stratified).
    seed : int, default 0
        Seed of the folds and of the bootstrap intervals.
    out : str or Path, optional
        CSV file for the table (checked before the comparison runs; never `path` itself).
    force : bool, default False
        Replace `out` if it exists.
    quiet : bool, default False
        No progress bars (`quiet_bars`).

    Returns
    -------
    pandas.DataFrame
        The `compare_calibrators` table.

    Examples
    --------
    >>> calibrate("valid.npz", methods=["temperature", "dirichlet"], out="calibrators.csv")  # doctest: +SKIP
    """
    out = check_csv_path(out, force, source=path) if out is not None else None
    predictions = read_predictions(path)
    n, n_classes = predictions.logits.shape
    scalars.check_folds(n, n_classes, folds, option="--folds")
    # Printed (and flushed, for a log or a pipe) as soon as known: the comparison takes seconds to minutes.
    _say(f"{path}: {n} rows, {n_classes} classes, {predictions.source}"
         + (" (their logs taken as logits)" if predictions.source == "probabilities" else ""))
    if predictions.zeros:
        _say(f"{predictions.zeros} probabilities are exactly 0: each is a -inf logit (the class ruled out), which the "
             "calibrators take as the row's lowest finite logit minus 104")
    sys.stdout.flush()
    import torch

    from fastai_ls.calibration.calibrators import CALIBRATORS, CalibrationWarning, TemperatureScaling
    from fastai_ls.calibration.calibrators.base import calibration_messages
    from fastai_ls.calibration.compare import compare_on_logits
    from fastai_ls.calibration.scores import target_nll

    logits, targets = torch.from_numpy(predictions.logits), torch.from_numpy(predictions.targets)
    if predictions.target_zeros:
        p_y = TemperatureScaling(1.0)(logits)[torch.arange(n), targets]
        counted = float(target_nll(p_y).max())  # as CalibrationState does
        k = predictions.target_zeros
        rows = f"{k} rows give their" if k > 1 else "1 row gives its"
        _say(f"{rows} target probability 0, an infinite NLL: the 'uncalibrated' row counts {counted:.1f} nats for "
             f"{'each' if k > 1 else 'it'}, so its NLL is a lower bound")
    methods = list(CALIBRATORS) if methods is None else methods
    _say(f"cross-fitted: each method is fitted on {folds - 1} of {folds} stratified folds (seed {seed}) and scored on "
         "the other, in turn, so no row is scored by a calibrator fitted on it; 95% intervals (a bootstrap over the "
         "rows; normal intervals for NLL and Brier):")
    sys.stdout.flush()
    with warnings.catch_warnings(record=True) as caught, quiet_bars(quiet):
        warnings.simplefilter("always", CalibrationWarning)
        table = compare_on_logits(logits, targets, methods=methods, folds=folds, seed=seed)
    if out is not None:  # before the console output, which fails once its reader went away (`| head`)
        table.to_csv(out, mode="w" if force else "x")  # "x": a file that appeared since the check is not replaced
    print(comparison_text(table))
    best = best_method(table)
    _say(f"lowest NLL: {best}" + (" (no method beats the model's own probabilities)" if best == "uncalibrated"
                                  else ""))
    for message in calibration_messages(caught):
        _say(f"warning: {message}", WIDTH, file=sys.stderr)
    if out is not None:
        print(f"wrote {out}")
    return table
