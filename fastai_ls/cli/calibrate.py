"""`fastai-ls calibrate PREDICTIONS.npz`: which post-hoc calibrator suits these predictions? The cross-fitted
comparison of `compare_calibrators`, on outputs saved by any framework.

The file is a numpy `.npz` archive (`numpy.savez`) holding two arrays:

- `logits`: (N, C) floats, the raw scores before the softmax (a -inf logit rules a class out; NaN and +inf are
  refused), **or** `probabilities`: (N, C) rows of softmax probabilities, each in [0, 1] and summing to 1 within
  2% (`fastai_ls.calibration.checks.SUM_TOLERANCE`, as everywhere in fastai_ls; rows that miss 1 by more than
  1e-3, e.g. saved in half precision or with a few decimals, are divided by their sums, with a warning).
  Probabilities are turned into logits by their log: a probability of exactly 0 becomes a -inf logit, which the
  calibrators accept (see `fastai_ls.calibration.calibrators.base`). Give one of the two, not both.
- `targets`: (N,) integer class ids in [0, C) (floats holding whole numbers are accepted).

From fastai: `fastai_ls.save_predictions(learn, "valid.npz")` writes the raw logits and targets of the validation
set (or of `dl=`). Anywhere else: `np.savez("valid.npz", logits=logits, targets=targets)`.
"""

from __future__ import annotations

import math
import os
import stat
import sys
import textwrap
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["Predictions", "read_predictions", "check_csv_path", "check_folds", "quiet_bars", "comparison_text",
           "calibrate"]

WIDTH = 110  # explanatory lines are wrapped to this many characters
# The columns of a comparison table shown on the console, with their headers.
SHOWN = {"error_rate": "error rate", "ece": "ECE", "smece": "smooth ECE", "nll": "NLL", "brier": "Brier",
         "aurc": "AURC"}


@dataclass
class Predictions:
    """Held-out predictions read from a file (see the module docstring for the format).

    Parameters
    ----------
    logits : numpy.ndarray
        (N, C) float32 or float64 logits (the log of the probabilities when the file held those).
    targets : numpy.ndarray
        (N,) int64 class ids.
    source : str
        'logits' or 'probabilities': what the file held.
    zeros : int
        Probabilities of exactly 0 in the file (each now a -inf logit).
    target_zeros : int
        Rows whose target had probability 0: their uncalibrated NLL is infinite.
    """

    logits: np.ndarray
    targets: np.ndarray
    source: str
    zeros: int = 0
    target_zeros: int = 0


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip file's first bytes (the second: an empty archive)
_NPY_MAGIC = b"\x93NUMPY"  # a single array saved by np.save
_SAVE_HINT = "save one with np.savez(path, logits=..., targets=...)"
_SHOWN_NAMES = 5  # an error lists at most this many of an archive's names
# deflate cannot shrink data more than about 1032 to 1: a member whose header declares more bytes than that is damaged
# or forged, and is refused before it is decompressed
_MAX_DEFLATE_RATIO = 1032


def _first_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _names(names: list[str]) -> str:
    """An archive's array names for an error message: all of a few, the first few of many."""
    if not names:
        return "no arrays"
    shown = ", ".join(names[:_SHOWN_NAMES])
    return shown if len(names) <= _SHOWN_NAMES else f"{len(names)} arrays: {shown}, ..."


def _check_file(path: Path) -> None:
    """A regular file, or an OSError saying what it is instead (a FIFO would block the read forever)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise OSError(f"{path}: no such file") from None
    if stat.S_ISDIR(mode):
        raise OSError(f"{path} is a folder, not an .npz file")
    if not stat.S_ISREG(mode):
        what = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else \
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"
        raise OSError(f"{path} is {what}, not an .npz file: save the predictions to a file")


def _header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, name: str) -> tuple[tuple, np.dtype]:
    """The shape and dtype that a member's .npy header declares, read without decompressing the data."""
    try:
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
    except Exception as err:  # a wrong magic string, a damaged header, a damaged zip entry
        raise ValueError(f"{path}: array {name!r} is not .npy data ({err}); {_SAVE_HINT}") from None
    if dtype.hasobject:  # object arrays need pickle, which is refused: a file can run code
        raise ValueError(f"{path}: cannot read array {name!r}: it holds Python objects (dtype object), which only "
                         "pickle can load, and a pickle can run code, so it is never loaded here; save numeric "
                         "arrays")
    declared = math.prod(shape) * dtype.itemsize
    if declared > info.file_size or declared > _MAX_DEFLATE_RATIO * max(info.compress_size, 1) + 1024:
        raise ValueError(f"{path}: array {name!r} declares shape {shape} ({dtype}, {declared:,} bytes), more than its "
                         f"{info.compress_size:,} bytes in the archive can hold: the file is damaged; {_SAVE_HINT}")
    return shape, dtype


def _check_declared(path: Path, source: str, scores: tuple[tuple, np.dtype], targets: tuple[tuple, np.dtype]) -> None:
    """The shapes and dtypes of the two arrays, from their headers: checked before any data is decompressed."""
    (shape, dtype), (target_shape, target_dtype) = scores, targets
    if dtype.kind not in "fiu":
        raise ValueError(f"{path}: '{source}' must hold real numbers, got dtype {dtype}")
    if len(shape) != 2 or shape[1] < 2 or shape[0] < 1:
        raise ValueError(f"{path}: '{source}' must be (N, C) with one row per prediction and C >= 2 classes, got "
                         f"shape {shape}")
    n = shape[0]
    if target_shape == shape:
        raise ValueError(f"{path}: 'targets' must be ({n},) class ids, got shape {target_shape} (one-hot? save "
                         "targets.argmax(1))")
    if target_shape != (n,):
        raise ValueError(f"{path}: 'targets' must be ({n},) class ids, one per row of '{source}', got shape "
                         f"{target_shape}")
    if target_dtype.kind not in "fiu":
        raise ValueError(f"{path}: 'targets' must be integer class ids, got dtype {target_dtype}")
    memory = _physical_memory()
    declared = math.prod(shape) * dtype.itemsize + n * target_dtype.itemsize
    if memory is not None and declared > memory:
        raise ValueError(f"{path} declares {_size(declared)} of arrays ('{source}' {shape} {dtype}), more than this "
                         f"machine's {_size(memory)} of memory")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else \
        f"{nbytes:,} bytes"


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not on every platform
        return None


def _torch_file(names: list[str]) -> bool:
    """torch.save's zip format: a folder holding data.pkl (the pickled object) and the tensors' storages."""
    return any(name == "data.pkl" or name.endswith("/data.pkl") for name in names)


def _load(path: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """The file's source ('logits' or 'probabilities'), its scores and its targets: only those two members are
    decompressed, once their headers passed `_check_declared`."""
    _check_file(path)
    # Tell what the file is before numpy does: for anything that is neither a zip nor an .npy file, numpy's own
    # message says "pickled (object) data" and suggests loading it with pickle, which can run code.
    with open(path, "rb") as file:
        head = file.read(len(_NPY_MAGIC))
    if head.startswith(_NPY_MAGIC):
        raise ValueError(f"{path} holds a single array, not an .npz archive of named arrays; {_SAVE_HINT}")
    if not head.startswith(_ZIP_MAGIC):
        what = "the file is empty" if not head else \
            "a pickle, which is never loaded here: it can run code" if head.startswith(b"\x80") else \
            f"it starts with {head!r}, where an .npz archive, a zip file, starts with b'PK'"
        raise ValueError(f"{path} is not a numpy .npz archive ({what}); {_SAVE_HINT}")
    try:
        archive = zipfile.ZipFile(path)
    except Exception as err:  # zipfile.BadZipFile, or OSError/EOFError from a truncated file
        raise ValueError(f"cannot read {path} as a numpy .npz archive ({type(err).__name__}: {err}); "
                         f"{_SAVE_HINT}") from None
    with archive:
        infos = archive.infolist()
        if _torch_file([info.filename for info in infos]):
            raise ValueError(f"{path} is a PyTorch file (torch.save), not a numpy .npz archive; it is never loaded "
                             "here (unpickling can run code). Save the predictions with np.savez(path, "
                             "logits=logits.numpy(), targets=targets.numpy()), or from fastai with "
                             "fastai_ls.save_predictions(learn, 'valid.npz')")
        stored = {}
        for info in infos:  # np.savez names each member <name>.npy; np.load drops the suffix, and so do we
            stored.setdefault(info.filename.removesuffix(".npy"), []).append(info)
        for name in ("logits", "probabilities", "targets"):
            # np.load reads one of them, and which depends on how it is asked: the file has no single meaning
            if len(stored.get(name, [])) > 1:
                raise ValueError(f"{path} holds {len(stored[name])} arrays named {name!r} ("
                                 f"{_names([info.filename for info in stored[name]])}), of which np.load reads "
                                 f"one and this command another; {_SAVE_HINT}")
        members = {name: found[0] for name, found in stored.items()}
        names = list(members)
        present = [name for name in ("logits", "probabilities") if name in members]
        if len(present) == 2:
            raise ValueError(f"{path} holds both 'logits' and 'probabilities': keep one (logits if you have them: a "
                             "softmax rounds small probabilities to 0)")
        if not present:
            raise ValueError(f"{path} needs an array 'logits' or 'probabilities' beside 'targets' (it holds: "
                             f"{_names(names)})")
        if "targets" not in members:
            raise ValueError(f"{path} needs an array 'targets' of class ids (it holds: {_names(names)})")
        source = present[0]
        headers = {name: _header(archive, members[name], path, name) for name in (source, "targets")}
        _check_declared(path, source, headers[source], headers["targets"])
        arrays = {}
        for name in (source, "targets"):
            try:
                with archive.open(members[name]) as member:
                    arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
            except MemoryError:
                raise
            except Exception as err:  # the data ends early, or the zip entry is damaged
                raise ValueError(f"{path}: cannot read array {name!r} ({type(err).__name__}: {err})") from None
    return source, arrays[source], arrays["targets"]


def _bad_logit_rows(logits: np.ndarray) -> np.ndarray:
    """(N,) rows holding NaN or +inf or no finite value, checked a block of rows at a time: the boolean
    temporaries of all rows would add a quarter of a float32 file's size each (200 MB each at 200,000 x 1,000)."""
    step = max(1, 2**22 // logits.shape[1])
    parts = []
    for start in range(0, len(logits), step):
        block = logits[start:start + step]
        parts.append(np.isnan(block).any(1) | (block == np.inf).any(1) | ~np.isfinite(block).any(1))
    return np.concatenate(parts)


def read_predictions(path: str | Path) -> Predictions:
    """Read and check held-out predictions saved as the module docstring describes; anything else is a ValueError
    (or OSError) naming the file and the problem.

    Parameters
    ----------
    path : str or Path
        An `.npz` file with `logits` or `probabilities`, and `targets`.

    Returns
    -------
    Predictions

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> np.savez(folder / "p.npz", probabilities=np.array([[0.9, 0.1], [0.0, 1.0]]), targets=np.array([0, 0]))
    >>> p = read_predictions(folder / "p.npz")
    >>> p.source, p.logits[1].tolist(), p.zeros, p.target_zeros
    ('probabilities', [-inf, 0.0], 1, 1)
    """
    path = Path(path)
    source, scores, targets = _load(path)
    n, n_classes = scores.shape
    if targets.dtype.kind == "f":
        whole = np.isfinite(targets) & (targets == np.round(targets))
        if not whole.all():
            i = _first_row(~whole)
            raise ValueError(f"{path}: 'targets' must be integer class ids, got {targets[i].item()!r} in row {i}")
    outside = (targets < 0) | (targets >= n_classes)
    if outside.any():
        i = _first_row(outside)
        low, high = targets.min().item(), targets.max().item()
        if low >= 1 and high == n_classes:  # e.g. class ids counted from 1
            hint = f"they look 1-based (from {low!r} to {high!r}): save targets - 1"
        else:
            hint = "; ".join(([f"drop ignored rows (such as {low!r}) before saving"] if low < 0 else []) +
                             ([f"give '{source}' one column per class"] if high >= n_classes else []))
        raise ValueError(f"{path}: 'targets' must be class ids in [0, {n_classes}), but {int(outside.sum())} of {n} "
                         f"are not (first: {targets[i].item()!r} in row {i}); {hint}")
    targets = targets.astype(np.int64)

    if scores.dtype.kind == "f" and scores.dtype.itemsize > 8:  # np.longdouble: float64 holds all but its extremes
        with np.errstate(invalid="ignore"):
            beyond = np.isfinite(scores) & (np.abs(scores) > np.finfo(np.float64).max)
        if beyond.any():
            i = _first_row(beyond.any(1))
            raise ValueError(f"{path}: '{source}' are {scores.dtype} with values beyond float64's range in "
                             f"{int(beyond.any(1).sum())} of {n} rows (first: row {i}); save them as float64")
    # float16 and integers: float32; float64 and wider: float64
    dtype = np.float64 if scores.dtype.kind == "f" and scores.dtype.itemsize >= 8 else np.float32
    scores = scores.astype(dtype, copy=False)
    if source == "logits":
        bad = _bad_logit_rows(scores)
        if bad.any():
            i = _first_row(bad)
            raise ValueError(f"{path}: 'logits' hold NaN or +inf (or no finite value) in {int(bad.sum())} of {n} "
                             f"rows (first: row {i}); drop those rows")
        return Predictions(scores, targets, source)

    finite = np.isfinite(scores).all(1)
    if not finite.all():
        i = _first_row(~finite)
        raise ValueError(f"{path}: 'probabilities' hold NaN or inf in {int((~finite).sum())} of {n} rows (first: "
                         f"row {i}); drop those rows")
    import torch  # here, not at the top: a file that fails the checks above is refused without loading torch

    from fastai_ls.calibration.checks import checked_probabilities

    # The check of every entry point, with its one tolerance (its warning points at the caller of this function).
    scores = checked_probabilities(torch.from_numpy(scores if scores.flags.writeable else scores.copy()),
                                   f"{path}: 'probabilities'", "for scores before the softmax, save them as 'logits'",
                                   stacklevel=3).numpy()
    zero = scores == 0
    with np.errstate(divide="ignore"):
        logits = np.log(scores)
    return Predictions(logits, targets, source, zeros=int(zero.sum()),
                       target_zeros=int(zero[np.arange(n), targets].sum()))


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


def check_folds(n: int, n_classes: int, folds: int) -> None:
    """A ValueError naming `--folds` unless `folds` cross-fitting folds of `n` rows leave every calibrator at least
    `n_classes` rows to fit on (all folds but the largest), checked before any fit runs.

    Parameters
    ----------
    n : int
        Rows of the predictions.
    n_classes : int
        Classes (columns of the logits).
    folds : int
        Cross-fitting folds (`--folds`).

    Examples
    --------
    >>> check_folds(12, 10, 5)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: --folds 5 fits each calibrator on 4 of the 5 folds, 9 of the 12 rows, ...: use --folds 6 or more
    """
    if n <= n_classes:
        raise ValueError(f"{n} rows for {n_classes} classes: each calibrator is fitted on all folds but one, which "
                         f"needs at least as many rows as classes, so at least {n_classes + 1} rows")
    if folds > n:
        raise ValueError(f"--folds {folds} is more than the {n} rows: use at most --folds {n}")
    fitted = n - -(-n // folds)  # the stratified folds differ by at most one row: all but the largest
    if fitted < n_classes:
        raise ValueError(f"--folds {folds} fits each calibrator on {folds - 1} of the {folds} folds, {fitted} of the "
                         f"{n} rows, fewer than the {n_classes} classes: use --folds {-(-n // (n - n_classes))} or "
                         "more")


@contextmanager
def quiet_bars(quiet: bool) -> Iterator[None]:
    """fastprogress's bars off inside the block when `quiet` (fastai's training and long comparisons use them);
    the tables it prints still are.

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

    previous, fastprogress.NO_BAR = fastprogress.NO_BAR, True
    try:
        yield
    finally:
        fastprogress.NO_BAR = previous


def _say(text: str, width: int = WIDTH, file=None) -> None:
    print(textwrap.fill(text, width, subsequent_indent="  " if text.startswith("warning:") else ""), file=file)


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
    check_folds(n, n_classes, folds)
    # Printed (and flushed, for a log or a pipe) as soon as known: the comparison takes seconds to minutes.
    _say(f"{path}: {n} rows, {n_classes} classes, {predictions.source}"
         + (" (their logs taken as logits)" if predictions.source == "probabilities" else ""))
    if predictions.zeros:
        _say(f"{predictions.zeros} probabilities are exactly 0: each is a -inf logit (the class ruled out), which the "
             "calibrators take as the row's lowest finite logit minus 104")
    sys.stdout.flush()
    import torch

    from fastai_ls.calibration.best_calibrator import best_method
    from fastai_ls.calibration.calibrators import CALIBRATORS, CalibrationWarning, TemperatureScaling
    from fastai_ls.calibration.calibrators.base import calibration_messages
    from fastai_ls.calibration.compare import compare_calibrators
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
        table = compare_calibrators(logits, targets, methods=methods, folds=folds, seed=seed)
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


def __getattr__(name: str):
    """`best_method`, which moved to `fastai_ls.calibration.best_calibrator`, with a FutureWarning (one release)."""
    if name == "best_method":
        from fastai_ls._deprecation import warn_renamed
        from fastai_ls.calibration.best_calibrator import best_method

        warn_renamed("fastai_ls.cli.calibrate.best_method", "fastai_ls.calibration.best_calibrator.best_method")
        return best_method
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
