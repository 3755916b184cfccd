"""The storage of a `CalibrationState`: one flat float64 vector of counters on the predictions' device, seen
through named views (running sums, equal-width bins, fine cells, class bins), added with `+`, reduced over processes
with one `all_reduce`, read and pickled as a copy taken under a lock, and loaded from the layouts of earlier
versions."""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from fastai_ls.calibration.counting import SCALAR_NAMES
from fastai_ls.validation import check_int

__all__ = ["CounterVector", "N_FINE"]

# The fine grid's cells by default: a resolution of 0.001 in confidence.
N_FINE = 1000



class CounterVector:
    """The counters of `CalibrationState` (which documents the parameters) and what holds them: the layout, the
    named views of `data`, the lock that makes updates and readings whole, `+`, `to`, `all_reduce` and pickling."""

    def __init__(
        self,
        n_classes: int,
        n_bins: int = 15,
        n_fine: int = N_FINE,
        device: torch.device | str | None = None,
        data: Tensor | None = None,
        classwise: bool = True,
    ):
        """Zeroed counters (or `data`) for this layout; see `CalibrationState`."""
        self.n_classes = check_int(n_classes, "n_classes")
        self.n_bins, self.n_fine = check_int(n_bins, "n_bins"), check_int(n_fine, "n_fine")
        self.classwise = bool(classwise)
        sizes = {"scalars": len(SCALAR_NAMES), "bins": 3 * self.n_bins, "fine": 3 * self.n_fine,
                 "class_bins": 3 * self.n_classes * self.n_bins if self.classwise else 0}
        self._slices, start = {}, 0
        for name, size in sizes.items():
            self._slices[name] = slice(start, start + size)
            start += size
        if data is None:
            data = torch.zeros(start, dtype=torch.float64, device=device)
        elif data.shape != (start,) or data.dtype != torch.float64:
            raise ValueError(f"data must be a float64 vector of length {start} for this layout, "
                             f"got {data.dtype} {tuple(data.shape)}")
        self.data = data
        # Made on the device (a factory, not a copy of Python data): a state may be created in the per-batch path.
        self._class_offset = torch.arange(self.n_classes, device=data.device) * self.n_bins if self.classwise else None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        """Everything but the lock, which cannot be pickled or copied (a saved learner holds its callback's
        states), with a copy of the counters taken under the lock: whole updates only, as for `metrics`."""
        with self._lock:
            data = self.data.clone()
        return {k: v for k, v in self.__dict__.items() if k != "_lock"} | {"data": data}

    def __setstate__(self, state: dict) -> None:
        """The pickled counters with a new lock; a state saved before `weight_sq` was counted (a learner exported
        with an earlier version) gets it as n, which it is for unweighted rows and the callback's 0/1 weights."""
        self.__dict__.update(state)
        self._lock = threading.Lock()
        n_old = self._slices["scalars"].stop
        if n_old == len(SCALAR_NAMES) - 1:  # weight_sq, the last scalar, is missing
            old = self.data
            self.__init__(self.n_classes, self.n_bins, self.n_fine, device=old.device, classwise=self.classwise)
            self.data[:n_old], self.data[n_old + 1:] = old[:n_old], old[n_old:]
            self.data[n_old] = old[SCALAR_NAMES.index("n")]

    # --- named views of `data` (writes through them update the state) ---------------------------------------------

    @property
    def scalars(self) -> Tensor:
        """The running sums in the order n, confidence, correct, nll, brier, n_invalid, n_bad_target, nll_sq,
        brier_sq (the last two of squared per-row values)."""
        return self.data[self._slices["scalars"]]

    def scalar(self, name: str) -> Tensor:
        """One of the running sums: n, confidence, correct, nll, brier, n_invalid, n_bad_target, nll_sq,
        brier_sq."""
        return self.scalars[SCALAR_NAMES.index(name)]

    @property
    def bins(self) -> Tensor:
        """(M, 3): count, sum of confidence and number correct per equal-width bin."""
        return self.data[self._slices["bins"]].view(self.n_bins, 3)

    @property
    def fine(self) -> Tensor:
        """(n_fine, 3): the same counters on the fine grid."""
        return self.data[self._slices["fine"]].view(self.n_fine, 3)

    @property
    def class_bins(self) -> Tensor:
        """(C, M, 3): per class k, count, sum of p_k and number with target k per bin of p_k ((0, M, 3) without
        `classwise`)."""
        return self.data[self._slices["class_bins"]].view(-1, self.n_bins, 3)

    @property
    def device(self) -> torch.device:
        """Where the counters live."""
        return self.data.device

    # --- building and combining states ------------------------------------------------------------------------------

    def same_layout(self, other: CounterVector) -> bool:
        """Whether `other` has the same counters, so that the two can be added."""
        return self._layout() == other._layout()

    def _layout(self) -> tuple[int, int, int, bool]:
        return self.n_classes, self.n_bins, self.n_fine, self.classwise

    def _with_data(self, data: Tensor) -> CounterVector:
        return type(self)(self.n_classes, self.n_bins, self.n_fine, data=data, classwise=self.classwise)

    def __add__(self, other: CounterVector) -> CounterVector:
        """The counters of both states' rows (on this state's device); a ValueError if the layouts differ."""
        if not isinstance(other, CounterVector):
            return NotImplemented
        if not self.same_layout(other):
            names = ("n_classes", "n_bins", "n_fine", "classwise")
            differ = ", ".join(f"{name} {a!r} and {b!r}" for name, a, b in zip(names, self._layout(), other._layout())
                               if a != b)
            raise ValueError(f"cannot add calibration states with different counters: {differ}")
        return self._with_data(self._frozen(self.device).data + other._frozen(self.device).data)

    def to(self, device: torch.device | str) -> CounterVector:
        """The same counters on `device`: a copy, or this state itself if they are there already."""
        with self._lock:
            data = self.data.to(device)
        # Not a second state over the same `data`: it would have a lock of its own, and updates through the two
        # could race.
        return self if data is self.data else self._with_data(data)

    def _frozen(self, device: torch.device | str = "cpu") -> CounterVector:
        """A copy of the counters on `device`, taken under the lock: every reading (metrics, `+`) sees whole updates
        only, never the scalars of a batch whose bins another thread is still adding."""
        with self._lock:
            return self._with_data(self.data.to(device, copy=True))

    def all_reduce(self) -> CounterVector:
        """Sum the state over all processes in place (one collective); a no-op unless torch.distributed runs."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            with self._lock:
                dist.all_reduce(self.data, op=dist.ReduceOp.SUM)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_classes={self.n_classes}, n_bins={self.n_bins}, n_fine={self.n_fine}, " \
               f"classwise={self.classwise}, device={self.device})"
