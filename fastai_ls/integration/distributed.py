"""Distributed training with fastai on CPU processes (gloo) as well as GPUs (nccl).

fastai 2.8 assumes CUDA for distributed training: its `DistributedDL` broadcasts the index list as a CUDA tensor,
and its `setup_distrib` hard-codes nccl. `distrib_ctx` below does what `learn.distrib_ctx()` does with a
`DistributedTrainer` whose `DistributedDL` broadcasts on the device the process group's backend needs (both in
`fastai_compat.py`, with everything else this package reads of fastai's internals), launched one process per worker
with `torchrun --nproc_per_node 2 train.py` or `accelerate launch`:

    with fastai_ls.integration.distributed.distrib_ctx(learn):
        learn.fit(3)

With a single process (no WORLD_SIZE > 1) `distrib_ctx` does nothing, so the same script runs unchanged.

fastai's own `learn.distrib_ctx()` runs with gloo inside `gloo_broadcast()`, which replaces fastai's
`DistributedDL._broadcast` for the block only and restores it after (fastai's `distrib_ctx` never calls
`setup_distrib` unless `in_notebook=True`, and accelerate joins a process group that is already up):

    torch.distributed.init_process_group("gloo")  # from torchrun's environment
    with fastai_ls.integration.distributed.gloo_broadcast(), learn.distrib_ctx(sync_bn=False, cpu=True):
        learn.fit(3)  # SyncBatchNorm is GPU-only; cpu=True: accelerate wraps in DDP
    fastai_ls.integration.distributed.teardown_distrib()  # leave the group before Python exits

`timeout=` bounds how long a collective waits for the other ranks (torch's default is 30 minutes). fastai gathers
every batch's predictions across ranks, so when one rank fails and its process stays alive (a notebook, a retry
loop), the others wait that long before failing; `distrib_ctx(learn, timeout=120)` makes them fail after 2 minutes.
"""

from __future__ import annotations

import atexit
import math
import numbers
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from fastai.callback.progress import ProgressCallback
from fastai.distributed import teardown_distrib  # leaves the process group, if one is up
from fastai.learner import Learner
from fastai.torch_core import num_distrib, rank_distrib

from fastai_ls._deprecation import warn_renamed
from fastai_ls.integration.fastai_compat import (
    DistributedDL,
    DistributedTrainer,
    gloo_broadcast,
    gloo_broadcast_for_good,
    shows_progress,
)

__all__ = ["DistributedDL", "DistributedTrainer", "setup_distrib", "teardown_distrib", "distrib_ctx",
           "gloo_broadcast", "patch_fastai_for_gloo"]


def patch_fastai_for_gloo() -> None:
    """Deprecated: replaced fastai's `DistributedDL._broadcast` for the whole process; use `with gloo_broadcast():`,
    which restores it after the block (and `distrib_ctx`, which needs neither)."""
    warn_renamed("patch_fastai_for_gloo()", "with gloo_broadcast(): ... (fastai's method is restored after the block)")
    gloo_broadcast_for_good()


def setup_distrib(backend: str | None = None, timeout: timedelta | float | None = None) -> bool:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    A group joined here is left by (fastai's) `teardown_distrib` when Python exits: left up, gloo's worker threads
    may still hold tensors while Python shuts down, which aborts the process ("terminate called without an active
    exception").

    Parameters
    ----------
    backend : str or None, default None
        The process group's backend; None: nccl with CUDA (on the GPU LOCAL_RANK), else gloo.
    timeout : timedelta, float (seconds) or None, default None
        How long a collective (and joining the group) waits for the other ranks before raising; None: torch's
        default, 30 minutes. It applies to a group started here: one already up keeps its own (with a warning).

    Returns
    -------
    bool
        Whether this process is distributed (more than one process in torchrun's environment).

    Examples
    --------
    >>> setup_distrib(timeout=120)  # in a single process: nothing to join
    False
    """
    timeout = _as_timedelta(timeout)
    if num_distrib() <= 1:
        return False
    if dist.is_initialized():
        if timeout is not None:
            warnings.warn("the process group was started before setup_distrib/distrib_ctx: its timeout is "
                          "unchanged (pass timeout= where it is started)", RuntimeWarning, stacklevel=2)
        return True
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend or ("nccl" if cuda else "gloo"), init_method="env://", timeout=timeout)
    atexit.register(teardown_distrib)
    return True


def _as_timedelta(timeout: timedelta | float | None) -> timedelta | None:
    """`timeout` as a timedelta of at least a millisecond (torch's unit for it), or None; raises naming the problem
    for anything else: a zero one would fail every collective at once, and inf or 1e300 seconds are no timedelta."""
    if timeout is None:
        return None
    if not isinstance(timeout, timedelta):
        if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
            raise TypeError(f"timeout must be a number of seconds or a timedelta, got {type(timeout).__name__}")
        seconds = float(timeout)
        if not math.isfinite(seconds) or seconds > timedelta.max.total_seconds():
            raise ValueError(f"timeout must be a positive, finite number of seconds (at most "
                             f"{timedelta.max.total_seconds():.3g}), got {timeout!r}")
        if seconds <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        timeout = timedelta(seconds=seconds)
    if timeout < timedelta(milliseconds=1):
        raise ValueError(f"timeout must be a positive duration of at least 1 ms, got {timeout!r}")
    return timeout


@contextmanager
def distrib_ctx(
    learn: Learner,
    sync_bn: bool | None = None,
    backend: str | None = None,
    timeout: timedelta | float | None = None,
    **kwargs,
) -> Iterator[Learner]:
    """Like fastai's `learn.distrib_ctx()`, but on CPU processes (gloo) too: DDP model, sharded data, and
    logging on rank 0 only. The process group is left running (accelerate keeps a handle to it) until exit, when
    `teardown_distrib` leaves it. Inside the block fastai's own `DistributedDL` works with gloo too
    (`gloo_broadcast`); after it, fastai's classes are as they were.

    Parameters
    ----------
    learn : Learner
        The Learner to train in distributed data-parallel mode.
    sync_bn : bool or None, default None
        Replace BatchNorm with SyncBatchNorm; None: with CUDA only (SyncBatchNorm is GPU-only).
    backend : str or None, default None
        The process group's backend; None: nccl with CUDA, else gloo.
    timeout : timedelta, float (seconds) or None, default None
        How long every collective waits for the other ranks before raising (`setup_distrib`); None: torch's 30
        minutes. fastai gathers predictions every batch, so a rank whose peer failed but stayed alive waits this
        long.
    **kwargs
        Passed to `accelerate.Accelerator` (through fastai's `DistributedTrainer`).

    Examples
    --------
    >>> with distrib_ctx(learn, timeout=300): learn.fit(1)  # doctest: +SKIP
    """
    if not setup_distrib(backend, timeout):
        yield learn
        return
    cuda = dist.get_backend() == "nccl"
    # Without this, accelerate sees no GPU, no CPU flag, and leaves the model unwrapped (no gradient averaging).
    kwargs.setdefault("cpu", not cuda)
    trainer = DistributedTrainer(sync_bn=cuda if sync_bn is None else sync_bn, **kwargs)
    removed_progress = False
    learn.add_cb(trainer)
    if rank_distrib() and shows_progress(learn):
        learn.remove_cb(ProgressCallback)
        removed_progress = True
    try:
        with gloo_broadcast():
            yield learn
    finally:
        learn.remove_cb(trainer)
        if removed_progress:
            learn.add_cb(ProgressCallback())
