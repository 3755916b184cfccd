"""Old spellings that keep working for one release, each with a `FutureWarning` (the category Python shows to end
users) that names the new spelling."""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["moved_module", "warn_renamed"]


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that `old` is deprecated in favour of `new`, pointing at the caller's caller. A package's `__getattr__`
    is also called by the import system's own check, `from package import name` looking for a submodule `name`
    first: that call does not warn, so the statement warns once."""
    caller = sys._getframe(stacklevel - 1)
    if caller.f_code.co_name == "_handle_fromlist" and caller.f_globals.get("__name__") == "importlib._bootstrap":
        return
    warnings.warn(f"{old} is deprecated and will be removed in the next release; use {new}", FutureWarning,
                  stacklevel=stacklevel)


def moved_module(old: str, new: str) -> Callable[[str], Any]:
    """A module `__getattr__` for the module `old` that now lives at `new`: each name is read from `new`, with a
    warning (learners exported before the move name their loss and callback by the old path, and still load)."""

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = getattr(importlib.import_module(new), name)  # a name that never lived here raises, unwarned
        warn_renamed(f"{old}.{name}", f"{new}.{name}")
        return value

    return __getattr__
