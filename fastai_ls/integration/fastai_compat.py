"""Every use of fastai's private API and undocumented behaviour, in one module: the rest of the package calls these
functions, and tests/integration/test_fastai_compat.py checks each fastai attribute or behaviour they rely on, so a
fastai upgrade that changes one fails there, by name, and nowhere else.

What pins fastai (`fastai>=2.8,<2.9` in setup.cfg) is this list; each is read or replaced by the function named:

- `fastai.distributed.DistributedDL._broadcast` (private) sends the index list as `LongTensor(t).cuda()`, which fails
  with gloo: `DistributedDL` below overrides it, and `gloo_broadcast()` replaces it on fastai's own class only inside
  a `with` block, restoring it after (`gloo_broadcast_for_good`, for the process: the deprecated
  `patch_fastai_for_gloo`).
- `DistributedTrainer._wrap_dl` (private): `DistributedTrainer` below overrides it to wrap in that `DistributedDL`.
- `DistributedDL.rank`, `.world_size`, `.n`, `.n_padded` and `.i` (undocumented: the padded contiguous shards and the
  running item count): `padding_weight`.
- `Learner.lock`, which `validate()`/`get_preds()` hold and `fit` does not: `in_validation_context`.
- `Learner.add_cb` sets `cb.learn = learn` then `learn.<cb.name>`; `Learner.remove_cb` sets `cb.learn = None`
  before it reads `cb.name` to delete `learn.<cb.name>`; a callback's `learn` is its instance attribute:
  `AttachAwareCallback`, `reattach`.
- `TrainEvalCallback.before_fit` sets `learn.epoch = 0`, also for the fit fastai runs around `validate()`: the
  callback keeps the outer fit's epoch itself.
- `TrackerCallback.monitor`, `.comp`, `.min_delta` (negated for `np.less`), `.best` and `.run`, and fastai's guess of
  `comp` from the monitor's name: `tracker_monitor`, `turn_tracker`, `sit_out`.
- `Recorder.train_metrics`/`.valid_metrics` (the `train_`/`valid_` column prefixes): `prefixed_columns`.
- The attribute names fastai gives its callbacks on the learner: `lr_finder` (`LRFinder`), `progress`
  (`ProgressCallback`): `finding_lr`, `shows_progress`.
- `BaseLoss.func`, the torch loss inside fastai's flattened losses: `inner_loss`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
from fastai.callback.core import Callback
from fastai.callback.tracker import TrackerCallback
from fastai.distributed import DistributedDL as FastaiDistributedDL
from fastai.distributed import DistributedTrainer as FastaiDistributedTrainer
from fastai.learner import Learner
from torch import Tensor

__all__ = ["DistributedDL", "DistributedTrainer", "gloo_broadcast", "gloo_broadcast_for_good", "padding_weight",
           "is_sharded", "in_validation_context", "finding_lr", "shows_progress", "inner_loss", "tracker_monitor",
           "turn_tracker", "sit_out", "prefixed_columns", "AttachAwareCallback", "reattach"]


# --- distributed data --------------------------------------------------------------------------------------------


def _collective_device() -> torch.device:
    """Where tensors for collectives must live: CUDA for nccl, the CPU for gloo (and mpi)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast(self: FastaiDistributedDL, t: list[int], rank: int) -> list[int]:
    """Broadcast the index list `t` from `rank`, on the device the process group's backend needs."""
    t = torch.tensor(t, dtype=torch.long, device=_collective_device())
    dist.broadcast(t, rank)
    return t.cpu().tolist()


class DistributedDL(FastaiDistributedDL):
    """fastai's `DistributedDL` whose index broadcast works with every backend (gloo, mpi, nccl)."""

    _broadcast = _broadcast


class DistributedTrainer(FastaiDistributedTrainer):
    """fastai's `DistributedTrainer` wrapping the data loaders in the backend-agnostic `DistributedDL`."""

    def _wrap_dl(self, dl):
        return dl if isinstance(dl, FastaiDistributedDL) else DistributedDL(dl, device=self.learn.model.device)


_patch_lock = threading.Lock()
_patch_depth = 0
_fastai_broadcast = None


@contextmanager
def gloo_broadcast() -> Iterator[None]:
    """Inside the block, fastai's own `DistributedDL` broadcasts as `DistributedDL` does (so fastai's
    `learn.distrib_ctx()` runs with gloo); after it, fastai's method again. Blocks may nest, also across threads.

    >>> with gloo_broadcast(): pass
    """
    global _patch_depth, _fastai_broadcast
    with _patch_lock:
        if _patch_depth == 0:
            _fastai_broadcast = FastaiDistributedDL.__dict__["_broadcast"]
            FastaiDistributedDL._broadcast = _broadcast
        _patch_depth += 1
    try:
        yield
    finally:
        with _patch_lock:
            _patch_depth -= 1
            if _patch_depth == 0:
                FastaiDistributedDL._broadcast = _fastai_broadcast


def gloo_broadcast_for_good() -> None:
    """Replace fastai's `DistributedDL._broadcast` for the rest of the process (the deprecated
    `patch_fastai_for_gloo`; `gloo_broadcast()` restores it)."""
    FastaiDistributedDL._broadcast = _broadcast


def is_sharded(dl: object) -> bool:
    """Whether `dl` reads one process's shard of the data (fastai's `DistributedDL`, or ours)."""
    return isinstance(dl, FastaiDistributedDL)


def padding_weight(dl: object, n_items: int, rows_per_item: int, device: torch.device) -> Tensor | None:
    """0/1 row weights that drop the items `DistributedDL` repeats to pad the last shard; None if not distributed
    or nothing to drop.

    Rank r reads [r * n_padded / ws, (r + 1) * n_padded / ws) of the padded index list, and `dl.i` has already
    grown by this batch, so the batch's first item sits at r * n_padded // ws + dl.i - n_items; only positions
    below `dl.n` are real. All Python integers: no device work to wait for."""
    if not is_sharded(dl) or not all(hasattr(dl, a) for a in ("i", "n", "n_padded")):
        return None
    start = dl.rank * dl.n_padded // dl.world_size + dl.i - n_items
    n_real = min(max(dl.n - start, 0), n_items)
    if n_real == n_items:
        return None
    keep = (torch.arange(n_items, device=device) < n_real).to(torch.float64)
    return keep.repeat_interleave(rows_per_item) if rows_per_item > 1 else keep


# --- the learner ---------------------------------------------------------------------------------------------------


def in_validation_context(learn: Learner) -> bool:
    """Whether `learn` is inside `validate()`/`get_preds()`: fastai holds `learn.lock` there, never in `fit`. An
    error raised while fastai enters that context (in `before_fit`) would keep the lock, and the learner, for good."""
    lock = getattr(learn, "lock", None)
    return lock is not None and lock.locked()


def finding_lr(learn: Learner) -> bool:
    """Whether the running fit is `learn.lr_find()` (its `LRFinder` is `learn.lr_finder` meanwhile)."""
    return hasattr(learn, "lr_finder")


def shows_progress(learn: Learner) -> bool:
    """Whether the learner draws fastai's progress bars (`learn.progress`; `learn.no_bar()` removes it)."""
    return hasattr(learn, "progress")


def inner_loss(loss_func: object) -> object:
    """The torch loss inside fastai's `BaseLoss` wrappers (`CrossEntropyLossFlat`...), else the loss itself."""
    return getattr(loss_func, "func", loss_func)


def prefixed_columns(learn: Learner) -> bool:
    """Whether the progress table's metric columns are `train_<name>`/`valid_<name>` (`Recorder(train_metrics=True)`)
    rather than `<name>`."""
    recorder = getattr(learn, "recorder", None)
    return bool(recorder is not None and recorder.train_metrics and recorder.valid_metrics)


# --- fastai's trackers (SaveModelCallback, EarlyStoppingCallback, ReduceLROnPlateau) ------------------------------


def tracker_monitor(cb: Callback) -> str | None:
    """The column a fastai tracker monitors (`'ece'`, `'valid_ece'`...); None for any other callback."""
    return cb.monitor if isinstance(cb, TrackerCallback) else None


def turn_tracker(tracker: TrackerCallback, comp) -> bool:
    """Make `tracker` keep the lowest value (`comp=np.less`) where fastai guessed the highest (`np.greater`, its
    guess for a name without "loss" or "error"); True if it was turned. `min_delta` keeps its meaning (fastai
    stores it negated for `np.less`), and a best kept from an earlier fit (`reset_on_fit=False`), the worst one, is
    forgotten. Any other comparison, the user's own, is left as it is."""
    if comp is not np.less or tracker.comp is not np.greater:
        return False
    tracker.comp, tracker.min_delta = np.less, -tracker.min_delta
    tracker.best = None
    return True


def sit_out(tracker: TrackerCallback) -> None:
    """Skip `tracker` for the running fit or validation pass (fastai sets `run` again at the next event it fires)."""
    tracker.run = False


# --- the attach/detach protocol of Learner.add_cb/remove_cb ----------------------------------------------------------


class AttachAwareCallback(Callback):
    """A fastai `Callback` told when `learn.add_cb` attaches it (`attach(learn)`) and when `learn.remove_cb` takes it
    out (`detach(learn)`, also at the end of `fit(cbs=...)`/`validate(cbs=...)` and of a fit that raised)."""

    @property
    def learn(self) -> Learner | None:
        """The learner this callback is attached to; fastai sets it in `add_cb` and clears it in `remove_cb`."""
        # Kept under the instance key of fastai's plain attribute, so pickles (`learn.export()`) look the same.
        return self.__dict__.get("learn")

    @learn.setter
    def learn(self, learn: Learner | None) -> None:
        old = self.__dict__.get("learn")
        if old is not None and old is not learn:
            self.detach(old)
        self.__dict__["learn"] = learn
        if learn is not None and learn is not old:
            self.__dict__.pop("_keep_attribute", None)
            self.attach(learn)

    def attach(self, learn: Learner) -> None:
        """Called once `learn.add_cb(self)` has set `self.learn` (before fastai sets `learn.<name>`)."""

    def detach(self, learn: Learner) -> None:
        """Called as `learn.remove_cb(self)` clears `self.learn` (before fastai deletes `learn.<name>`)."""

    def keep_attribute(self) -> None:
        """From `detach`: make `remove_cb` leave `learn.<name>` (another callback now holds the name)."""
        self.__dict__["_keep_attribute"] = True

    @property
    def attribute_name(self) -> str:
        """`learn.<attribute_name>` is the attached callback; fastai's default: the snake-cased class name."""
        return Callback.name.fget(self)

    @property
    def name(self) -> str:
        """fastai's name for the callback; read by `remove_cb` right after `learn` is cleared."""
        return "_no_attribute" if self.__dict__.pop("_keep_attribute", False) else self.attribute_name


def reattach(cb: Callback, learn: Learner) -> None:
    """Put `cb` back into `learn.cbs` as attached, without `add_cb`'s events on it (`attach` would run again)."""
    if cb.learn is None and cb not in learn.cbs:
        cb.__dict__["learn"] = learn
        learn.cbs.append(cb)
