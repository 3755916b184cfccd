"""The calibration-loss family inside fastai: each loss trains (also under MixUp), gives probabilities, decoded ids
and per-item losses through `get_preds`, and survives `export`/`load_learner`; `MaxSupSchedule` raises MaxSup's
alpha over a fit; `AdaFocalCallback` steps AdaFocal's gammas once per epoch from the `CalibrationCallback`'s
counters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.callback.mixup import MixUp
from fastai.callback.progress import ProgressCallback  # noqa: F401  (registers Learner.no_bar)
from fastai.data.core import Datasets
from fastai.learner import Learner, load_learner
from fastai.torch_core import set_seed
from torch import nn

from fastai_ls import (
    AdaFocalCallback,
    AdaFocalLoss,
    AdaptiveFocalLoss,
    CalibrationCallback,
    ConfidencePenaltyLoss,
    FocalLoss,
    FocalLossFlat,
    LogitNormLoss,
    MarginLabelSmoothing,
    MaxSupLoss,
    MaxSupSchedule,
)
from fastai_ls.loss.adafocal import ada_focal_update, equal_mass_bins

N_CLASSES, N_FEATURES = 4, 8
LOSSES = {
    "focal": FocalLoss,
    "flsd53": AdaptiveFocalLoss,
    "adafocal": AdaFocalLoss,
    "mbls": MarginLabelSmoothing,
    "maxsup": MaxSupLoss,
    "logitnorm": LogitNormLoss,
    "confidence_penalty": ConfidencePenaltyLoss,
    "focal_flat": FocalLossFlat,
}


def blobs(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(N_CLASSES, N_FEATURES, generator=g) * 1.5
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    return centres[y] + torch.randn(n, N_FEATURES, generator=g), y


X, Y = blobs()


def features(i):
    return X[i]


def label(i):
    return Y[i]


def learner(loss_func, cbs=None) -> Learner:
    set_seed(0)  # the model's start and the loaders' shuffling
    items = list(range(len(Y)))
    dsets = Datasets(items, tfms=[[features], [label]], splits=[items[:192], items[192:]])
    return Learner(dsets.dataloaders(bs=64), nn.Sequential(nn.Linear(N_FEATURES, 16), nn.ReLU(),
                                                            nn.Linear(16, N_CLASSES)), loss_func=loss_func, cbs=cbs)


def fit(learn, epochs=1, **kwargs):
    with learn.no_bar(), learn.no_logging():
        learn.fit(epochs, 3e-2, **kwargs)


@pytest.mark.slow  # a fit per loss (the quick lane fits each under MixUp below)
@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_trains_and_get_preds_gives_probabilities_ids_and_item_losses(name):
    learn = learner(LOSSES[name]())
    fit(learn, 2)
    with learn.no_bar():
        probs, targets, decoded, losses = learn.get_preds(with_decoded=True, with_loss=True)
    torch.testing.assert_close(probs.sum(1), torch.ones(64))
    assert torch.equal(decoded, probs.argmax(1))
    assert losses.shape == (64,) and torch.isfinite(losses).all()
    with learn.no_bar():
        logits, _ = learn.get_preds(act=lambda x: x)
    torch.testing.assert_close(losses.mean(), learn.loss_func(logits, targets))
    assert (decoded == targets).float().mean() > 0.5  # the blobs are easy: it learned


@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_trains_under_mixup(name):
    learn = learner(LOSSES[name]())
    fit(learn, 1, cbs=MixUp())
    assert learn.loss_func is not None and isinstance(learn.loss_func, LOSSES[name])  # MixUp put it back
    assert torch.isfinite(torch.tensor(learn.recorder.losses)).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", LOSSES)
def test_export_and_load_learner_keep_the_loss(name, tmp_path):
    learn = learner(LOSSES[name](weight=torch.linspace(0.5, 2.0, N_CLASSES)))
    fit(learn, 1)
    learn.export(tmp_path / "export.pkl")
    loaded = load_learner(tmp_path / "export.pkl")
    assert type(loaded.loss_func) is type(learn.loss_func) and repr(loaded.loss_func) == repr(learn.loss_func)
    torch.testing.assert_close(loaded.loss_func.weight, learn.loss_func.weight)
    x, y = X[:10], Y[:10]
    torch.testing.assert_close(loaded.loss_func(loaded.model(x), y), learn.loss_func(learn.model.cpu()(x), y))


# --- MaxSup's alpha schedule -----------------------------------------------------------------------------------------


class RecordAlpha(Callback):
    order = MaxSupSchedule.order + 1

    def before_fit(self):
        self.seen = []

    def before_batch(self):
        if self.training:
            self.seen.append((self.pct_train, self.learn.loss_func.alpha if hasattr(self.learn.loss_func, "alpha")
                              else None))


def test_maxsup_schedule_raises_alpha_linearly_over_the_fit():
    recorder = RecordAlpha()
    learn = learner(MaxSupLoss())
    fit(learn, 2, cbs=[MaxSupSchedule(0.1, 0.2), recorder])
    pct, alpha = zip(*recorder.seen)
    assert alpha[0] == pytest.approx(0.1) and len(alpha) == 6
    assert all(a == pytest.approx(0.1 + 0.1 * p) for p, a in zip(pct, alpha))
    assert list(alpha) == sorted(alpha) and alpha[-1] < 0.2
    assert learn.loss_func.alpha == alpha[-1]  # validation and get_preds use the last alpha


def test_maxsup_schedule_reaches_the_loss_under_mixup():
    learn = learner(MaxSupLoss())
    fit(learn, 1, cbs=[MixUp(), MaxSupSchedule(0.3, 0.5)])
    assert 0.3 < learn.loss_func.alpha < 0.5


def test_maxsup_schedule_refuses_another_loss_and_leaves_the_learner_usable():
    learn = learner(FocalLoss(), cbs=MaxSupSchedule())
    with learn.no_bar():
        learn.validate()  # validation alone schedules nothing and raises nothing
        with pytest.raises(TypeError, match="MaxSupSchedule schedules a MaxSupLoss"):
            learn.fit(1)
        assert len(learn.validate()) == 1


# --- AdaFocal's per-epoch update -------------------------------------------------------------------------------------


def test_ada_focal_callback_steps_the_gammas_once_per_epoch_from_the_calibration_counters():
    calibration = CalibrationCallback(metrics=("ece",), ci=None)
    loss = AdaFocalLoss(n_bins=5)
    learn = learner(loss, cbs=[calibration, AdaFocalCallback()])
    fit(learn, 3)
    assert len(calibration.states) == 3
    gammas = torch.ones(5, dtype=torch.float64)
    for state in calibration.states:  # replay the paper's update on each epoch's validation bins
        edges, bins = equal_mass_bins(state.fine, 5)
        gammas = ada_focal_update(gammas, bins)
    torch.testing.assert_close(loss.gammas, gammas)
    torch.testing.assert_close(loss.edges, edges)
    assert not torch.equal(gammas, torch.ones(5, dtype=torch.float64))

    before = loss.gammas.clone()
    with learn.no_bar():
        learn.get_preds()
        learn.validate()
    assert torch.equal(loss.gammas, before)  # only a fit's validation passes move them


def test_ada_focal_callback_trains_under_mixup():
    loss = AdaFocalLoss(n_bins=5)
    learn = learner(loss, cbs=[CalibrationCallback(ci=None), AdaFocalCallback()])
    fit(learn, 1, cbs=MixUp())
    assert not torch.equal(loss.gammas, torch.ones(5, dtype=torch.float64))


def test_ada_focal_callback_needs_a_calibration_callback_and_leaves_the_learner_usable():
    learn = learner(AdaFocalLoss(), cbs=AdaFocalCallback())
    with learn.no_bar():
        with pytest.raises(ValueError, match="add one"):
            learn.fit(1)
        assert len(learn.validate()) == 1
    learn = learner(FocalLoss(), cbs=[CalibrationCallback(ci=None), AdaFocalCallback()])
    with learn.no_bar(), pytest.raises(TypeError, match="AdaFocalCallback updates an AdaFocalLoss"):
        learn.fit(1)


def test_the_family_matches_cross_entropy_in_a_fit_at_neutral_parameters():
    # One fit with FocalLoss(gamma=0) and one with F.cross_entropy from the same start take the same steps.
    a, b = learner(FocalLoss(gamma=0.0)), learner(nn.CrossEntropyLoss())
    fit(a, 1)
    fit(b, 1)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q)
    torch.testing.assert_close(F.cross_entropy(a.model(X), Y), F.cross_entropy(b.model(X), Y))
