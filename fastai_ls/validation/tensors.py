"""The checks that need torch: tensors taken in as plain `torch.Tensor`s, in a dtype that the arithmetic can be done
in, and integer class ids by one check (`check_class_ids`)."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

__all__ = ["plain", "compute_dtype", "upcast", "check_logits", "is_class_id_dtype", "checked_ignore_index",
           "check_class_ids"]


def plain(t: Tensor) -> Tensor:
    """`t` as a plain `torch.Tensor`: fastai's subclasses (`TensorCategory`...) send every operation through Python
    dispatch, which costs more than the whole loss at small sizes. The autograd history is kept. torch's own
    `as_subclass`, not fastai's override of it, which also copies the subclass's metadata (3x the time).

    Parameters
    ----------
    t : Tensor
        A tensor, of any subclass.

    >>> type(plain(torch.nn.Parameter(torch.zeros(1)))).__name__
    'Tensor'
    """
    return t if type(t) is Tensor else Tensor.as_subclass(t, Tensor)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision logits (the smoothing term sums C logits and overflows float16), else `dtype`.

    Parameters
    ----------
    dtype : torch.dtype
        The dtype of the logits.

    >>> compute_dtype(torch.bfloat16), compute_dtype(torch.float64)
    (torch.float32, torch.float64)
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def upcast(x: Tensor) -> Tensor:
    """`x` in its `compute_dtype` (`x` itself, not a copy, when that is its own dtype).

    Parameters
    ----------
    x : Tensor
        A floating point tensor.

    >>> upcast(torch.ones(2, dtype=torch.float16)).dtype
    torch.float32
    """
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def check_logits(logits: Tensor, name: str = "logits", min_rows: int = 0) -> None:
    """A TypeError unless `logits` is a tensor, a ValueError unless it is (N, C) floating point with C >= 2 classes
    (and N >= `min_rows` rows). Reads shapes and dtypes only, never values.

    Parameters
    ----------
    logits : Tensor
        The logits.
    name : str
        What to call them in messages.
    min_rows : int
        The fewest rows allowed.

    >>> check_logits(torch.zeros(4, 1))
    Traceback (most recent call last):
    ValueError: logits must be (N, C) with C >= 2 classes, got shape (4, 1)
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[1] < 2 or logits.shape[0] < min_rows:
        rows = f" N >= {min_rows} rows and" if min_rows else ""
        raise ValueError(f"{name} must be (N, C) with{rows} C >= 2 classes, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {logits.dtype}")


def is_class_id_dtype(dtype: torch.dtype) -> bool:
    """Whether tensors of `dtype` hold class ids: every integer dtype; bool (True would be class 1), floating point
    and complex ones do not.

    Parameters
    ----------
    dtype : torch.dtype
        A tensor's dtype.

    >>> is_class_id_dtype(torch.uint8), is_class_id_dtype(torch.bool), is_class_id_dtype(torch.complex64)
    (True, False, False)
    """
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def checked_ignore_index(ignore_index: int | None) -> int | None:
    """`ignore_index` as a Python int (None stays None), after a ValueError unless it is an integer that an int64
    class id can equal: a bool or a float would match ids silently (True is class 1), and one beyond int64 was an
    OverflowError from the comparison.

    Parameters
    ----------
    ignore_index : int, optional
        A target value that marks rows to skip; a 0-dimensional integer tensor is taken as its value.

    >>> checked_ignore_index(-100)
    -100
    >>> checked_ignore_index(1.5)
    Traceback (most recent call last):
    ValueError: ignore_index must be an int (a target value that marks rows to skip), got 1.5
    """
    if ignore_index is None:
        return None
    if isinstance(ignore_index, Tensor) and ignore_index.dim() == 0 and is_class_id_dtype(ignore_index.dtype):
        ignore_index = int(ignore_index)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise ValueError(f"ignore_index must be an int (a target value that marks rows to skip), got {ignore_index!r}")
    info = torch.iinfo(torch.int64)
    if not info.min <= ignore_index <= info.max:
        raise ValueError(f"ignore_index must be an int64 value, in [-2**63, 2**63), got {ignore_index}")
    return int(ignore_index)


def check_class_ids(target: Tensor, n_rows: int, n_classes: int | None = None, ignore_index: int | None = None, *,
                    name: str = "target", rows: str = "probs", column: bool = True, fix: str | None = None) -> Tensor:
    """`target` as (N,) int64 class ids, after an error naming the problem: the one check of integer class ids.

    Refused, in this order: anything but a tensor (TypeError); a bool, floating point or complex dtype
    (`is_class_id_dtype`); a shape other than (N,) (or (N, 1) with `column`); with `n_classes`, a value outside
    [0, `n_classes`) that is not `ignore_index`. Every integer dtype is accepted; uint64 values from 2**63 on, which
    int64 cannot hold, become int64's largest value (out of range for any C) rather than negative ids that an
    ignore_index of -100 could match. Without `n_classes` no value is read (no host synchronisation on a GPU).

    Parameters
    ----------
    target : Tensor
        The class ids.
    n_rows : int
        N, the rows of the predictions.
    n_classes : int, optional
        C: check that every id is in [0, C) (reads the values).
    ignore_index : int, optional
        A target value that marks rows to skip; it need not be a class id (`checked_ignore_index`).
    name : str
        What to call `target` in messages.
    rows : str
        What to call the predictions in messages.
    column : bool
        Accept (N, 1) targets (fastai's tabular targets), and say in the message what to pass instead of a wrong
        shape or dtype (one-hot, soft, float targets).
    fix : str, optional
        What an out-of-range message tells the user to do; with it the message counts and locates the first id
        outside [0, C) ("target holds 1 class ids outside [0, 3) (first: 3 in row 1); `fix`"), without it it counts
        them ("1 targets are not class ids in [0, 3) (e.g. 3)").

    Returns
    -------
    Tensor
        (N,) int64 class ids on `target`'s device, detached; the caller's tensor is not changed.

    Examples
    --------
    >>> check_class_ids(torch.tensor([[2], [0]], dtype=torch.int8), 2)
    tensor([2, 0])
    >>> check_class_ids(torch.tensor([0, 3]), 2, n_classes=3)
    Traceback (most recent call last):
    ValueError: 1 targets are not class ids in [0, 3) (e.g. 3)
    >>> check_class_ids(torch.tensor([0.0, 1.0]), 2, rows="logits", column=False)
    Traceback (most recent call last):
    ValueError: target must hold 2 integer class ids (one per row of logits), got torch.float32 (2,)
    """
    if not isinstance(target, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(target).__name__}")
    shape = tuple(target.shape)
    dtype_ok = is_class_id_dtype(target.dtype)
    if not column:
        if not dtype_ok or shape != (n_rows,):
            raise ValueError(f"{name} must hold {n_rows} integer class ids (one per row of {rows}), got "
                             f"{target.dtype} {shape}")
    else:
        one_hot = len(shape) == 2 and shape[0] == n_rows and shape[1] > 1
        if not dtype_ok:
            what = f"for one-hot or soft targets pass {name}.argmax(1)" if one_hot else \
                f"pass {name}.long() if they hold whole numbers"
            raise ValueError(f"{name} must hold {n_rows} integer class ids, got {target.dtype} {shape}: {what}")
        if shape not in ((n_rows,), (n_rows, 1)):
            what = f"one-hot targets? pass {name}.argmax(1)" if one_hot else \
                f"pass {name}.reshape(-1)" if target.numel() == n_rows else f"one per row of {rows}"
            raise ValueError(f"{name} must hold {n_rows} integer class ids, shape ({n_rows},) or ({n_rows}, 1), got "
                             f"{target.dtype} {shape}: {what}")
    # int64 for every integer dtype: gather takes no other, and uint16/32/64 have no comparison kernels on the CPU.
    ids = target.detach().reshape(-1).long()
    if target.dtype == torch.uint64:
        ids = torch.where(ids < 0, _BEYOND_INT64, ids)
    if n_classes is not None:
        _check_range(ids, n_classes, checked_ignore_index(ignore_index), name, fix)
    return ids


# What a uint64 class id beyond int64's range becomes (`check_class_ids`).
_BEYOND_INT64 = torch.iinfo(torch.int64).max


def _check_range(ids: Tensor, n_classes: int, ignore_index: int | None, name: str, fix: str | None) -> None:
    listed = ids != ignore_index if ignore_index is not None else torch.ones_like(ids, dtype=torch.bool)
    bad = listed & ((ids < 0) | (ids >= n_classes))
    if not bool(bad.any()):
        return
    i = int(bad.nonzero()[0, 0])
    first = "one >= 2**63 - 1" if int(ids[i]) == _BEYOND_INT64 else int(ids[i])
    if fix is None:
        raise ValueError(f"{int(bad.sum())} targets are not class ids in [0, {n_classes}) (e.g. {first})")
    raise ValueError(f"{name} {'hold' if name.endswith('s') else 'holds'} {int(bad.sum())} class ids outside "
                     f"[0, {n_classes}) (first: {first} in row {i}); {fix}")
