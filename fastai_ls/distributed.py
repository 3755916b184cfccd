"""Compatibility shim: fastai's `DistributedTrainer` on CPU processes (gloo) as well as GPUs (nccl).

fastai 2.8 assumes CUDA for distributed training: `DistributedDL._broadcast` moves the index list to `.cuda()`
and `setup_distrib` hard-codes nccl. Here `DistributedDL` broadcasts on the device the process group's backend
wants, and `distrib_ctx` starts the process group from the torchrun environment with gloo when there is no GPU.

Launch one process per worker with `torchrun --nproc_per_node 2 train.py` or `accelerate launch`, and in train.py:

    with fastai_ls.distributed.distrib_ctx(learn):
        learn.fit(3)

With a single process (no WORLD_SIZE > 1) `distrib_ctx` does nothing, so the same script runs unchanged.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from fastai.callback.progress import ProgressCallback
from fastai.distributed import DistributedDL as FastaiDistributedDL
from fastai.distributed import DistributedTrainer as FastaiDistributedTrainer
from fastai.torch_core import num_distrib, rank_distrib

__all__ = ["DistributedDL", "DistributedTrainer", "setup_distrib", "distrib_ctx"]


def _collective_device() -> torch.device:
    """Where tensors for collectives must live: CUDA for nccl, the CPU for gloo (and mpi)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class DistributedDL(FastaiDistributedDL):
    """fastai's `DistributedDL` whose index broadcast works with every backend, not only nccl."""

    def _broadcast(self, t, rank):
        t = torch.tensor(t, dtype=torch.long, device=_collective_device())
        dist.broadcast(t, rank)
        return t.cpu().tolist()


class DistributedTrainer(FastaiDistributedTrainer):
    """fastai's `DistributedTrainer` wrapping the data loaders in the backend-agnostic `DistributedDL`."""

    def _wrap_dl(self, dl):
        return dl if isinstance(dl, FastaiDistributedDL) else DistributedDL(dl, device=self.learn.model.device)


def setup_distrib(backend: str | None = None) -> bool:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT);
    backend default: nccl with CUDA (on the GPU LOCAL_RANK), else gloo. Returns whether this process is distributed.

    >>> setup_distrib()  # in a single process: nothing to join
    False
    """
    if num_distrib() <= 1:
        return False
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend or ("nccl" if cuda else "gloo"), init_method="env://")
    return True


@contextmanager
def distrib_ctx(
    learn,  # the Learner to train in distributed data-parallel mode
    sync_bn: bool | None = None,  # BatchNorm -> SyncBatchNorm; default: with CUDA only (SyncBatchNorm is GPU-only)
    backend: str | None = None,  # process-group backend; default nccl with CUDA, else gloo
    **kwargs,  # for `accelerate.Accelerator`
):
    """Like fastai's `learn.distrib_ctx()`, but on CPU processes (gloo) too: DDP model, sharded data, and
    logging on rank 0 only. The process group is left running (accelerate keeps a handle to it) until exit.

    >>> with distrib_ctx(learn): learn.fit(1)  # doctest: +SKIP
    """
    if not setup_distrib(backend):
        yield learn
        return
    cuda = _collective_device().type == "cuda"
    # Without this, accelerate sees no GPU, no CPU flag, and leaves the model unwrapped (no gradient averaging).
    kwargs.setdefault("cpu", not cuda)
    trainer = DistributedTrainer(sync_bn=cuda if sync_bn is None else sync_bn, **kwargs)
    removed_progress = False
    learn.add_cb(trainer)
    if rank_distrib() and hasattr(learn, "progress"):
        learn.remove_cb(ProgressCallback)
        removed_progress = True
    try:
        yield learn
    finally:
        learn.remove_cb(trainer)
        if removed_progress:
            learn.add_cb(ProgressCallback())
