"""The losses `compare_losses` and `fastai-ls demo --losses` know by name, each with its paper's defaults. A name
maps to the module and class of its loss and the arguments it is built with; the class is imported only when the
name is chosen, so this module (which the command's parser reads) imports neither torch nor fastai, and a name
whose class is missing from this installation fails only when it is chosen, saying so."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import NamedTuple

__all__ = ["LossSpec", "LOSSES", "check_loss_names", "get_loss"]


class LossSpec(NamedTuple):
    """Where a named loss lives and how it is built.

    Attributes
    ----------
    module : str
        The module that defines the class.
    cls : str
        The class, a fastai-style `Flat` loss over the last axis.
    kwargs : dict
        Its arguments (the paper's defaults).
    title : str
        How tables name it.
    """

    module: str
    cls: str
    kwargs: dict
    title: str


LOSSES: dict[str, LossSpec] = {
    "ce": LossSpec("fastai_ls.loss.modules", "LabelSmoothingCrossEntropyFlat", {"eps": 0.0}, "cross-entropy"),
    "ls": LossSpec("fastai_ls.loss.modules", "LabelSmoothingCrossEntropyFlat", {"eps": 0.1}, "label smoothing 0.1"),
    # Mukhoti et al. 2020: softmax focal loss with gamma 3, and FLSD-53 (gamma 5 where p_y < 0.2, else 3).
    "focal": LossSpec("fastai_ls.loss.focal", "FocalLossFlat", {"gamma": 3.0}, "focal (gamma 3)"),
    "flsd53": LossSpec("fastai_ls.loss.focal", "AdaptiveFocalLossFlat", {}, "FLSD-53"),
    # Liu et al. 2022 (MbLS): margin 10, alpha 0.1.
    "mbls": LossSpec("fastai_ls.loss.margin", "MarginLabelSmoothingFlat", {"margin": 10.0, "alpha": 0.1},
                     "MbLS (m 10, alpha 0.1)"),
    # Zhou et al. 2025 (MaxSup): alpha 0.1, the start of the paper's schedule, held fixed.
    "maxsup": LossSpec("fastai_ls.loss.maxsup", "MaxSupLossFlat", {"alpha": 0.1}, "MaxSup (alpha 0.1)"),
    # Wei et al. 2022 (LogitNorm): tau is tuned per data set; 0.04 is the paper's CIFAR-10 value.
    "logitnorm": LossSpec("fastai_ls.loss.logitnorm", "LogitNormLossFlat", {"tau": 0.04}, "LogitNorm (tau 0.04)"),
}


def check_loss_names(names: list[str]) -> list[str]:
    """`names` if each is a key of `LOSSES` and none repeats, else a ValueError naming the problem and the valid
    names.

    Parameters
    ----------
    names : list of str
        Loss names, e.g. `['ce', 'ls']`.

    Returns
    -------
    list of str

    Examples
    --------
    >>> check_loss_names(["ce", "ls"])
    ['ce', 'ls']
    >>> check_loss_names(["ce", "lsx"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: unknown loss 'lsx' (did you mean 'ls'?); known: ce,ls,focal,flsd53,mbls,maxsup,logitnorm
    """
    if isinstance(names, str) or not names:
        raise ValueError(f"losses must be a non-empty list of names, got {names!r}; known: {','.join(LOSSES)}")
    for name in names:
        if name not in LOSSES:
            close = difflib.get_close_matches(str(name).lower(), list(LOSSES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown loss {name!r}{hint}; known: {','.join(LOSSES)}")
    if len(set(names)) < len(names):
        raise ValueError(f"each loss may be named once, got {','.join(names)}")
    return list(names)


def get_loss(name: str) -> Callable:
    """A new loss for the name `name` (`LOSSES`): its class imported now, built with its arguments.

    Parameters
    ----------
    name : str
        A key of `LOSSES`.

    Returns
    -------
    callable
        The loss, a fastai loss with `activation` and `decodes`.

    Examples
    --------
    >>> get_loss("ls")
    LabelSmoothingCrossEntropyFlat(eps=0.1, smoothing='uniform', reduction='mean', ignore_index=-100)
    """
    check_loss_names([name])
    spec = LOSSES[name]
    try:
        cls = getattr(importlib.import_module(spec.module), spec.cls)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"loss {name!r} needs {spec.module}.{spec.cls}, which this installation of fastai_ls does "
                         f"not have ({err}); choose among the others") from None
    return cls(**spec.kwargs)
