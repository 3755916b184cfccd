"""CalibrationCallback in fastai: columns, history, get_preds outside fit, segmentation, trackers, bad input (and a
usable learner after it), no host sync."""

from __future__ import annotations

import contextlib
import math
import operator
import re
import threading
import warnings

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.callback.mixup import MixUp
from fastai.callback.progress import CSVLogger
from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (patches Learner.fit_one_cycle)
from fastai.callback.tracker import EarlyStoppingCallback, ReduceLROnPlateau, SaveModelCallback
from fastai.data.core import DataLoaders, Datasets
from fastai.data.transforms import ItemGetter
from fastai.learner import Learner
from fastai.losses import BCEWithLogitsLossFlat, CrossEntropyLossFlat, MSELossFlat
from fastai.metrics import accuracy, error_rate
from fastai.optimizer import SGD
from fastai.torch_core import TensorMultiCategory, set_seed
from fastai.vision.core import PILImage, PILMask
from oracles import multiclass_calibration_error
from PIL import Image
from torch import nn
from torch.overrides import TorchFunctionMode

from fastai_ls import (
    CalibrationCallback,
    LabelSmoothingCrossEntropy,
    plot_history,
    plot_reliability,
    plot_smooth_reliability,
)
from fastai_ls.calibration.plots import BIN_COLUMNS, bin_frame
from fastai_ls.calibration.state import INTERVAL_COLUMNS, METRIC_NAMES
from fastai_ls.integration.columns import HISTORY_COLUMNS, METRIC_COMPARISONS
from fastai_ls.integration.targets import check_class_id_targets

matplotlib.use("Agg")
N_CLASSES, N_VALID = 4, 70


def items(n: int, seed: int, noise: float = 1.0) -> list:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, :N_CLASSES] + noise * torch.randn(n, N_CLASSES, generator=g)).argmax(1)
    return list(zip(x, y))


def make_dls(valid=None, bs: int = 16) -> DataLoaders:
    return DataLoaders.from_dsets(items(128, 1), valid if valid is not None else items(N_VALID, 2), bs=bs,
                                  num_workers=0, device="cpu")


def mlp(out: int = N_CLASSES) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, out))


def make_learner(cb=None, model=None, loss_func=None, dls=None, **kwargs) -> Learner:
    learn = Learner(dls or make_dls(), model or mlp(), loss_func=loss_func or LabelSmoothingCrossEntropy(0.1),
                    cbs=cb, **kwargs)
    learn.logger = lambda *a, **k: None  # noqa: E731
    return learn


def quiet(learn):
    return learn.no_bar()


def datasets_learner(cb, valid: list, loss_func=None, model=None, target_tfm=None, **kwargs) -> Learner:
    """A learner on fastai `Datasets` (which `learn.predict` needs) of (x, y) pairs: `items(128, 1)` to train on (with
    y in the form of `valid`'s), `valid` to validate on."""
    train = [(x, valid[0][1]) for x, _ in items(128, 1)]
    tfms = [[ItemGetter(0)], [ItemGetter(1)] + ([target_tfm] if target_tfm else [])]
    dsets = Datasets(train + valid, tfms, splits=(list(range(len(train))), list(range(len(train), len(train) +
                                                                                         len(valid)))))
    return make_learner(cb, model=model, loss_func=loss_func, dls=dsets.dataloaders(bs=16, num_workers=0,
                                                                                      device="cpu"), **kwargs)


def finishes(call, timeout: float = 60.0) -> dict:
    """Run `call` in a thread: {'value': ...} or {'error': ...}; fails (instead of hanging the suite) if it is still
    running after `timeout` seconds, as `predict`/`get_preds` are when `learn.lock` was left held."""
    out = {}

    def run():
        try:
            out["value"] = call()
        except Exception as e:
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still blocked after {timeout} s: learn.lock was left held"
    return out


# --- progress table, Recorder, CSVLogger ---------------------------------------------------------------------------


def test_chosen_metrics_become_progress_table_columns_and_csv_columns(tmp_path):
    cb = CalibrationCallback(metrics=("ece", "nll"))
    learn = make_learner(cb, metrics=error_rate, path=tmp_path)
    with quiet(learn):
        learn.fit_one_cycle(2, 1e-2, cbs=CSVLogger(fname="log.csv"))
    assert list(learn.recorder.metric_names) == ["epoch", "train_loss", "valid_loss", "error_rate", "ece", "nll",
                                                 "time"]
    recorded = np.array([row[3:5] for row in learn.recorder.values])
    np.testing.assert_allclose(recorded, cb.history[["ece", "nll"]].to_numpy())
    csv = pd.read_csv(tmp_path / "log.csv")
    np.testing.assert_allclose(csv["ece"], cb.history["ece"], rtol=1e-5)


def test_fitting_again_adds_no_duplicate_columns():
    cb = CalibrationCallback(metrics="ece")
    learn = make_learner(cb, metrics=accuracy)
    with quiet(learn):
        learn.fit(1, 1e-2)
        learn.fit(1, 1e-2)
    assert list(learn.recorder.metric_names).count("ece") == 1
    assert [m.name for m in learn.metrics] == ["accuracy", "ece"]
    learn.remove_cb(cb)  # its column leaves with it
    assert [m.name for m in learn.metrics] == ["accuracy"]
    with quiet(learn):
        learn.fit(1, 1e-2, cbs=CalibrationCallback(metrics=("nll",)))
    assert list(learn.recorder.metric_names)[3:5] == ["accuracy", "nll"]


def test_a_callback_passed_to_fit_takes_its_columns_away_and_later_fits_record_none(tmp_path):
    """Issue 12: after `learn.fit(n, cbs=CalibrationCallback())` its `ece` column stayed in `learn.metrics`, and every
    later fit printed and recorded (CSVLogger too) its last value, frozen."""
    learn = make_learner(metrics=accuracy, path=tmp_path)
    cb = CalibrationCallback(metrics=("ece", "nll"))
    with quiet(learn):
        learn.fit(2, 1e-2, cbs=[cb, CSVLogger(fname="with.csv")])
    assert [m.name for m in learn.metrics] == ["accuracy"]
    np.testing.assert_allclose(pd.read_csv(tmp_path / "with.csv")["ece"], cb.history["ece"], rtol=1e-5)
    with quiet(learn):
        learn.fit(1, 1e-2, cbs=CSVLogger(fname="later.csv"))
    columns = ["epoch", "train_loss", "valid_loss", "accuracy", "time"]
    assert list(learn.recorder.metric_names) == columns
    assert list(pd.read_csv(tmp_path / "later.csv").columns) == columns
    with quiet(learn):
        record = learn.validate(cbs=CalibrationCallback())  # the column is there for this pass only
    assert len(record) == 3 and [m.name for m in learn.metrics] == ["accuracy"]
    with quiet(learn), pytest.raises(RuntimeError, match="interrupted"):
        learn.fit(3, 1e-2, cbs=[CalibrationCallback(), FailInSecondEpoch()])  # after_fit never fires
    assert [m.name for m in learn.metrics] == ["accuracy"]


class RecordCalibrationAttribute(Callback):
    def after_epoch(self):
        self.seen = self.learn.calibration


def test_a_second_callback_passed_to_fit_replaces_the_first_with_a_warning_and_puts_it_back_after():
    # Issue 20: `ece` was a column twice, and after the fit learn.calibration raised AttributeError ('Sequential'
    # object has no attribute 'calibration') with the first callback still in learn.cbs.
    first, second, probe = CalibrationCallback(ci=None), CalibrationCallback(metrics=("ece", "nll"), ci=None), \
        RecordCalibrationAttribute()
    learn = make_learner(first)
    with quiet(learn), pytest.warns(UserWarning, match=r"already has a CalibrationCallback \(metrics \('ece',\)\): "
                                                       r"the new one .* replaces it"):
        learn.fit(2, 1e-2, cbs=[second, probe])
    assert learn.recorder.metric_names.filter(lambda n: n == "ece") == ["ece"]
    assert probe.seen is second and second.history["epoch"].tolist() == [0, 1]
    assert learn.calibration is first and first in learn.cbs and second not in learn.cbs
    assert len(first.history) == 0 and second.name == "calibration"
    with quiet(learn):
        learn.fit(1, 1e-2)  # the first one records again, alone
    assert first.history["epoch"].tolist() == [0] and learn.recorder.metric_names.filter(lambda n: n == "ece") == \
        ["ece"]


def test_a_second_callback_added_for_good_replaces_the_first():
    first, second = CalibrationCallback(ci=None), CalibrationCallback(ci=None)
    with pytest.warns(UserWarning, match="replaces it"):
        learn = make_learner([first, second])
    assert learn.calibration is second and first not in learn.cbs and first.learn is None
    with quiet(learn):
        learn.fit(1, 1e-2)
    assert [type(m) for m in learn.metrics].count(type(second._metrics[0])) == 1
    assert second.history["epoch"].tolist() == [0] and len(first.history) == 0


def test_history_has_the_documented_columns_one_row_per_epoch_and_restarts_with_fit():
    cb = CalibrationCallback()
    learn = make_learner(cb)
    with quiet(learn):
        learn.fit(3, 1e-2)
    assert tuple(cb.history.columns) == HISTORY_COLUMNS == (
        "epoch", "n", "n_invalid", "accuracy", "confidence", "ece", "mce", "rmsce", "ece_debiased", "adaptive_ece",
        "smece", "ks_error", "classwise_ece", "overconfidence", "underconfidence", "nll", "nll_se", "brier",
        "brier_se", "aurc", "augrc") + INTERVAL_COLUMNS
    assert cb.history["epoch"].tolist() == [0, 1, 2] and (cb.history["n"] == N_VALID).all()
    with quiet(learn):
        learn.fit(1, 1e-2)
    assert len(cb.history) == 1


def test_last_epoch_matches_torchmetrics_and_definitions_on_get_preds_probabilities():
    cb = CalibrationCallback(n_bins=10)
    learn = make_learner(cb)
    with quiet(learn):
        learn.fit(2, 1e-2)
    probs, target = learn.get_preds()
    row = cb.history.iloc[-1]
    assert row["ece"] == pytest.approx(float(multiclass_calibration_error(probs, target, N_CLASSES, 10)), abs=1e-6)
    assert row["nll"] == pytest.approx(float(F.nll_loss(probs.log(), target)), rel=1e-5)
    assert row["accuracy"] == pytest.approx(float((probs.argmax(1) == target).float().mean()))
    onehot = F.one_hot(target, N_CLASSES)
    assert row["brier"] == pytest.approx(float(((probs - onehot) ** 2).sum(1).mean()), rel=1e-5)


def test_get_preds_outside_fit_replaces_state_without_touching_history():
    cb = CalibrationCallback()
    learn = make_learner(cb)
    with quiet(learn):
        learn.fit(2, 1e-2)
        history = cb.history.copy()
        learn.get_preds()
        learn.get_preds()  # twice: still one pass's worth of rows, not two
        test_dl = learn.dls.test_dl(items(30, 5), with_labels=True)
        learn.get_preds(dl=test_dl)
    pd.testing.assert_frame_equal(cb.history, history)
    assert float(cb.state.scalar("n")) == 30  # the last pass: the test set
    with quiet(learn):
        learn.validate()
    assert float(cb.state.scalar("n")) == N_VALID
    assert cb.last_metrics["ece"] == pytest.approx(history["ece"].iloc[-1])


def test_a_pass_without_labels_keeps_state_and_last_metrics_on_the_last_scored_pass():
    """Issue 12: after `learn.predict()`, `last_metrics` was {} while `state` still held the previous pass."""
    cb = CalibrationCallback()
    valid = items(N_VALID, 2)
    learn = datasets_learner(cb, valid)
    with quiet(learn):
        learn.validate()
    state, scored = cb.state, dict(cb.last_metrics)
    with quiet(learn):
        learn.predict(valid[0])
        unlabelled = learn.validate(dl=learn.dls.test_dl(valid[:20]))
    assert cb.state is state and cb.last_metrics == scored == state.metrics()
    assert math.isnan(unlabelled[-1])  # the column of a pass without labels shows no score, not the last one
    with quiet(learn):
        learn.get_preds(dl=learn.dls.test_dl(valid[:20], with_labels=True))
    assert cb.last_metrics == cb.state.metrics() and cb.last_metrics["n"] == 20


class PredictEveryEpoch(Callback):
    """Calls `get_preds` from inside the fit, as prediction-logging callbacks do."""

    def after_epoch(self):
        if not hasattr(self.learn, "gather_preds"):  # get_preds fires after_epoch too
            self.learn.get_preds(dl=self.dls.valid.new(shuffle=False, bs=5))


def test_get_preds_inside_fit_adds_no_rows():
    cb = CalibrationCallback()
    learn = make_learner([cb, PredictEveryEpoch()])
    with quiet(learn):
        learn.fit(3, 1e-2)
    assert cb.history["epoch"].tolist() == [0, 1, 2] and (cb.history["n"] == N_VALID).all()


class ValidateEveryEpoch(Callback):
    """Calls `validate` on another data set from inside the fit, as evaluation callbacks do."""

    def __init__(self, dl):
        self.dl, self.running = dl, False

    def after_epoch(self):
        if not self.running:  # the nested validate fires after_epoch too
            self.running = True
            try:
                self.learn.validate(dl=self.dl)
            finally:
                self.running = False


def test_validate_inside_fit_neither_resets_nor_adds_to_the_history():
    set_seed(0)  # the same shuffles in both fits
    plain_cb = CalibrationCallback()
    with quiet(plain_learn := make_learner(plain_cb)):
        plain_learn.fit(3, 1e-2)
    set_seed(0)
    cb = CalibrationCallback()
    learn = make_learner(cb)
    test_dl = learn.dls.test_dl(items(30, 5), with_labels=True)
    with quiet(learn):
        learn.fit(3, 1e-2, cbs=ValidateEveryEpoch(test_dl))
    assert cb.history["epoch"].tolist() == [0, 1, 2]
    pd.testing.assert_frame_equal(cb.history, plain_cb.history)  # the same epochs as without the nested passes
    assert float(cb.state.scalar("n")) == 30  # the nested pass still replaced the last state


def validating_callback(event: str, order: int) -> Callback:
    """A callback that runs `learn.validate()` once in `event` of every epoch, ordered before or after ours."""

    class ValidateIn(Callback):
        def __init__(self):
            self.order, self.running = order, False

        def validate_once(self):
            if not self.running and not self.training:
                self.running = True
                try:
                    self.learn.validate()
                finally:
                    self.running = False

    setattr(ValidateIn, event, ValidateIn.validate_once)
    return ValidateIn()


@pytest.mark.slow
@pytest.mark.parametrize("order", [0, 100])
@pytest.mark.parametrize("event", ["before_epoch", "before_validate", "after_validate", "after_epoch"])
def test_history_rows_keep_their_epoch_when_another_callback_validates_inside_the_fit(event, order):
    # Issue 20: fastai's TrainEvalCallback sets learn.epoch to 0 at the nested pass's before_fit, and every row was
    # labelled epoch 0; a pass run in after_validate before ours replaced the fit's own counters (no rows at all).
    set_seed(0)
    plain_cb = CalibrationCallback(ci=None)
    with quiet(plain_learn := make_learner(plain_cb)):
        plain_learn.fit(3, 1e-2)
    set_seed(0)
    cb = CalibrationCallback(ci=None)
    learn = make_learner(cb)
    with quiet(learn):
        learn.fit(3, 1e-2, cbs=validating_callback(event, order))
    assert cb.history["epoch"].tolist() == [0, 1, 2]
    pd.testing.assert_frame_equal(cb.history, plain_cb.history)


class FailInSecondEpoch(Callback):
    def after_epoch(self):
        if self.epoch == 1:
            raise RuntimeError("interrupted")


def test_a_fit_after_an_interrupted_fit_records_again():
    cb = CalibrationCallback()
    learn = make_learner(cb)
    with quiet(learn), pytest.raises(RuntimeError, match="interrupted"):
        learn.fit(3, 1e-2, cbs=FailInSecondEpoch())  # after_fit never fires
    assert cb.history["epoch"].tolist() == [0, 1]
    with quiet(learn):
        learn.fit(2, 1e-2)
    assert cb.history["epoch"].tolist() == [0, 1]


def test_bins_table_counts_every_validation_row():
    cb = CalibrationCallback(n_bins=8)
    learn = make_learner(cb)
    with quiet(learn):
        learn.fit(1, 1e-2)
    table = bin_frame(cb.state_of())
    assert tuple(table.columns) == BIN_COLUMNS and len(table) == 8
    assert table["count"].sum() == N_VALID
    filled = table[table["count"] > 0]
    np.testing.assert_allclose(filled["gap"], filled["confidence"] - filled["accuracy"])
    assert table["hi"].iloc[-1] == 1.0


def test_plots_return_figures_headless_also_for_a_bare_state_on_given_axes():
    import matplotlib.pyplot as plt

    cb = CalibrationCallback()
    learn = make_learner(cb)
    with quiet(learn):
        learn.fit(2, 1e-2)
    figures = [plot_reliability(cb.state_of()), plot_reliability(cb.state_of(0)), plot_history(cb.history)]
    fig, axes = plt.subplots(1, 2)
    assert plot_reliability(cb.state_of(), ax=axes[0], title="with LS") is fig
    assert plot_reliability(cb.state, ax=axes[1]) is fig
    ece = f"ECE {100 * cb.state.ece('l1'):.2f}%"  # the title always shows the ECE, after the caller's title
    assert axes[0].get_title() == f"with LS: {ece}" and axes[1].get_title() == ece
    assert all(isinstance(f, matplotlib.figure.Figure) for f in figures)
    plt.close("all")


# --- training tricks ---------------------------------------------------------------------------------------------


def test_plot_smooth_reliability_of_a_callback_without_intervals_draws_without_a_band():
    # Issue 20 (19): with ci=None and n_fine < n_bins the callback's smooth diagram said to pass ci=None.
    cb = CalibrationCallback(ci=None, n_bins=15, n_fine=10)
    with quiet(learn := make_learner(cb)):
        learn.fit(1, 1e-2)
    fig = plot_smooth_reliability(cb.state_of(), ci=cb.ci)
    assert fig.axes[0].get_title().startswith("smECE") and "[" not in fig.axes[0].get_title()
    matplotlib.pyplot.close(fig)


class HalfOutput(nn.Module):
    """A model whose predictions arrive in half precision, as with `.half()` and no MixedPrecision."""

    def __init__(self, dtype):
        super().__init__()
        self.body, self.dtype = mlp(), dtype

    def forward(self, x):
        return self.body(x).to(self.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_predictions_are_accepted(dtype):
    cb = CalibrationCallback()
    learn = make_learner(cb, model=HalfOutput(dtype))
    with quiet(learn):
        learn.validate()
    probs, target = learn.get_preds()
    want = float(multiclass_calibration_error(probs.float(), target, N_CLASSES, 15))
    assert cb.last_metrics["ece"] == pytest.approx(want, abs=1e-6)


def test_mixup_in_training_and_to_fp16_leave_validation_hard_labelled():
    cb = CalibrationCallback()
    learn = make_learner([cb, MixUp()])
    with warnings.catch_warnings(), quiet(learn):
        warnings.simplefilter("ignore")  # to_fp16 on a CPU: autocast and GradScaler disable themselves, with a warning
        learn.to_fp16()
        learn.fit(2, 1e-2)
    assert (cb.history["n"] == N_VALID).all() and cb.history["ece"].notna().all()


class DenseHead(nn.Module):
    """Per-position logits (N, C, L), as a segmentation or token model gives."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, N_CLASSES * 3)

    def forward(self, x):
        return self.body(x).view(-1, N_CLASSES, 3)


def test_dense_predictions_count_every_position():
    g = torch.Generator().manual_seed(3)
    dense = [(x, torch.randint(0, N_CLASSES, (3,), generator=g)) for x, _ in items(N_VALID, 2)]
    cb = CalibrationCallback()
    learn = make_learner(cb, model=DenseHead(), dls=make_dls(dense))
    with quiet(learn):
        learn.validate()
        probs, target = learn.get_preds()
    rows, ids = probs.movedim(1, -1).reshape(-1, N_CLASSES), target.reshape(-1)
    assert cb.last_metrics["n"] == 3 * N_VALID
    assert cb.last_metrics["ece"] == pytest.approx(float(multiclass_calibration_error(rows, ids, N_CLASSES)),
                                                   abs=1e-6)


@pytest.fixture
def one_thread():
    """One intra-op thread: for a few 32 x 32 images, syncing torch's threads costs more than the convolutions (on a
    busy 2-core machine the unet test below took 12 s with two threads, 2 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_unet_learner_on_segmentation_masks_is_scored_per_labelled_pixel(tmp_path, one_thread):
    """Issue 12: `unet_learner` on `SegmentationDataLoaders` with the callback failed at before_fit ("PILMask
    targets"). Masks are class ids per pixel; the void value 255 is left out through the loss's ignore_index."""
    from fastai.vision.data import SegmentationDataLoaders
    from fastai.vision.learner import unet_learner
    from torchvision.models import resnet18

    rng = np.random.default_rng(0)
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    for i in range(4):
        image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        mask = (image[..., 0] // 86).astype(np.uint8)  # classes 0, 1, 2 from the red channel
        mask[:4] = 255  # a void band
        Image.fromarray(image).save(tmp_path / "images" / f"{i}.png")
        Image.fromarray(mask).save(tmp_path / "masks" / f"{i}.png")
    dls = SegmentationDataLoaders.from_label_func(
        tmp_path, sorted((tmp_path / "images").glob("*.png")), lambda f: tmp_path / "masks" / f.name,
        codes=["low", "mid", "high"], valid_pct=0.5, seed=0, bs=2, num_workers=0, device="cpu")
    cb = CalibrationCallback(n_bins=10)
    learn = unet_learner(dls, resnet18, pretrained=False, n_out=3, cbs=cb,
                         loss_func=CrossEntropyLossFlat(axis=1, ignore_index=255))
    learn.freeze()  # the encoder frozen, as `unet_learner` leaves a pretrained one: the test's time is the decoder's
    with quiet(learn):
        learn.fit(1, 1e-3)
        probs, target = learn.get_preds()
    assert probs.shape == (2, 3, 32, 32) and target.shape == (2, 32, 32)
    labelled = int((target != 255).sum())
    assert labelled == 2 * 28 * 32 and cb.history["n"].tolist() == [labelled] and cb.last_metrics["n"] == labelled
    want = multiclass_calibration_error(probs, target, 3, 10, ignore_index=255)
    assert cb.last_metrics["ece"] == pytest.approx(float(want), abs=1e-6)
    assert cb.history["ece"].iloc[0] == pytest.approx(cb.last_metrics["ece"], abs=1e-6)  # same model, same pixels


@pytest.mark.parametrize("target", [PILMask.create(np.zeros((4, 4), np.uint8)), torch.tensor([3, 1, 2]),
                                    np.array([[1, 0], [2, 2]]), np.int64(2), 3],
                         ids=["PILMask", "token ids", "int array", "numpy int", "int"])
def test_class_ids_of_any_shape_pass_the_target_check(target):
    learn = make_learner(dls=DataLoaders.from_dsets(items(4, 1), [(torch.zeros(8), target)], bs=1, num_workers=0))
    check_class_id_targets(learn)


@pytest.mark.parametrize("target,reason", [
    (PILImage.create(np.zeros((4, 4, 3), np.uint8)), "image is a regression target"),
    (np.zeros(3, np.float32), "regression or soft labels"), (0.5, "regression or soft labels"),
    (torch.tensor(True), "booleans"), (TensorMultiCategory(torch.tensor([0.0, 1.0])), "multi-label")])
def test_targets_that_are_certainly_not_class_ids_fail_the_target_check(target, reason):
    learn = make_learner(dls=DataLoaders.from_dsets(items(4, 1), [(torch.zeros(8), target)], bs=1, num_workers=0))
    with pytest.raises(ValueError, match=reason):
        check_class_id_targets(learn)


def test_classwise_ece_is_off_by_default_above_1000_classes():
    wide, narrow = CalibrationCallback(), CalibrationCallback()
    for cb, n_classes in ((wide, 1001), (narrow, 1000)):
        learn = make_learner(cb, model=mlp(n_classes))
        with quiet(learn):
            learn.validate()
    assert not wide.state.classwise and wide.state.class_bins.numel() == 0
    assert math.isnan(wide.last_metrics["classwise_ece"]) and not math.isnan(wide.last_metrics["ece"])
    assert narrow.state.classwise and not math.isnan(narrow.last_metrics["classwise_ece"])


def test_classwise_can_be_forced_either_way():
    on, off = CalibrationCallback(classwise=True), CalibrationCallback(classwise=False)
    with quiet(learn := make_learner(on, model=mlp(1001))):
        learn.validate()
    with quiet(learn := make_learner(off)):
        learn.validate()
    assert on.state.class_bins.shape == (1001, 15, 3) and not math.isnan(on.last_metrics["classwise_ece"])
    assert math.isnan(off.last_metrics["classwise_ece"])


def test_order_sits_between_distributed_trainer_and_recorder():
    from fastai.distributed import DistributedTrainer
    from fastai.learner import Recorder

    assert DistributedTrainer.order < CalibrationCallback.order < Recorder.order


# --- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_bins", [0, -1, 1.5, None])
def test_invalid_n_bins_is_rejected_at_construction(n_bins):
    with pytest.raises(ValueError, match="n_bins"):
        CalibrationCallback(n_bins=n_bins)


def test_unknown_metric_names_are_rejected_at_construction():
    with pytest.raises(ValueError, match="unknown"):
        CalibrationCallback(metrics=("ece", "accuracy_top5"))


@pytest.mark.parametrize("name, meant", [("ECE", "ece"), ("smECE", "smece"), ("Ece_Hi", "ece_hi"), ("nnl", "nll")])
def test_a_misspelt_metric_name_gets_the_closest_name(name, meant):
    # Issue 20: metrics=('ECE',) listed 50 names without "did you mean 'ece'".
    with pytest.raises(ValueError, match=rf"unknown calibration metric '{name}' \(did you mean '{meant}'\?\)"):
        CalibrationCallback(metrics=(name,))


def test_the_docstring_lists_every_metric_name_the_callback_accepts():
    # Issue 20: help(CalibrationCallback) did not list the metric names.
    doc = CalibrationCallback.__doc__
    section = doc[doc.index("metrics : "):doc.index("n_fine : ")]
    listed = set(re.findall(r"\b[a-z][a-z_]*\b", section))
    assert set(METRIC_NAMES) <= listed
    intervals = section[section.index("<metric>_lo"):]
    named = [m for m in METRIC_NAMES if re.search(rf"\b{m}\b", intervals)]
    assert [f"{m}_{end}" for m in named for end in ("lo", "hi")] == list(INTERVAL_COLUMNS)
    for name in set(METRIC_NAMES) | set(INTERVAL_COLUMNS):
        CalibrationCallback(metrics=(name,))  # each listed name is accepted


@pytest.mark.parametrize("seed", [-1, 0.5, "42"])
def test_a_bad_seed_is_rejected_at_construction(seed):
    # Was accepted, then numpy's "expected non-negative integer" at the first report() or interval column.
    with pytest.raises(ValueError, match="seed must be an int from 0 to 2\\*\\*64 - 1 or None"):
        CalibrationCallback(seed=seed)


def test_bins_finer_than_the_fine_grid_are_refused_at_construction_when_intervals_are_asked_for():
    # CalibrationCallback(n_bins=20, n_fine=10) trained, then every epoch's intervals failed: `history` and
    # `report()` raised for the whole fit (or, with an interval column, the fit stopped after its first epoch).
    with pytest.raises(ValueError, match=r"n_fine=10 < n_bins=20: pass n_fine >= 20, or no intervals \(ci=None\)"):
        CalibrationCallback(n_bins=20, n_fine=10)
    cb = CalibrationCallback(n_bins=20, n_fine=10, ci=None)
    learn = make_learner(cb)
    with quiet(learn):
        learn.fit(1)
    assert len(cb.history) == 1 and not math.isnan(cb.history["ece"][0])


def test_an_epoch_the_last_fit_did_not_record_is_a_clear_error():
    # Was "IndexError: list index out of range" from report(epoch=5) after a 2-epoch fit.
    cb = CalibrationCallback(ci=None)
    learn = make_learner(cb)
    with quiet(learn):
        learn.fit(2)
    assert cb.state_of(-2) is cb.states[0]
    for epoch in (2, -3, 1.0):
        with pytest.raises(ValueError, match=r"epoch must be an int from -2 to 1: the last fit recorded 2 epochs"):
            cb.state_of(epoch)
    with pytest.raises(ValueError, match="epoch must be"):
        cb.state_of(5)


class NaNForLargeFirstFeature(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = mlp()

    def forward(self, x):
        out = self.body(x)
        return torch.where(x[:, :1] > 1.0, float("nan"), out)


def test_nan_predictions_are_counted_left_out_and_warned_about_once():
    valid = items(N_VALID, 2)
    n_nan = sum(float(x[0]) > 1.0 for x, _ in valid)
    assert 0 < n_nan < N_VALID
    cb = CalibrationCallback()
    learn = make_learner(cb, model=NaNForLargeFirstFeature(), dls=make_dls(valid))
    with warnings.catch_warnings(record=True) as caught, quiet(learn):
        warnings.simplefilter("always")
        learn.validate()
        learn.validate()
    assert sum("not finite" in str(w.message) for w in caught) == 1
    assert cb.last_metrics["n_invalid"] == n_nan and cb.last_metrics["n"] == N_VALID - n_nan
    assert not math.isnan(cb.last_metrics["ece"])


def mean_logit_loss(pred, target):
    """A loss that never looks at the targets (and has no `activation`: the callback falls back to softmax)."""
    return pred.float().mean()


def test_out_of_range_targets_raise_at_the_end_of_the_validation_pass():
    valid = [(x, torch.tensor(N_CLASSES + 1) if i == 7 else y) for i, (x, y) in enumerate(items(N_VALID, 2))]
    learn = make_learner(CalibrationCallback(), loss_func=mean_logit_loss, dls=make_dls(valid))
    with pytest.raises(ValueError, match="after_validate") as info, quiet(learn):
        learn.validate()
    assert "1 validation targets are not class ids" in str(info.value)


def test_a_learner_without_activation_is_scored_with_softmax():
    cb = CalibrationCallback()
    learn = make_learner(cb, loss_func=mean_logit_loss)
    with quiet(learn):
        learn.validate()
        logits, target = learn.get_preds(act=lambda z: z)
    want = multiclass_calibration_error(logits.softmax(1), target, N_CLASSES, 15)
    assert cb.last_metrics["ece"] == pytest.approx(float(want), abs=1e-6)


def multilabel_dls() -> DataLoaders:
    def multi(n, seed):
        return [(x, (x[:N_CLASSES] > 0).float()) for x, _ in items(n, seed)]
    return DataLoaders.from_dsets(multi(64, 1), multi(32, 2), bs=16, num_workers=0, device="cpu")


@pytest.mark.parametrize("loss_func,target", [(BCEWithLogitsLossFlat(), "multi-label"), (MSELossFlat(), "regression"),
                                              (mean_logit_loss, "float targets")])
def test_a_learner_without_single_class_id_targets_fails_at_before_fit(loss_func, target):
    learn = make_learner(CalibrationCallback(), loss_func=loss_func, dls=multilabel_dls())
    with pytest.raises(ValueError, match="before_fit") as info, quiet(learn):
        learn.fit(1)
    assert "single-label" in str(info.value) or "integer class-id" in str(info.value)


def multi_hot(y):
    return TensorMultiCategory(y)


def broken_learner(case: str) -> tuple[Learner, list, str]:
    """A learner on which the callback raises in a validation pass: (learner, its validation items, error regex)."""
    valid = items(N_VALID, 2)
    floats = [(x, (x[:N_CLASSES] > 0).float()) for x, _ in valid]
    if case == "multi-label loss":
        return datasets_learner(CalibrationCallback(), floats, BCEWithLogitsLossFlat()), floats, "single-label"
    if case == "regression loss":
        return datasets_learner(CalibrationCallback(), floats, MSELossFlat()), floats, "single-label"
    if case == "float targets":
        return datasets_learner(CalibrationCallback(), floats, mean_logit_loss), floats, "integer class-id"
    if case == "multi-label targets":
        learn = datasets_learner(CalibrationCallback(), floats, mean_logit_loss, target_tfm=multi_hot)
        return learn, floats, "multi-label"
    if case == "targets not one per row":  # (N, C, 3) predictions, one target per item
        learn = datasets_learner(CalibrationCallback(), valid, mean_logit_loss, model=DenseHead())
        return learn, valid, "one class id per prediction row"
    if case == "out-of-range targets":
        bad = [(x, torch.tensor(N_CLASSES + 1) if i == 7 else y) for i, (x, y) in enumerate(valid)]
        return datasets_learner(CalibrationCallback(), bad, mean_logit_loss), bad, "not class ids"
    raise ValueError(case)


@pytest.mark.parametrize("call", ["validate", "get_preds"])
@pytest.mark.parametrize("case", ["multi-label loss", "regression loss", "float targets", "multi-label targets",
                                  "targets not one per row", "out-of-range targets"])
def test_an_error_inside_validate_or_get_preds_leaves_the_learner_usable(case, call):
    """Issue 12: an error raised in before_fit inside `validate()`/`get_preds()` kept `learn.lock`, and the next
    `predict`/`get_preds` hung for good. Target errors now surface at the first labelled batch (or at the end of the
    pass), inside fastai's `with`; a pass without labels (`predict`) has nothing to score and works."""
    learn, valid, match = broken_learner(case)
    with quiet(learn), pytest.raises(ValueError, match=match):
        getattr(learn, call)()
    assert not learn.lock.locked()
    with quiet(learn):
        predicted = finishes(lambda: learn.predict(valid[0]))
        again = finishes(getattr(learn, call))
    assert "value" in predicted, predicted.get("error")
    assert isinstance(again.get("error"), ValueError) and match in str(again["error"])  # the same error, no hang
    learn.remove_cb(learn.calibration)
    with quiet(learn):
        assert "value" in finishes(learn.get_preds)


# --- no host synchronisation in the per-batch path -----------------------------------------------------------------


@contextlib.contextmanager
def host_reads_forbidden():
    """Make every way of reading a tensor's value on the host raise (the per-batch path must not need any)."""
    def forbidden(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"host synchronisation: Tensor.{name} in the per-batch update")
        return fail

    names = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
             "new_tensor")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    original_nonzero = torch.nonzero
    # A tensor made from Python data on a GPU is a host-to-device copy, which synchronises.
    factories = ("tensor", "as_tensor", "from_numpy")
    saved_factories = {name: getattr(torch, name) for name in factories}

    class NoMaskIndexing(TorchFunctionMode):
        # A mode, not an assignment to Tensor.__getitem__: assigning to that slot, even once and restored, leaves
        # 0-d tensors looking like sequences to torch.tensor([...]) for the rest of the process.
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.__getitem__:
                index = args[1]
                parts = index if isinstance(index, tuple) else (index,)
                if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                    raise AssertionError("host synchronisation: boolean-mask indexing in the per-batch update")
            return func(*args, **(kwargs or {}))

    try:
        for name in names:
            setattr(torch.Tensor, name, forbidden(name))
        torch.nonzero = forbidden("nonzero")
        for name in factories:
            setattr(torch, name, forbidden(name))
        with NoMaskIndexing():
            yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
        for name, factory in saved_factories.items():
            setattr(torch, name, factory)
        torch.nonzero = original_nonzero


class GuardedCalibrationCallback(CalibrationCallback):
    """Runs the per-batch work under a guard; counts the guarded calls so the test knows the guard was used."""

    guard = staticmethod(host_reads_forbidden)

    def after_batch(self):
        self.guarded = getattr(self, "guarded", 0) + 1
        with self.guard():
            super().after_batch()


def test_the_per_batch_update_never_reads_tensor_values_on_the_host():
    cb = GuardedCalibrationCallback()
    learn = make_learner(cb)
    with quiet(learn):
        learn.fit(2, 1e-2)
    # Every batch is guarded, the first of each pass too, where the state is created.
    assert cb.guarded == 2 * math.ceil(N_VALID / 16) and (cb.history["n"] == N_VALID).all()


@pytest.mark.parametrize("host_read", [lambda: torch.ones(2).sum().item(), lambda: torch.tensor([1, 2]),
                                       lambda: torch.ones(2).new_tensor([3.0]),
                                       lambda: torch.ones(3)[torch.tensor([True, False, True])]])
def test_the_guard_catches_a_host_read_or_copy(host_read):
    with host_reads_forbidden(), pytest.raises(AssertionError, match="host synchronisation"):
        host_read()


def test_the_guard_leaves_torch_as_it_found_it():
    # It once assigned to Tensor.__getitem__, after which torch.tensor([0-d tensors]) failed for the whole process.
    with host_reads_forbidden():
        pass
    assert torch.tensor([torch.tensor(0.5), torch.tensor(1.5)]).tolist() == [0.5, 1.5]
    assert torch.ones(3)[torch.tensor([True, False, True])].tolist() == [1.0, 1.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_per_batch_update_never_synchronises_with_the_gpu():
    @contextlib.contextmanager
    def cuda_sync_is_an_error():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    cb = GuardedCalibrationCallback()
    cb.guard = cuda_sync_is_an_error
    dls = DataLoaders.from_dsets(items(128, 1), items(N_VALID, 2), bs=16, num_workers=0, device="cuda")
    learn = make_learner(cb, model=mlp().cuda(), dls=dls)
    with quiet(learn):
        learn.fit(1, 1e-2)
    assert cb.history["n"].iloc[0] == N_VALID


# --- fastai's trackers on calibration columns ---------------------------------------------------------------------


def test_every_calibration_column_has_a_tracker_direction():
    assert set(METRIC_COMPARISONS) == set(METRIC_NAMES) | set(INTERVAL_COLUMNS)
    lower = {name for name in METRIC_NAMES if METRIC_COMPARISONS[name] is np.less}
    assert lower == {"n_invalid", "ece", "mce", "rmsce", "ece_debiased", "adaptive_ece", "smece", "ks_error",
                     "classwise_ece", "overconfidence", "underconfidence", "nll", "brier", "aurc", "augrc"}
    assert all(METRIC_COMPARISONS[name] is np.greater for name in set(METRIC_NAMES) - lower)
    assert METRIC_COMPARISONS["ece_hi"] is np.less and METRIC_COMPARISONS["accuracy_lo"] is np.greater


@pytest.mark.parametrize("tracker_cls", [SaveModelCallback, EarlyStoppingCallback, ReduceLROnPlateau])
@pytest.mark.parametrize("monitor,comp", [("ece", np.less), ("nll", np.less), ("accuracy", np.greater)])
def test_trackers_on_calibration_columns_compare_the_right_way(tmp_path, tracker_cls, monitor, comp):
    tracker = tracker_cls(monitor=monitor, min_delta=0.01)
    assert tracker.comp is np.greater  # fastai's guess from a name without "loss" or "error"
    learn = make_learner(CalibrationCallback(metrics=("ece", "nll", "accuracy")), path=tmp_path)
    with quiet(learn):
        learn.fit(1, 1e-2, cbs=tracker)
    assert tracker.comp is comp and tracker.min_delta == (-0.01 if comp is np.less else 0.01)


def test_a_tracker_on_the_valid_column_of_train_metrics_is_turned_round_too(tmp_path):
    tracker = EarlyStoppingCallback(monitor="valid_ece", patience=5)
    learn = make_learner(CalibrationCallback(), path=tmp_path)
    learn.recorder.train_metrics = True
    with quiet(learn):
        learn.fit(1, 1e-2, cbs=tracker)
    assert "valid_ece" in learn.recorder.metric_names and tracker.comp is np.less


@pytest.mark.parametrize("comp", [np.less, operator.gt])
def test_a_comparison_of_the_users_own_is_kept(tmp_path, comp):
    tracker = SaveModelCallback(monitor="ece", comp=comp, min_delta=0.01)
    min_delta = tracker.min_delta  # fastai already made it negative for np.less
    learn = make_learner(CalibrationCallback(), path=tmp_path)
    with quiet(learn):
        learn.fit(1, 1e-2, cbs=tracker)
    assert tracker.comp is comp and tracker.min_delta == min_delta


TRACKER_MISTAKES = [
    ("nll", False, r"monitors 'nll', but no callback adds that column; .*metrics=\(\.\.\., 'nll'\)"),
    ("train_ece", True, "NaN in every epoch"),
    ("valid_ece", False, r"the column is 'ece' \(Recorder's train_metrics=False\)"),
    ("ece", True, r"the column is 'valid_ece' \(Recorder's train_metrics=True\)")]


@pytest.mark.parametrize("monitor,train_metrics,match", TRACKER_MISTAKES)
def test_a_tracker_on_a_calibration_metric_that_is_no_column_fails_clearly_at_before_fit(monitor, train_metrics,
                                                                                        match):
    """fastai's own check is a bare assert, which reaches the user as "IndexError: tuple index out of range"."""
    learn = make_learner(CalibrationCallback(metrics="ece"))
    learn.recorder.train_metrics = train_metrics
    with quiet(learn), pytest.raises(ValueError, match=match) as info:
        learn.fit(1, 1e-2, cbs=EarlyStoppingCallback(monitor=monitor))
    assert "before_fit" in str(info.value)


@pytest.mark.parametrize("monitor,train_metrics,match", TRACKER_MISTAKES)
def test_a_tracker_on_a_calibration_metric_that_is_no_column_leaves_validate_usable(monitor, train_metrics, match):
    """In validate() fastai's assert in the tracker's before_fit would keep `learn.lock` for good."""
    valid = items(N_VALID, 2)
    learn = datasets_learner([CalibrationCallback(metrics="ece"), EarlyStoppingCallback(monitor=monitor)], valid)
    learn.recorder.train_metrics = train_metrics
    with quiet(learn), pytest.raises(ValueError, match=match):
        learn.validate()
    assert not learn.lock.locked()
    with quiet(learn):
        assert "value" in finishes(lambda: learn.predict(valid[0]))


class Scale(nn.Module):
    """Logits times one trained scale."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, x):
        return self.scale * x


def overshooting_learner(cb, path) -> Learner:
    """Fixed logits times a scale, trained from 2.5 towards 0.5, the optimum for training labels drawn at half the
    validation labels' sharpness: on the way it passes 1, where the validation set is calibrated. Full-batch SGD, so
    the validation ECE falls for some epochs, then rises, the same in every run."""
    g = torch.Generator().manual_seed(0)
    train_logits, valid_logits = 2 * torch.randn(1000, 10, generator=g), 2 * torch.randn(1000, 10, generator=g)
    train_y = torch.multinomial((train_logits / 2).softmax(1), 1, generator=g).squeeze(1)
    valid_y = torch.multinomial(valid_logits.softmax(1), 1, generator=g).squeeze(1)
    dsets = Datasets(list(zip(train_logits, train_y)) + list(zip(valid_logits, valid_y)),
                     [[ItemGetter(0)], [ItemGetter(1)]], splits=(list(range(1000)), list(range(1000, 2000))))
    learn = Learner(dsets.dataloaders(bs=1000, num_workers=0, device="cpu"), Scale(2.5),
                    loss_func=CrossEntropyLossFlat(), opt_func=SGD, lr=0.3, cbs=cb, path=path)
    learn.logger = lambda *a, **k: None  # noqa: E731
    return learn


@pytest.mark.slow
def test_save_model_callback_on_ece_reloads_the_best_calibrated_epoch(tmp_path):
    """Issue 12: `SaveModelCallback(monitor='ece')` kept the highest ECE, and so reloaded the worst-calibrated epoch."""
    cb = CalibrationCallback()
    learn = overshooting_learner(cb, tmp_path)
    with quiet(learn), contextlib.redirect_stdout(None):
        learn.fit(6, cbs=SaveModelCallback(monitor="ece"))
        learn.validate()
    ece = cb.history["ece"]
    assert 0 < ece.idxmin() < 5 and ece.idxmax() == 0  # fastai's guess would have reloaded epoch 0
    assert cb.last_metrics["ece"] == pytest.approx(ece.min())


def test_early_stopping_on_ece_does_not_stop_while_ece_improves(tmp_path):
    """Issue 12: `EarlyStoppingCallback(monitor='ece')` stopped as the ECE improved."""
    cb = CalibrationCallback()
    learn = overshooting_learner(cb, tmp_path)
    with quiet(learn), contextlib.redirect_stdout(None):
        learn.fit(10, cbs=EarlyStoppingCallback(monitor="ece", patience=1))
    ece = cb.history["ece"].tolist()
    assert 3 < len(ece) < 10  # fastai's guess would have stopped after epoch 1
    assert all(a > b for a, b in zip(ece[:-2], ece[1:-1])) and ece[-1] > ece[-2]  # stopped at the first rise
