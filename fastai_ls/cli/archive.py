"""The predictions file of `fastai-ls calibrate` and `fastai-ls selective`, read and checked: every problem is a
ValueError (or OSError) naming the file, found from the archive's headers before any array is decompressed where it
can be, and nothing in the file is unpickled.

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
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Predictions", "read_predictions"]


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
