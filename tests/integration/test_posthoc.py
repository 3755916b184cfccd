"""Post-hoc calibration of a fastai Learner: fit_calibrator / apply_calibrator reach get_preds, predict, tta,
Interpretation and CalibrationCallback, survive export and load_learner; temperature scaling by its own names."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastai.data.core import DataLoaders, Datasets
from fastai.data.transforms import ItemGetter
from fastai.interpret import Interpretation
from fastai.learner import Learner, load_learner
from fastai.losses import BCEWithLogitsLossFlat, CrossEntropyLossFlat
from torch import nn

from fastai_ls import (
    CalibrationCallback,
    LabelSmoothingCrossEntropy,
    LabelSmoothingCrossEntropyFlat,
    apply_calibrator,
    apply_temperature,
    compare_calibrators,
    fit_calibrator,
    fit_temperature,
    remove_calibrator,
    remove_temperature,
)
from fastai_ls.calibration.calibrators import CalibrationWarning, DirichletCalibration, TemperatureScaling
from fastai_ls.calibration.compare import compare_on_logits
from fastai_ls.integration.posthoc import (
    CalibratedActivation,
    applied_calibrator,
    holdout_logits,
)
from fastai_ls.integration.temperature import temperature_from_logits

N_CLASSES = 4


class PassLogits(nn.Module):
    """Returns its input as the logits (fastai needs a parameter to find the model's device)."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x


def logit_learner(sharpen: float, n: int = 600, seed: int = 0, loss_func=None, bias=None) -> Learner:
    """A "model" that returns its input: logits `sharpen` times sharper than the labels' true distribution (and
    shifted by `bias` per class). Validation set: all n rows; training set: the first 10."""
    g = torch.Generator().manual_seed(seed)
    true_logits = 2 * torch.randn(n, N_CLASSES, generator=g)
    y = torch.multinomial(true_logits.softmax(1), 1, generator=g).squeeze(1)
    logits = sharpen * true_logits + (0 if bias is None else bias)
    # fastai `Datasets` (not plain lists) so that `learn.export()` can empty them and `tta` can switch splits.
    dsets = Datasets(list(zip(logits, y)), [[ItemGetter(0)], [ItemGetter(1)]],
                     splits=(list(range(10)), list(range(n))))
    dls = dsets.dataloaders(bs=64, num_workers=0, device="cpu")
    learn = Learner(dls, PassLogits(), loss_func=loss_func or LabelSmoothingCrossEntropy(0.1),
                    cbs=CalibrationCallback())
    learn.logger = print
    return learn


def raw(learn: Learner, **kwargs):
    with learn.no_bar():
        return learn.get_preds(act=lambda z: z, **kwargs)


def grid_temperature(logits, target) -> float:
    """Brute force: the NLL at 4001 log-spaced temperatures in [0.1, 10], all at once."""
    logits, target = logits.as_subclass(torch.Tensor).double(), target.as_subclass(torch.Tensor)
    grid = torch.exp(torch.linspace(math.log(0.1), math.log(10), 4001, dtype=torch.float64))
    log_probs = (logits / grid[:, None, None]).log_softmax(-1)
    nll = -log_probs.gather(2, target.expand(len(grid), -1)[..., None]).mean((1, 2))
    return float(grid[nll.argmin()])


# --- temperature scaling by its own names (deprecated: each still works, with a FutureWarning) ----------------

# The behaviour of the deprecated names is tested as before; that each warns, in test_deprecated_names.py.
DEPRECATED = pytest.mark.filterwarnings("ignore:.*is deprecated.*:FutureWarning")


@DEPRECATED
def test_fit_temperature_finds_the_nll_minimum_and_recovers_a_known_temperature():
    learn = logit_learner(3.0)
    with learn.no_bar():
        fit = fit_temperature(learn)
    logits, target = raw(learn)
    assert fit.temperature == pytest.approx(grid_temperature(logits, target), rel=2e-3)
    assert 2.4 < fit.temperature < 3.6 and not fit.at_bound
    assert fit.nll_after < fit.nll_before and fit.ece_after < fit.ece_before
    assert fit.nll_before == pytest.approx(float(F.cross_entropy(logits, target)), rel=1e-5)
    assert fit.nll_after == pytest.approx(float(F.cross_entropy(logits / fit.temperature, target)), rel=1e-5)
    assert temperature_from_logits(logits, target) == fit.temperature


@DEPRECATED
def test_fit_temperature_is_below_one_for_under_confident_logits():
    learn = logit_learner(0.5)
    with learn.no_bar():
        assert fit_temperature(learn).temperature < 0.75


@DEPRECATED
def test_fit_temperature_uses_the_class_axis_of_a_flat_loss_on_token_predictions():
    """(N, T, C) logits under `LabelSmoothingCrossEntropyFlat(axis=-1)`, as a text learner gives."""
    n, length = 200, 3
    g = torch.Generator().manual_seed(4)
    true_logits = 2 * torch.randn(n, length, N_CLASSES, generator=g)
    y = torch.multinomial(true_logits.reshape(-1, N_CLASSES).softmax(1), 1, generator=g).view(n, length)
    dls = DataLoaders.from_dsets(list(zip(2.0 * true_logits, y))[:10], list(zip(2.0 * true_logits, y)), bs=32,
                                 num_workers=0, device="cpu")
    learn = Learner(dls, PassLogits(), loss_func=LabelSmoothingCrossEntropyFlat(0.1), cbs=CalibrationCallback())
    with learn.no_bar(), learn.no_logging():
        fit = fit_temperature(learn)
    rows, ids = 2.0 * true_logits.reshape(-1, N_CLASSES), y.reshape(-1)
    assert fit.temperature == pytest.approx(grid_temperature(rows, ids), rel=2e-3)
    assert fit.nll_before == pytest.approx(float(F.cross_entropy(rows, ids)), rel=1e-5)
    assert learn.calibration.last_metrics["n"] == n * length


@DEPRECATED
def test_applied_temperature_scales_get_preds_and_survives_export(tmp_path):
    learn = logit_learner(3.0)
    logits, _ = raw(learn)
    with learn.no_bar():
        apply_temperature(learn, 2.5)
        apply_temperature(learn, 2.0)  # replaces, does not compound
        scaled, _ = learn.get_preds()
    torch.testing.assert_close(scaled, (logits / 2.0).softmax(1))
    learn.export(tmp_path / "scaled.pkl")
    loaded = load_learner(tmp_path / "scaled.pkl")
    assert isinstance(loaded.loss_func.activation, CalibratedActivation)
    assert applied_calibrator(loaded).temperature == 2.0
    with loaded.no_bar():
        again, _ = loaded.get_preds(dl=learn.dls.valid)
    torch.testing.assert_close(again, scaled)
    with learn.no_bar():
        remove_temperature(learn)
        plain, _ = learn.get_preds()
    torch.testing.assert_close(plain, logits.softmax(1))
    assert applied_calibrator(learn) is None


@DEPRECATED
def test_apply_temperature_rejects_non_positive_values():
    for bad in (0.0, -2.0, math.nan, "2", True):  # True was taken for T = 1
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            apply_temperature(logit_learner(1.0, n=20), bad)
    # A T computed with numpy was refused ("must be a finite number > 0, got np.float32(2.0)").
    learn = apply_temperature(logit_learner(1.0, n=20), np.float32(2.0))
    assert applied_calibrator(learn).temperature == 2.0


@DEPRECATED
def test_a_plain_function_loss_is_refused_so_that_no_other_learner_is_calibrated_through_it():
    # apply_calibrator set `F.cross_entropy.activation`: every learner with loss_func=F.cross_entropy in the process
    # got the calibrated probabilities, and learn.export() (which pickles a function by name) dropped it.
    learn, other = logit_learner(2.0, n=60, loss_func=F.cross_entropy), logit_learner(2.0, n=60,
                                                                                    loss_func=F.cross_entropy)
    with pytest.raises(TypeError, match="the loss is the function cross_entropy, which every learner using it "
                                        "shares"):
        apply_temperature(learn, 2.0)
    assert not hasattr(F.cross_entropy, "activation") and applied_calibrator(learn) is None
    with other.no_bar():
        out, _ = other.get_preds()
    torch.testing.assert_close(out, raw(other)[0])  # fastai's get_preds on a function loss: no activation at all
    with learn.no_bar():  # fitting and comparing change nothing, and work with a function loss
        assert fit_calibrator(learn, "temperature").temperature > 1


@DEPRECATED
def test_fit_temperature_on_a_degenerate_model_is_bounded_and_says_why():
    """Issue 12: a two-class problem the model always gets right with a margin gave T = 758,783 without a word
    (notebook 02's small mode); an uninformative model runs the other way."""
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 2, (300,), generator=g)
    logits = torch.zeros(300, N_CLASSES)
    logits[:, :2] = 6.0 * F.one_hot(y, 2) + 0.1 * torch.randn(300, 2, generator=g)
    dsets = Datasets(list(zip(logits, y)), [[ItemGetter(0)], [ItemGetter(1)]], splits=(list(range(10)),
                                                                                        list(range(300))))
    learn = Learner(dsets.dataloaders(bs=64, num_workers=0, device="cpu"), PassLogits(),
                    loss_func=LabelSmoothingCrossEntropy(0.1))
    with learn.no_bar(), pytest.warns(CalibrationWarning, match="lowest at T <= 0.01.*right with a margin"):
        fit = fit_temperature(learn)
    assert fit.temperature == 0.01 and fit.at_bound
    noise = 30 * torch.randn(300, 10, generator=g)
    with pytest.warns(CalibrationWarning, match="lowest at T >= 100.*the logits carry almost no information"):
        assert temperature_from_logits(noise, noise.argmin(1)) == 100.0


@DEPRECATED
def test_fit_temperature_survives_a_neg_inf_logit():
    """Issue 10: a single -inf logit crashed LBFGS ("value cannot be converted to type float without overflow")."""
    g = torch.Generator().manual_seed(6)
    true_logits = 2 * torch.randn(300, N_CLASSES, generator=g)
    y = torch.multinomial(true_logits.softmax(1), 1, generator=g).squeeze(1)
    logits = 3 * true_logits
    logits[7, (int(y[7]) + 1) % N_CLASSES] = -math.inf
    dsets = Datasets(list(zip(logits, y)), [[ItemGetter(0)], [ItemGetter(1)]], splits=(list(range(10)),
                                                                                        list(range(300))))
    learn = Learner(dsets.dataloaders(bs=64, num_workers=0, device="cpu"), PassLogits(),
                    loss_func=LabelSmoothingCrossEntropy(0.1))
    with learn.no_bar():
        fit = fit_temperature(learn)
    assert 2 < fit.temperature < 4.5 and math.isfinite(fit.nll_after)


# --- any calibrator -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dirichlet", "top_label_isotonic"])
def test_an_applied_calibrator_reaches_get_preds_predict_tta_interpretation_and_the_callback(method):
    bias = torch.tensor([1.0, 0.0, 0.0, -1.0])
    learn = logit_learner(2.5, bias=bias)
    options = {"reg": 0.01} if method == "dirichlet" else {}
    with learn.no_bar():
        calibrator = fit_calibrator(learn, method, **options)
        logits, target = raw(learn)
        before = learn.calibration.last_metrics
        apply_calibrator(learn, calibrator)
        assert applied_calibrator(learn) is not calibrator  # a copy: the caller's calibrator is left alone
        expected = calibrator(logits)
        probs, _, decoded = learn.get_preds(with_decoded=True)
        torch.testing.assert_close(probs, expected)
        assert torch.equal(decoded, expected.argmax(1))
        # CalibrationCallback scored the calibrated probabilities in that pass.
        after = learn.calibration.last_metrics
        assert after["ece"] < before["ece"] and after["nll"] < before["nll"]
        item = learn.dls.valid_ds[3]
        _, decoded_one, probs_one = learn.predict(item)
        torch.testing.assert_close(probs_one, expected[3])
        assert int(decoded_one) == int(expected[3].argmax())
        tta_probs, _ = learn.tta(n=2)  # the "augmentations" change nothing here: the calibrated probabilities
        torch.testing.assert_close(tta_probs, expected)
        interp = Interpretation.from_learner(learn)
        _, interp_probs, _, interp_decoded, _ = interp[[0, 5]]
        torch.testing.assert_close(interp_probs, expected[[0, 5]])
        assert torch.equal(interp_decoded, expected[[0, 5]].argmax(1))
    if method == "top_label_isotonic":
        assert torch.equal(decoded, logits.argmax(1))
    else:  # Dirichlet calibration undoes part of the bias: some decisions change
        assert (decoded != logits.argmax(1)).any()


def test_an_applied_calibrator_survives_export_and_load_learner(tmp_path):
    learn = logit_learner(2.5)
    with learn.no_bar():
        apply_calibrator(learn, fit_calibrator(learn, "isotonic"))
        probs, _ = learn.get_preds()
    learn.export(tmp_path / "calibrated.pkl")
    loaded = load_learner(tmp_path / "calibrated.pkl")
    assert type(applied_calibrator(loaded)).__name__ == "IsotonicCalibration"
    with loaded.no_bar():
        again, _ = loaded.get_preds(dl=learn.dls.valid)
        torch.testing.assert_close(again, probs)
        remove_calibrator(loaded)
        plain, _ = loaded.get_preds(dl=learn.dls.valid)
    torch.testing.assert_close(plain, raw(learn)[0].softmax(1))


def test_a_calibrator_for_another_class_count_fails_in_get_preds_and_leaves_the_learner_usable():
    learn = logit_learner(2.0, n=100)
    three = torch.arange(60) % 3
    wrong = TemperatureScaling().fit(2 * F.one_hot(three, 3) + torch.randn(60, 3), three)
    apply_calibrator(learn, wrong)
    with learn.no_bar(), pytest.raises(ValueError, match="fitted on 3 classes, got logits with 4"):
        learn.get_preds()
    remove_calibrator(learn)
    with learn.no_bar():
        _, _, probs = learn.predict(learn.dls.valid_ds[0])  # the lock was released
    assert probs.shape == (N_CLASSES,)


def test_apply_calibrator_refuses_a_calibrator_for_another_class_count_than_the_learners_data():
    learn = logit_learner(2.0, n=100)
    learn.dls.c = N_CLASSES  # what a CategoryBlock's DataLoaders say
    three = torch.arange(60) % 3
    wrong = TemperatureScaling().fit(2 * F.one_hot(three, 3) + torch.randn(60, 3), three)
    with pytest.raises(ValueError, match=r"fitted on 3 classes, but the learner's data has 4 \(learn.dls.c\)"):
        apply_calibrator(learn, wrong)
    assert applied_calibrator(learn) is None


def test_training_under_an_applied_calibrator_warns_that_it_no_longer_fits():
    learn = logit_learner(2.0, n=100)
    with learn.no_bar():
        apply_calibrator(learn, fit_calibrator(learn, "temperature"))
        with pytest.warns(UserWarning, match="no longer fits the model"):
            learn.fit(1, 1e-3)
        remove_calibrator(learn)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            learn.fit(1, 1e-3)
            learn.validate()


@DEPRECATED
def test_calibrators_refuse_a_loss_whose_activation_is_not_a_softmax():
    learn = logit_learner(1.0, n=50)
    learn.loss_func = BCEWithLogitsLossFlat()
    with pytest.raises(TypeError, match="BCEWithLogitsLossFlat's activation is not a softmax"):
        apply_temperature(learn, 2.0)
    with pytest.raises(TypeError, match="not a softmax"):
        fit_calibrator(learn, "temperature")
    with pytest.raises(ValueError, match="not fitted"):
        apply_calibrator(logit_learner(1.0, n=50), DirichletCalibration())


@pytest.mark.parametrize("loss_func", [CrossEntropyLossFlat(), nn.CrossEntropyLoss(), LabelSmoothingCrossEntropy()])
def test_fastai_and_torch_cross_entropy_losses_take_a_calibrator(loss_func):
    learn = logit_learner(3.0, n=200, loss_func=loss_func)
    with learn.no_bar():
        apply_calibrator(learn, fit_calibrator(learn, "temperature"))
        probs, _ = learn.get_preds()
    logits, _ = raw(learn)
    torch.testing.assert_close(probs, (logits / applied_calibrator(learn).temperature).softmax(1))


def test_fit_calibrator_leaves_out_the_rows_the_loss_ignores():
    learn = logit_learner(2.0, n=300, loss_func=LabelSmoothingCrossEntropy(0.1, ignore_index=2))
    with learn.no_bar(), pytest.warns(CalibrationWarning, match=r"1 of 4 classes never occur .* \(2\)"):
        logits, target = holdout_logits(learn)
        calibrator = fit_calibrator(learn, "vector")
    all_logits, all_target = raw(learn)
    kept = all_target != 2
    assert torch.equal(logits, all_logits[kept]) and torch.equal(target, all_target[kept])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)  # class 2 never occurs: the point of the test
        expected = type(calibrator)().fit(all_logits[kept], all_target[kept])
    torch.testing.assert_close(calibrator(all_logits), expected(all_logits))


def test_compare_calibrators_on_a_learner_is_the_comparison_of_its_held_out_logits():
    learn = logit_learner(2.5, n=400)
    with learn.no_bar():
        table = compare_calibrators(learn, methods=["temperature", "histogram"], folds=4)
    logits, target = raw(learn)
    expected = compare_on_logits(logits, target, methods=["temperature", "histogram"], folds=4)
    assert table.drop(columns="fit_s").equals(expected.drop(columns="fit_s"))
    with pytest.raises(ValueError, match="not a learner and targets"):
        compare_calibrators(learn, target)
    with pytest.raises(ValueError, match="logits need their targets"):
        compare_calibrators(logits)


def test_held_out_data_that_is_empty_or_unlabelled_is_named_as_such():
    # Both were "post-hoc calibration needs one target tensor of class ids per item".
    learn = logit_learner(2.0, n=40)
    unlabelled = learn.dls.test_dl([x for x, _ in learn.dls.valid_ds], with_labels=False)
    rows = list(learn.dls.valid_ds)
    no_valid = Learner(Datasets(rows, [[ItemGetter(0)], [ItemGetter(1)]], splits=(list(range(40)), []))
                       .dataloaders(bs=8, num_workers=0, device="cpu"), PassLogits(),
                       loss_func=LabelSmoothingCrossEntropy(0.1))
    with learn.no_bar(), no_valid.no_bar():
        with pytest.raises(ValueError, match=r"dl has no labels: .*\.test_dl\(items, with_labels=True\)"):
            fit_calibrator(learn, "temperature", dl=unlabelled)
        with pytest.raises(ValueError, match="the validation set is empty"):
            compare_calibrators(no_valid)
    assert not learn.lock.locked() and not no_valid.lock.locked()


def test_fit_calibrator_fits_a_copy_and_never_the_callers_own_calibrator():
    """Issue 20.11: fit_calibrator(learn, cal) fitted the caller's instance in place (T became 2.833)."""
    learn = logit_learner(sharpen=2.5, seed=40)
    given, fixed = TemperatureScaling(), TemperatureScaling(2.0)
    with learn.no_bar():
        fitted = fit_calibrator(learn, given)
        kept = fit_calibrator(learn, fixed)
    assert fitted is not given and not given.fitted and fitted.temperature > 1.5
    assert kept is not fixed and kept.temperature == fixed.temperature == 2.0


def test_the_learner_level_comparison_shows_its_progress_bar_only_where_the_learner_shows_one(monkeypatch):
    """Issue 20.3: quiet under learn.no_bar(), as fastai's own bars are."""
    import fastai_ls.calibration.compare as compare

    shown = []

    class Bar(list):
        comment = ""

        def __init__(self, jobs, leave=True):
            super().__init__(jobs)
            shown.append(len(jobs))

    monkeypatch.setattr(compare, "progress_bar", Bar)
    monkeypatch.setattr(compare, "_bar_visible", lambda: True)
    learn = logit_learner(sharpen=2.5, seed=41)
    with learn.no_bar():
        compare_calibrators(learn, methods=["temperature"], folds=3, ci=None)
    assert shown == []
    compare_calibrators(learn, methods=["temperature", "histogram"], folds=3, ci=None)
    assert shown == [6]
    compare_calibrators(learn, methods=["temperature"], folds=3, ci=None, progress=False)
    assert shown == [6]
