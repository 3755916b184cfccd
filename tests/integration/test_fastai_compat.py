"""What fastai_ls relies on in fastai's private API and undocumented behaviour, one test per attribute or behaviour
(fastai_ls/integration/fastai_compat.py lists them): a fastai release that changes one fails here, by name."""

from __future__ import annotations

import inspect
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback, Recorder
from fastai.callback.schedule import LRFinder
from fastai.callback.tracker import EarlyStoppingCallback, SaveModelCallback, TrackerCallback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.distributed import DistributedDL as FastaiDistributedDL
from fastai.distributed import DistributedTrainer as FastaiDistributedTrainer
from fastai.learner import Learner, ValueMetric
from fastai.losses import CrossEntropyLossFlat
from torch import nn

from fastai_ls.integration import fastai_compat
from fastai_ls.integration.fastai_compat import (
    AttachAwareCallback,
    DistributedDL,
    finding_lr,
    gloo_broadcast,
    in_validation_context,
    inner_loss,
    is_sharded,
    padding_weight,
    prefixed_columns,
    reattach,
    shows_progress,
    sit_out,
    tracker_monitor,
    turn_tracker,
)


def tiny_learner(cbs=(), **kwargs) -> Learner:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, generator=g), torch.randint(0, 3, (40,), generator=g)
    dls = DataLoaders.from_dsets(list(zip(x, y))[:20], list(zip(x, y))[20:], bs=8, num_workers=0, device="cpu")
    learn = Learner(dls, nn.Linear(3, 3), loss_func=CrossEntropyLossFlat(), cbs=list(cbs), **kwargs)
    learn.logger = lambda *a: None
    return learn


# --- DistributedDL / DistributedTrainer -----------------------------------------------------------------------


def test_fastai_distributed_dl_broadcasts_the_index_list_through_its_private_broadcast_method():
    assert "_broadcast" in FastaiDistributedDL.__dict__
    assert list(inspect.signature(FastaiDistributedDL._broadcast).parameters) == ["self", "t", "rank"]
    assert "self._broadcast(" in inspect.getsource(FastaiDistributedDL.get_idxs)


def test_gloo_broadcast_replaces_fastai_method_only_inside_the_block_also_nested_and_across_threads():
    original = FastaiDistributedDL.__dict__["_broadcast"]
    inside = threading.Event()
    leave = threading.Event()

    def other_thread():
        with gloo_broadcast():
            inside.set()
            leave.wait(10)

    with gloo_broadcast():
        assert FastaiDistributedDL._broadcast is fastai_compat._broadcast
        thread = threading.Thread(target=other_thread)
        thread.start()
        inside.wait(10)
        with gloo_broadcast():
            assert FastaiDistributedDL._broadcast is fastai_compat._broadcast
    assert FastaiDistributedDL._broadcast is fastai_compat._broadcast  # the other thread's block is still open
    leave.set()
    thread.join(10)
    assert FastaiDistributedDL.__dict__["_broadcast"] is original
    with pytest.raises(RuntimeError), gloo_broadcast():
        raise RuntimeError
    assert FastaiDistributedDL.__dict__["_broadcast"] is original  # restored after an error too


def test_fastai_distributed_trainer_wraps_each_loader_through_its_private_wrap_dl():
    pytest.importorskip("accelerate")
    assert "_wrap_dl" in FastaiDistributedTrainer.__dict__
    trainer = fastai_compat.DistributedTrainer(sync_bn=False, cpu=True)
    learn = tiny_learner()
    trainer.learn = SimpleNamespace(model=SimpleNamespace(device="cpu"), dl=learn.dls.valid)
    trainer.before_validate()  # fastai's own method, which calls the overridden _wrap_dl
    assert type(trainer.learn.dl) is DistributedDL and is_sharded(trainer.learn.dl)
    wrapped = trainer.learn.dl
    trainer.before_validate()
    assert trainer.learn.dl is wrapped  # a DistributedDL is not wrapped twice


class LocalDistributedDL(FastaiDistributedDL):
    """fastai's DistributedDL without a process group: the index list is this process's own."""

    def _broadcast(self, t, rank):
        return t


def test_distributed_dl_pads_contiguous_shards_and_counts_items_in_i_n_and_n_padded():
    n, world_size = 11, 4
    kept = 0
    for rank in range(world_size):
        dl = LocalDistributedDL(DataLoader(list(range(n)), bs=2), rank=rank, world_size=world_size)
        for batch in dl:
            assert {"rank", "world_size", "n", "n_padded", "i"} <= set(vars(dl))
            weight = padding_weight(dl, len(batch), 1, torch.device("cpu"))
            kept += len(batch) if weight is None else int(weight.sum())
        assert (dl.n, dl.n_padded) == (n, 12)
    assert kept == n  # the one padding item (item 0 again, on the last rank) is weighted 0
    # The last rank's shard is items 9, 10 and 0 (padding): read as one batch of 3 items with 2 rows each.
    weight = padding_weight(dl, 3, 2, torch.device("cpu"))
    assert weight.tolist() == [1, 1, 1, 1, 0, 0]
    assert padding_weight(DataLoader(list(range(4)), bs=2), 2, 1, torch.device("cpu")) is None


# --- the learner -----------------------------------------------------------------------------------------------


class SeeLock(Callback):
    def before_fit(self):
        self.seen = getattr(self, "seen", []) + [in_validation_context(self.learn)]


def test_learner_lock_is_held_in_validate_and_get_preds_and_not_in_fit():
    learn = tiny_learner([cb := SeeLock()])
    learn.fit(1)
    learn.validate()
    learn.get_preds()
    assert cb.seen == [False, True, True] and not learn.lock.locked()


class Order(AttachAwareCallback):
    def __init__(self):
        self.events = []

    def attach(self, learn):
        self.events.append(("attach", hasattr(learn, "order")))

    def detach(self, learn):
        self.events.append(("detach", self.learn is learn))


def test_add_cb_sets_learn_before_the_attribute_and_remove_cb_clears_it_before_reading_the_name():
    learn = tiny_learner()
    cb = Order()
    learn.add_cb(cb)
    assert learn.order is cb and cb.learn is learn
    learn.remove_cb(cb)
    assert cb.events == [("attach", False), ("detach", True)] and cb.learn is None and not hasattr(learn, "order")
    assert "learn" in vars(cb)  # the instance attribute fastai's plain `cb.learn` used (pickles look the same)


def test_keep_attribute_makes_remove_cb_leave_the_learners_attribute_and_reattach_puts_a_callback_back():
    learn = tiny_learner()
    first, second = Order(), Order()
    learn.add_cb(first)
    learn.remove_cb(first)
    learn.add_cb(second)
    second.detach = lambda learn: (reattach(first, learn), setattr(learn, "order", first), second.keep_attribute())
    learn.remove_cb(second)
    assert learn.order is first and first in learn.cbs and first.learn is learn and second not in learn.cbs


def test_train_eval_callback_sets_the_epoch_to_zero_in_every_before_fit_also_around_validate():
    learn = tiny_learner()
    learn.fit(3)
    assert learn.epoch == 2
    learn.validate()
    assert learn.epoch == 0


def test_lr_find_and_the_progress_bar_are_the_learners_lr_finder_and_progress():
    assert LRFinder().name == "lr_finder" and ProgressCallback().name == "progress"
    learn = tiny_learner([ProgressCallback()])
    assert shows_progress(learn)
    with learn.no_bar():
        assert not shows_progress(learn)
    seen = []
    learn.add_cb(type("See", (Callback,), {"before_fit": lambda self: seen.append(finding_lr(self.learn))})())
    with learn.no_bar():
        learn.lr_find(num_it=3, show_plot=False, suggest_funcs=())
        learn.fit(1)
    assert seen == [True, False]


def test_fastai_flat_losses_hold_the_torch_loss_in_func():
    assert isinstance(inner_loss(CrossEntropyLossFlat()), nn.CrossEntropyLoss)
    plain = nn.CrossEntropyLoss()
    assert inner_loss(plain) is plain


def test_value_metric_columns_are_read_from_value_and_named_by_metric_name():
    metric = ValueMetric(func=lambda: 0.25, metric_name="ece")
    learn = tiny_learner(metrics=[metric])
    learn.fit(1)
    assert learn.recorder.metric_names[-2] == "ece" and learn.recorder.values[-1][-1] == 0.25


def test_recorder_train_metrics_prefixes_the_columns_train_and_valid():
    learn = tiny_learner(metrics=[ValueMetric(func=lambda: 0.5, metric_name="ece")])
    assert not prefixed_columns(learn)
    learn.recorder.train_metrics = True
    assert prefixed_columns(learn)
    learn.fit(1)
    assert "valid_ece" in learn.recorder.metric_names and "train_ece" in learn.recorder.metric_names
    learn.recorder.valid_metrics = False
    assert not prefixed_columns(learn)
    assert Recorder().train_metrics is False


# --- trackers --------------------------------------------------------------------------------------------------


def test_fastai_guesses_higher_is_better_for_names_without_loss_or_error_and_stores_min_delta_negated():
    assert TrackerCallback(monitor="ece").comp is np.greater
    assert TrackerCallback(monitor="valid_loss").comp is np.less
    assert TrackerCallback(monitor="error_rate", min_delta=0.1).min_delta == -0.1
    assert tracker_monitor(SaveModelCallback(monitor="nll")) == "nll" and tracker_monitor(Recorder()) is None


def test_turn_tracker_turns_only_fastais_guess_and_keeps_min_delta_meaning():
    guessed = EarlyStoppingCallback(monitor="ece", min_delta=0.01, reset_on_fit=False)
    guessed.best = 0.9
    assert turn_tracker(guessed, np.less)
    assert guessed.comp is np.less and guessed.min_delta == -0.01 and guessed.best is None
    chosen = EarlyStoppingCallback(monitor="ece", comp=np.greater.__call__)
    assert not turn_tracker(chosen, np.less) and chosen.comp is not np.less
    assert not turn_tracker(EarlyStoppingCallback(monitor="accuracy"), np.greater)


def test_a_tracker_whose_run_is_false_sits_the_fit_out_and_runs_again_after_it():
    class Count(TrackerCallback):
        calls = 0

        def after_epoch(self):
            Count.calls += 1

    tracker = Count(monitor="valid_loss")
    learn = tiny_learner([tracker])
    tracker.before_fit = lambda: sit_out(tracker)  # fastai's own before_fit sets run from lr_finder/gather_preds
    learn.fit(2)
    assert Count.calls == 0 and tracker.run  # fastai sets run back at after_fit
