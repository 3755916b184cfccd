"""`compare_losses`: every loss trained from the same seeds on the same splits, scored as trained and after its own
best cross-fitted calibrator, with paired differences from cross-entropy; the named losses are imported only when
chosen. The training is replaced by seeded fake logits here (one real run is in tests/cli/test_demo_losses.py)."""

from __future__ import annotations

import pytest
import torch

import fastai_ls
import fastai_ls.integration.compare_losses as compare_module
from fastai_ls.calibration import CalibrationState
from fastai_ls.integration.compare_losses import STAGES, compare_losses
from fastai_ls.integration.loss_registry import LOSSES, LossSpec, check_loss_names, get_loss


def fake_held_out(eps: float, seed: int, n: int = 150):
    """Seed `seed`'s validation rows (the same targets for every loss), with logits that depend on the loss."""
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(n, 4, generator=g)
    target = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
    return (3.0 - 15 * eps) * logits, target


@pytest.fixture
def fake_training(monkeypatch):
    trained = []

    def train(make_learner, eps, epochs, seed, label="", loss_func=None):
        learner = make_learner(eps=eps)
        trained.append((learner["seed"], loss_func.eps, seed, label))
        return {"loss": loss_func, "seed": seed}

    monkeypatch.setattr(compare_module, "train", train)
    monkeypatch.setattr(compare_module, "validation_logits", lambda learn: fake_held_out(learn["loss"].eps,
                                                                                          learn["seed"]))
    return trained


def make_learner(eps=0.1, seed=0):
    return {"eps": eps, "seed": seed}


def test_every_loss_trains_from_every_seed_on_that_seeds_split(fake_training):
    compare_losses(make_learner, ["ce", "ls"], seeds=3, seed=7, methods=["temperature"], n_boot=50)
    assert [(split, eps, seed) for split, eps, seed, _ in fake_training] == [
        (7, 0.0, 7), (8, 0.0, 8), (9, 0.0, 9), (7, 0.1, 7), (8, 0.1, 8), (9, 0.1, 9)]
    assert fake_training[0][3] == "training 1/6: cross-entropy, seed 7"


def test_each_models_scores_are_its_states_metrics_averaged_over_seeds(fake_training):
    result = compare_losses(make_learner, ["ls", "ce"], seeds=[3, 11], methods=["temperature"], n_boot=100)
    assert result.baseline == "ce" and result.seeds == [3, 11]
    for name, eps in (("ce", 0.0), ("ls", 0.1)):
        per_seed = []
        for s in (3, 11):
            logits, target = fake_held_out(eps, s)
            state = CalibrationState(4)
            state.update(logits.softmax(1), target)
            m = state.metrics()
            expected = {"error_rate": 1 - m["accuracy"], **{k: m[k] for k in ("ece", "smece", "nll", "brier", "aurc")}}
            row = result.per_seed.loc[(name, s, "as trained")]
            assert row["calibrator"] == "none"
            for metric, value in expected.items():
                assert row[metric] == pytest.approx(value, rel=1e-6), (name, s, metric)
            per_seed.append(expected)
        for metric in per_seed[0]:
            estimate = result.table.loc[(name, "as trained", metric), "estimate"]
            assert estimate == pytest.approx(sum(p[metric] for p in per_seed) / 2, rel=1e-6)
    assert set(result.table.index.unique("stage")) == set(STAGES)
    assert (result.table.loc["ce", ["difference", "difference_lower", "difference_upper"]] == 0).all().all()


def test_the_best_calibrator_undoes_what_the_loss_did_to_calibration(fake_training):
    result = compare_losses(make_learner, ["ce", "ls"], seeds=2, methods=["temperature"], n_boot=200)
    trained, calibrated = (result.table.xs(stage, level="stage") for stage in STAGES)
    # the fake ls model is under-confident, the fake ce model over-confident: temperature scaling fixes both
    assert (result.per_seed.xs(STAGES[1], level="stage")["calibrator"] == "temperature").all()
    for name in ("ce", "ls"):
        assert calibrated.loc[(name, "nll"), "estimate"] < trained.loc[(name, "nll"), "estimate"]
    assert abs(calibrated.loc[("ls", "nll"), "difference"]) < abs(trained.loc[("ls", "nll"), "difference"])
    shown = result.shown("best calibrator", differences=True)
    assert shown.index.tolist() == ["ls"] and list(shown.columns)[0] == "error rate"


def test_an_unknown_loss_is_one_line_naming_the_valid_ones_before_any_training(fake_training):
    with pytest.raises(ValueError, match=r"^unknown loss 'focl' \(did you mean 'focal'\?\); known: ce,ls,focal,"
                                         r"flsd53,mbls,maxsup,logitnorm$"):
        compare_losses(make_learner, ["ce", "focl"])
    with pytest.raises(ValueError, match="each loss may be named once"):
        check_loss_names(["ce", "ce"])
    assert fake_training == []


def test_a_loss_whose_class_is_missing_fails_when_chosen_and_only_then(fake_training, monkeypatch):
    monkeypatch.setitem(LOSSES, "future", LossSpec("fastai_ls.loss.not_written_yet", "FutureLossFlat", {}, "future"))
    with pytest.raises(ValueError, match="loss 'future' needs fastai_ls.loss.not_written_yet.FutureLossFlat, which "
                                         "this installation of fastai_ls does not have"):
        compare_losses(make_learner, ["ce", "future"], seeds=1, methods=["temperature"])
    assert fake_training == []  # refused before the first training
    assert compare_losses(make_learner, ["ce"], seeds=1, methods=["temperature"], n_boot=20) is not None


def test_every_registered_loss_that_exists_is_built_with_its_papers_defaults():
    built = {}
    for name, spec in LOSSES.items():
        try:
            built[name] = get_loss(name)
        except ValueError as err:
            assert "does not have" in str(err)  # a class of the family not in this installation
            continue
        for key, value in spec.kwargs.items():
            assert getattr(built[name], key) == value, (name, key)
        logits, target = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
        assert torch.isfinite(built[name](logits, target))
    assert {"ce", "ls"} <= set(built)
    assert get_loss("ce") is not get_loss("ce")  # a new loss each time: no state shared between trainings


def test_bad_seeds_are_refused():
    for seeds in (0, [], [1, 1], "3", [-1]):
        with pytest.raises(ValueError, match="seed"):
            compare_losses(make_learner, ["ce"], seeds=seeds)


def test_compare_losses_is_a_top_level_name():
    assert fastai_ls.compare_losses is compare_losses
