"""One process of the 2-process CPU (gloo) run in test_distributed.py, also the builder of the shared learner.

Run as `python distributed_worker.py OUT_DIR` with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT). It trains twice, each time from the same start: once through fastai's own
`learn.distrib_ctx()` (inside `gloo_broadcast()`) and once through
`fastai_ls.integration.distributed.distrib_ctx`; each rank saves, per run, the calibration state of every epoch
and the trained weights to OUT_DIR.
"""

from __future__ import annotations

import sys
from pathlib import Path

import fastai.distributed
import torch
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.metrics import error_rate
from torch import nn

from fastai_ls import CalibrationCallback, LabelSmoothingCrossEntropy
from fastai_ls.integration.distributed import distrib_ctx, gloo_broadcast, teardown_distrib

N_CLASSES, N_VALID = 5, 53  # an odd validation set: DistributedDL pads the last shard with a repeated item
VALID_BS = 8


def synthetic_items(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) pairs, float64 inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = (x[:, :N_CLASSES] + torch.randn(n, N_CLASSES, generator=g, dtype=torch.float64)).argmax(1)
    return list(zip(x, y))


class Float32(nn.Module):
    """Computed in float64, returned in float32 (what fastai's smoothed loss expects): the float32 rounding of a row
    does not depend on how the rows were batched."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


def make_learner() -> tuple[Learner, CalibrationCallback]:
    torch.manual_seed(0)
    dls = DataLoaders.from_dsets(synthetic_items(96, 1), synthetic_items(N_VALID, 2), bs=VALID_BS, num_workers=0,
                                 device="cpu")
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, N_CLASSES), Float32()).double()
    cb = CalibrationCallback(metrics=("ece", "nll", "accuracy"))
    return Learner(dls, model, loss_func=LabelSmoothingCrossEntropy(0.1), metrics=error_rate, cbs=cb), cb


class RecordWrappers(Callback):
    """Records which data loader and model classes the validation passes of the fit ran with."""

    def before_fit(self):
        self.seen = set()

    def before_validate(self):
        self.seen |= {f"{type(o).__module__}.{type(o).__name__}" for o in (self.learn.dl, self.learn.model)}


def results(learn: Learner, cb: CalibrationCallback, wrappers: RecordWrappers, values: list) -> dict:
    return {"states": [s.data for s in cb.states], "history": cb.history.to_dict("list"),
            "weights": learn.model.state_dict(), "wrappers": sorted(wrappers.seen),
            "columns": list(learn.recorder.metric_names), "values": values}


def table(learn: Learner) -> list[list[float]]:
    """The progress table's rows of the fit (without epoch and time): fastai's error_rate beside our columns."""
    return [list(map(float, row)) for row in learn.recorder.values]


def main(out: Path) -> None:
    # fastai's own path: it leaves the process group to the caller (or to accelerate) when one is up already.
    torch.distributed.init_process_group("gloo", init_method="env://")
    fastai_broadcast = fastai.distributed.DistributedDL.__dict__["_broadcast"]
    fastai_learn, fastai_cb = make_learner()
    fastai_wrappers = RecordWrappers()
    with gloo_broadcast(), fastai_learn.distrib_ctx(sync_bn=False, cpu=True), fastai_learn.no_logging(), \
            fastai_learn.no_bar():
        fastai_learn.fit(2, lr=1e-2, cbs=fastai_wrappers)
    fastai_values = table(fastai_learn)

    learn, cb = make_learner()
    wrappers = RecordWrappers()
    with distrib_ctx(learn), learn.no_logging(), learn.no_bar():
        learn.fit(2, lr=1e-2, cbs=wrappers)
    values = table(learn)  # before get_preds, whose before_fit makes the Recorder start afresh
    with learn.no_bar():
        learn.get_preds()  # after the context: the whole validation set on each rank, process group still up
    rank = torch.distributed.get_rank()
    torch.save({**results(learn, cb, wrappers, values),
                "fastai": results(fastai_learn, fastai_cb, fastai_wrappers, fastai_values),
                "n_after": float(cb.state.scalar("n")), "world_size": torch.distributed.get_world_size(),
                "fastai_restored": fastai.distributed.DistributedDL.__dict__["_broadcast"] is fastai_broadcast},
               out / f"rank{rank}.pt")
    teardown_distrib()  # this script joined the group itself, so it leaves it too


if __name__ == "__main__":
    main(Path(sys.argv[1]))
