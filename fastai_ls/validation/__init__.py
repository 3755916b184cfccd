"""How every entry point checks its arguments: one function per kind of argument, called by every layer (the loss,
the calibration math, the fastai layer, the command), each raising an error that names the argument and the
problem before any work is done, and none changing what it is given (scikit-learn's `utils.validation` idiom).

`scalars.py` checks options (counts, bounds, confidence levels, seeds, interval grids, folds) with the standard
library alone: the `fastai-ls` command imports it before torch. `tensors.py` checks tensors: plain `torch.Tensor`s
in a dtype the arithmetic can be done in, logits, and integer class ids (`check_class_ids`, the one check of them).
Each name is imported from its module on first use (PEP 562): `from fastai_ls.validation import check_folds` loads
no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for IDEs and type checkers; at run time `__getattr__` below imports each name on first use
    from fastai_ls.validation.scalars import (
        check_ci,
        check_folds,
        check_int,
        check_interval_grid,
        check_number,
        check_seed,
    )
    from fastai_ls.validation.tensors import (
        check_class_ids,
        check_logits,
        checked_ignore_index,
        compute_dtype,
        is_class_id_dtype,
        plain,
        upcast,
    )

__all__ = ["check_int", "check_number", "check_ci", "check_seed", "check_interval_grid", "check_folds", "plain",
           "compute_dtype", "upcast", "check_logits", "is_class_id_dtype", "checked_ignore_index", "check_class_ids"]
# Each name and its module.
_SOURCES = {
    **dict.fromkeys(("check_int", "check_number", "check_ci", "check_seed", "check_interval_grid", "check_folds"),
                    "fastai_ls.validation.scalars"),
    **dict.fromkeys(("plain", "compute_dtype", "upcast", "check_logits", "is_class_id_dtype", "checked_ignore_index",
                     "check_class_ids"), "fastai_ls.validation.tensors"),
}


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SOURCES))
