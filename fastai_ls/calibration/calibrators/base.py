"""The calibrator interface: fitted on held-out logits and class ids, a calibrator maps logits to probabilities.

Every calibrator takes (N, C) logits and gives (N, C) probabilities (rows summing to 1), is a plain picklable object
(no lambda, no closure, parameters as CPU tensors) and checks its input the same way:

- `fit` raises a ValueError for logits that are not (N, C) floats with C >= 2, targets that are not N integer class
  ids in [0, C), fewer rows than classes, and rows holding NaN or +inf (a loss reports those rows as NaN: drop them);
  calibrators with parameters per class warn (`CalibrationWarning`) when a class never occurs in the targets;
- calling a calibrator fitted on C classes with another number of classes raises a ValueError; a row holding NaN or
  +inf comes out as NaN (as the loss reports it, and as `CalibrationState` counts it: `n_invalid`);
- a -inf logit (a class the model rules out, or the log of a probability that underflowed to 0) stands for the
  row's smallest finite logit minus 104: its softmax stays 0 in float32 and the order of the classes is kept;
- nothing the caller passes is modified, and the output carries no autograd history.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import ClassVar

import torch
from torch import Tensor

from fastai_ls.calibration.calibrators.row_subset import RowSubset, checked_rows
from fastai_ls.calibration.threads import one_thread
from fastai_ls.validation import check_class_ids, check_logits

__all__ = ["Calibrator", "CalibrationWarning", "calibration_messages", "NEG_INF_GAP", "BLOCK_ELEMENTS",
           "row_blocks", "check_fit_input", "clean_logits"]

# exp(-104) is below float32's smallest positive number (about 1.4e-45): a logit this far below the others of its
# row has probability 0 after softmax, as a -inf logit has.
NEG_INF_GAP = 104.0
# Row blocks of at most this many logits bound the temporaries of a pass over (N, C) logits (8 MB in float64): the
# checks, the fits that upcast block by block and every call of a calibrator work through them, so that memory stays
# a few copies of the logits in their own dtype at any N (a 200,000 x 1,000 file, 800 MB in float32, held float64
# copies and temporaries of several GB when each step took all rows at once).
BLOCK_ELEMENTS = 2**20


def row_blocks(n: int, n_classes: int, elements: int | None = None) -> list[slice]:
    """Consecutive row slices covering `n` rows, each of at most `elements` logits (one row at least).

    Parameters
    ----------
    n : int
        Rows.
    n_classes : int
        Columns per row.
    elements : int, optional
        Logits per block; None for `BLOCK_ELEMENTS` (memory-bound passes). Passes that go over each block many
        times take smaller blocks, so that its float64 temporaries stay in the cache.

    Examples
    --------
    >>> row_blocks(5, 2**19)
    [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    step = max(1, (BLOCK_ELEMENTS if elements is None else elements) // max(n_classes, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


# A fit takes hundreds of small steps (LBFGS on (N, C) logits, matrix products of N x C by C x C). On a CPU, MKL and
# OpenMP spread even a 1000 x 5 matrix product over every core, and on cores busy with other work each step then
# waits for the slowest thread: on 2 busy cores a 1000 x 5 product took 16 ms on 2 threads and 0.01 ms on one, and a
# Dirichlet fit 6-12 s against 0.4 s. CPU fits up to this much work per pass (N * C, times C for a calibrator whose
# passes are matrix products) use one thread.
ONE_THREAD_WORK = 2**27


@contextlib.contextmanager
def one_thread_for_small_cpu_fits(logits: Tensor, quadratic: bool = True):
    """Within the block, one intra-op thread if `logits` is a small CPU problem (see ONE_THREAD_WORK; `quadratic`
    for passes of N * C * C work, else N * C); the previous number of threads afterwards."""
    n, n_classes = logits.shape
    work = n * n_classes * (n_classes if quadratic else 1)
    if logits.device.type != "cpu" or torch.get_num_threads() == 1 or work > ONE_THREAD_WORK:
        yield
        return
    with one_thread():  # the process's thread count, saved and restored once however many threads fit at a time
        yield


class CalibrationWarning(UserWarning):
    """A fit that ran but whose result needs attention: a temperature at its bound, classes missing from the
    held-out targets, classes too small for the folds of a comparison."""


def calibration_messages(caught: list[warnings.WarningMessage]) -> list[str]:
    """The messages of the `CalibrationWarning`s among warnings recorded by `warnings.catch_warnings(record=True)`,
    in order; every other recorded warning is issued again as it was (its category, file and line), so that
    recording a fit's warnings to report them hides nothing else.

    Parameters
    ----------
    caught : list of warnings.WarningMessage
        The recorded warnings.

    Returns
    -------
    list of str

    Examples
    --------
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warnings.warn("T at its bound", CalibrationWarning)
    >>> calibration_messages(caught)
    ['T at its bound']
    """
    for w in caught:
        if not issubclass(w.category, CalibrationWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return [str(w.message) for w in caught if issubclass(w.category, CalibrationWarning)]


def clean_logits(logits: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(z, bad): the logits in `dtype` with each -inf replaced as the module docstring says, and the (N,) rows that
    hold NaN or +inf (or no finite logit at all), which are set to 0 in `z`. `logits` itself is never written.

    Parameters
    ----------
    logits : Tensor
        (N, C) logits.
    dtype : torch.dtype
        The dtype of `z`.

    Examples
    --------
    >>> z, bad = clean_logits(torch.tensor([[0.0, -math.inf], [math.nan, 1.0]]), torch.float64)
    >>> z.tolist(), bad.tolist()
    ([[0.0, -104.0], [0.0, 0.0]], [False, True])
    """
    z = logits.detach().to(dtype)
    # A fixed sequence of kernels whatever the values: nothing here waits for the device (a calibrator may run
    # inside CalibrationCallback's per-batch update).
    finite = z.isfinite()
    bad = (z.isnan() | (z == math.inf)).any(1) | ~finite.any(1)
    lowest = torch.where(finite, z, math.inf).amin(1, keepdim=True)
    z = torch.where(finite, z, lowest - NEG_INF_GAP)
    return torch.where(bad[:, None], 0.0, z), bad


def _call_dtype(logits: Tensor) -> torch.dtype:
    """The dtype a calibrator computes and answers in for these logits: float64 for float64, else float32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def check_fit_input(logits: Tensor, target: Tensor, upcast: bool = True,
                    rows: Tensor | None = None) -> tuple[Tensor | RowSubset, Tensor]:
    """Clean logits (-inf replaced) and int64 targets on the logits' device, or a ValueError naming the problem
    (the checks of `Calibrator.fit`, listed in the module docstring). The logits come in float64 with `upcast`,
    else in the dtype that calling a calibrator uses (float32, or float64 for float64 logits): the logits
    themselves (detached, never to be written) when they need no cleaning, or with `rows` a `RowSubset` of them.

    Parameters
    ----------
    logits : Tensor
        (N, C) held-out logits.
    target : Tensor
        (N,) class ids.
    upcast : bool
        Return the logits in float64 (a copy of float32 logits; False: checks without a float64 copy).
    rows : Tensor, optional
        (M,) indices of the rows to check and return (the targets of those rows; the logits as a `RowSubset`
        unless `upcast` or cleaning copies them).
    """
    check_logits(logits)
    n, n_classes = logits.shape
    check_class_ids(target, n, rows="logits", column=False)  # shape and dtype: the values once on the logits' device
    if n < n_classes:
        raise ValueError(f"need at least as many held-out rows as classes to fit a calibrator, got {n} rows for "
                         f"{n_classes} classes")
    # The ids of every row, so that a bad one is named by its position in `logits` also when fitting on `rows`.
    target = check_class_ids(target.to(logits.device), n, n_classes, rows="logits", column=False,
                             fix="drop ignored rows before fitting")
    positions = None
    if rows is not None:
        positions = rows = checked_rows(rows, n, logits.device)
        target, n = target[rows], len(rows)
        if n < n_classes:
            raise ValueError(f"need at least as many held-out rows as classes to fit a calibrator, got {n} rows "
                             f"for {n_classes} classes")
        if upcast:  # the float64 copy of the rows is made anyway
            logits, rows = logits.detach()[rows], None
    # -inf is replaced in the dtype that calling the calibrator uses (float64 or float32), then the fit runs in
    # float64: the calibrator then sees the same substitute logits when it is fitted and when it is called.
    z, bad = _clean_in_blocks(logits if rows is None else RowSubset(logits.detach(), rows), _call_dtype(logits))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        first = i if positions is None else int(positions[i])
        raise ValueError(f"logits hold NaN or +inf (or no finite value) in {int(bad.sum())} of {n} rows (first: "
                         f"row {first}); a calibrator cannot be fitted on them: drop those rows (the loss reports them "
                         "as NaN)")
    return (z.double() if upcast else z), target


def _clean_in_blocks(logits: Tensor | RowSubset, dtype: torch.dtype) -> tuple[Tensor | RowSubset, Tensor]:
    """`clean_logits` row block by row block (it works row by row: the same values), with temporaries of one
    block only; the logits themselves (detached, or the `RowSubset`) when they are in `dtype` and all finite
    (nothing to clean)."""
    logits = logits.detach() if isinstance(logits, Tensor) else logits
    blocks = row_blocks(*logits.shape)
    if logits.dtype == dtype and all(bool(logits[rows].isfinite().all()) for rows in blocks):
        return logits, torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
    if len(blocks) == 1:
        return clean_logits(logits[blocks[0]], dtype)
    z = torch.empty(logits.shape, dtype=dtype, device=logits.device)
    bad = torch.empty(len(logits), dtype=torch.bool, device=logits.device)
    for rows in blocks:
        z[rows], bad[rows] = clean_logits(logits[rows], dtype)
    return z, bad


def _moved(value, device: torch.device | str):
    """`value` with its tensors on `device`: a tensor, a list of values, or an object with a `to(device)` method
    (a calibrator, a curve), which is moved in place."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_moved(v, device) for v in value]
    if hasattr(value, "__dict__") and callable(getattr(value, "to", None)):
        return value.to(device)
    return value


class Calibrator:
    """A post-hoc calibrator: `fit(logits, target)` on held-out data, then `calibrator(logits)` gives probabilities.

    Subclasses set the class attributes below and implement `_fit(z, y)` (float64 logits, or with
    `upcasts_in_blocks` the clean logits in their call dtype, or a `RowSubset` of them, read a block of rows at a
    time; int64 ids; both checked and never to be written) and
    `_probs(z)` (clean logits in float32 or float64 on the caller's device, a block of rows at a time).

    Examples
    --------
    >>> from fastai_ls.calibration.calibrators import TemperatureScaling
    >>> _ = torch.manual_seed(0); z = torch.randn(500, 4); y = torch.distributions.Categorical(logits=z).sample()
    >>> probs = TemperatureScaling().fit(3 * z, y)(3 * z)
    >>> probs.shape, bool(torch.allclose(probs.sum(1), torch.ones(500)))
    (torch.Size([500, 4]), True)
    """

    name: ClassVar[str] = ""  # the registry's key, e.g. 'temperature'
    description: ClassVar[str] = ""  # one line for tables and --help
    form: ClassVar[str] = ""  # 'full', 'one-vs-rest' or 'top-label'
    may_change_prediction: ClassVar[bool] = True  # whether the argmax of the output can differ from the logits'
    per_class: ClassVar[bool] = False  # parameters per class: warn when a class is missing from the targets
    quadratic_work: ClassVar[bool] = False  # whether a pass of the fit costs N * C * C (matrix products), not N * C
    # whether `_fit` takes the clean logits in their call dtype and upcasts them to float64 row block by row block
    # (the same numbers without a float64 copy of all rows)
    upcasts_in_blocks: ClassVar[bool] = False

    def __init__(self) -> None:
        """An unfitted calibrator."""
        self.n_classes: int | None = None

    @property
    def fitted(self) -> bool:
        """Whether the calibrator can be called."""
        return self.n_classes is not None

    def fit(self, logits: Tensor, target: Tensor, rows: Tensor | None = None) -> Calibrator:
        """Fit on held-out (N, C) `logits` and their (N,) class ids `target`; returns the calibrator itself.

        Parameters
        ----------
        logits : Tensor
            (N, C) logits of held-out data (any float dtype and device; fitted in float64).
        target : Tensor
            (N,) integer class ids in [0, C).
        rows : Tensor, optional
            (M,) indices of the rows to fit on: the same fit as on `logits[rows]`, `target[rows]`, without copying
            those rows where the calibrator reads them a block at a time (`upcasts_in_blocks`).
        """
        z, y = check_fit_input(logits, target, upcast=not self.upcasts_in_blocks, rows=rows)
        reason = self.skip_reason(*z.shape)
        if reason is not None:
            raise ValueError(f"{self.name}: {reason}")
        if self.per_class:
            missing = sorted(set(range(z.shape[1])) - set(torch.unique(y).tolist()))
            if missing:
                shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
                warnings.warn(f"{self.name}: {len(missing)} of {z.shape[1]} classes never occur in the held-out "
                              f"targets ({shown}); their calibrated probabilities are fitted towards 0",
                              CalibrationWarning, stacklevel=2)
        with torch.enable_grad(), one_thread_for_small_cpu_fits(z, self.quadratic_work):
            self._fit(z, y)
        self.n_classes = z.shape[1]
        return self

    def __call__(self, logits: Tensor) -> Tensor:
        """(N, C) probabilities for (N, C) `logits` (float32, or float64 for float64 logits) on their device.

        Parameters
        ----------
        logits : Tensor
            (N, C) logits with the C classes of the fit; a row holding NaN or +inf gives a row of NaN.
        """
        if not self.fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(logits, target) first")
        check_logits(logits)
        if self.n_classes is not None and logits.shape[1] != self.n_classes:
            raise ValueError(f"{type(self).__name__} was fitted on {self.n_classes} classes, got logits with "
                             f"{logits.shape[1]}")
        dtype = _call_dtype(logits)
        blocks = row_blocks(*logits.shape)
        if len(blocks) == 1:
            return self._block_probs(logits, dtype)
        # Row by row (every calibrator maps each row on its own), so in blocks: the float64 temporaries of a block,
        # not of all rows.
        probs = torch.empty(logits.shape, dtype=dtype, device=logits.device)
        for rows in blocks:
            probs[rows] = self._block_probs(logits[rows], dtype)
        return probs

    def _block_probs(self, logits: Tensor, dtype: torch.dtype) -> Tensor:
        z, bad = clean_logits(logits, dtype)
        with torch.no_grad():
            probs = self._probs(z).to(dtype)
        return torch.where(bad[:, None], math.nan, probs)

    def to(self, device: torch.device | str) -> Calibrator:
        """Move the fitted parameters to `device` (in place; returns the calibrator). Calling a calibrator on
        logits of another device works too, at the cost of a copy per call.

        Parameters
        ----------
        device : torch.device | str
            Where the parameters go, e.g. 'cuda'.
        """
        for name, value in vars(self).items():
            setattr(self, name, _moved(value, device))
        return self

    def skip_reason(self, n_rows: int, n_classes: int) -> str | None:
        """Why fitting on `n_rows` rows of `n_classes` classes would take too long for what it could learn (then
        `fit` raises a ValueError with the reason and `compare_calibrators` skips the method with a
        `CalibrationWarning`), or None.

        Parameters
        ----------
        n_rows : int
            Rows of the fit.
        n_classes : int
            C.
        """
        return None

    def _fit(self, z: Tensor, y: Tensor) -> None:
        raise NotImplementedError

    def _probs(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def _params_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        state = self._params_repr() if self.fitted else "unfitted"
        return f"{type(self).__name__}({state})"
