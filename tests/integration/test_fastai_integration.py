"""Every fastai code path that touches a loss, on real Learners over small generated data (CPU)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from fastai.callback.fp16 import MixedPrecision  # noqa: F401  (registers Learner.to_fp16/to_bf16)
from fastai.callback.mixup import CutMix, MixUp
from fastai.callback.progress import ProgressCallback  # noqa: F401  (registers Learner.no_bar)
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.core import DataLoaders
from fastai.data.transforms import RandomSplitter, get_image_files, parent_label
from fastai.interpret import ClassificationInterpretation
from fastai.learner import Learner, load_learner
from fastai.metrics import error_rate
from fastai.tabular.core import Categorify, Normalize
from fastai.tabular.data import TabularDataLoaders
from fastai.tabular.learner import tabular_learner
from fastai.vision.data import ImageBlock, MaskBlock
from PIL import Image
from torch import nn

from fastai_ls import LabelSmoothingCrossEntropy, LabelSmoothingCrossEntropyFlat, calibration_metrics
from fastai_ls.loss.backends import c_kernel

warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
warnings.filterwarnings("ignore", message=".*device_type of 'cuda'.*")


def tiny_cnn(n_out: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, n_out))


def colour_dls(path, bs=16):
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label,
                      splitter=RandomSplitter(0.25, seed=0))
    return block.dataloaders(path, bs=bs, num_workers=0)


def colour_learner(path, **kwargs):
    kwargs.setdefault("loss_func", LabelSmoothingCrossEntropy())
    return Learner(colour_dls(path), tiny_cnn(), metrics=error_rate, **kwargs)


@pytest.fixture(scope="module")
def trained(colour_images):
    learn = colour_learner(colour_images)
    with learn.no_bar(), learn.no_logging():
        learn.fit(3, 1e-2)
    return learn


def fit_quietly(learn, epochs=1, lr=1e-2):
    with learn.no_bar(), learn.no_logging():
        learn.fit(epochs, lr)
    return learn


def test_learner_trains_with_loss_func_argument(colour_images):
    learn = colour_learner(colour_images)
    before = learn.validate()[0]
    fit_quietly(learn, epochs=3)
    assert learn.validate()[0] < before


def test_assigning_loss_func_trains(colour_images):
    learn = Learner(colour_dls(colour_images), tiny_cnn(), metrics=error_rate)
    learn.loss_func = LabelSmoothingCrossEntropy(eps=0.2)
    before = learn.validate()[0]
    fit_quietly(learn, epochs=3)
    assert learn.validate()[0] < before


class RecordingLoss(LabelSmoothingCrossEntropy):
    """Our loss, remembering the reduction, the input dtype, the output shape and dtype of each call."""

    def forward(self, input, target, reduction=None):
        out = super().forward(input, target, reduction)
        self.calls.append((reduction or self.reduction, input.dtype, tuple(out.shape), out.dtype))
        return out


@pytest.mark.parametrize("mixer", [MixUp, CutMix])
def test_trains_under_mixup_and_cutmix(colour_images, mixer):
    loss_func = RecordingLoss()
    loss_func.calls = []
    learn = colour_learner(colour_images, loss_func=loss_func, cbs=mixer())
    fit_quietly(learn)
    assert learn.loss_func is loss_func and loss_func.reduction == "mean"
    # the mixing callback calls us twice per batch with reduction 'none' and combines the (bs,) losses itself
    assert ("none", torch.float32, (16,), torch.float32) in loss_func.calls
    assert np.isfinite(learn.recorder.values[-1]).all()


def test_trains_with_to_fp16(colour_images):
    learn = colour_learner(colour_images).to_fp16()
    fit_quietly(learn)
    assert np.isfinite(learn.recorder.values[-1]).all()


def test_trains_with_to_bf16_where_supported(colour_images):
    # fastai's MixedPrecision autocasts on CUDA only (on a CPU it trains in float32); a GPU needs bfloat16 support.
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU does not support bfloat16")
    learn = colour_learner(colour_images).to_bf16()
    fit_quietly(learn)
    assert np.isfinite(learn.recorder.values[-1]).all()


class AsHalf(nn.Module):
    def forward(self, x):
        return x.half()


def test_half_precision_model_output_trains_in_float32_loss(colour_images):
    loss_func = RecordingLoss()
    loss_func.calls = []
    learn = Learner(colour_dls(colour_images), nn.Sequential(tiny_cnn(), AsHalf()), loss_func=loss_func)
    fit_quietly(learn)
    assert all(call[1] == torch.float16 and call[3] == torch.float32 for call in loss_func.calls)
    assert np.isfinite(learn.recorder.values[-1]).all()


def test_get_preds_gives_probabilities_decoded_ids_and_unreduced_losses(trained):
    probs, targs, decoded, losses = trained.get_preds(with_decoded=True, with_loss=True)
    torch.testing.assert_close(probs.sum(1), torch.ones(len(probs)))
    assert torch.equal(decoded, probs.argmax(1))
    assert trained.loss_func.reduction == "mean"
    expected = F.cross_entropy(probs.log(), targs, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(losses, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not c_kernel.AVAILABLE, reason="the C kernel is not built")
def test_validate_and_get_preds_compute_the_loss_without_a_gradient(trained, monkeypatch):
    # fastai runs both under no_grad: the kernel computes the losses alone, writing no N x C gradient.
    gradient_pointers, run = [], c_kernel._kernel
    monkeypatch.setattr(c_kernel, "_kernel", lambda *args: gradient_pointers.append(args[9]) or run(*args))
    with trained.no_bar():
        trained.validate()
        trained.get_preds(with_loss=True)
    assert gradient_pointers and set(gradient_pointers) == {None}


def test_predict_returns_label_id_and_probabilities(trained, colour_images):
    item = sorted((colour_images / "green").iterdir())[0]
    label, idx, probs = trained.predict(item)
    assert label == trained.dls.vocab[idx]
    assert abs(probs.sum().item() - 1) < 1e-5 and idx == probs.argmax()


def test_classification_interpretation_top_losses(trained):
    interp = ClassificationInterpretation.from_learner(trained)
    values, indices = interp.top_losses(5)
    _, _, losses = trained.get_preds(with_loss=True)
    torch.testing.assert_close(values, losses.sort(descending=True).values[:5])
    assert interp.confusion_matrix().sum() == len(trained.dls.valid_ds)


def test_export_and_load_learner_keep_the_loss(trained, tmp_path):
    trained.export(tmp_path / "export.pkl")
    loaded = load_learner(tmp_path / "export.pkl")
    assert isinstance(loaded.loss_func, LabelSmoothingCrossEntropy) and loaded.loss_func.eps == 0.1
    item = sorted(trained.dls.valid_ds.items)[0]
    torch.testing.assert_close(loaded.predict(item)[2], trained.predict(item)[2])


# --- the Flat class on segmentation- and text-shaped outputs -------------------------------------------------------


@pytest.fixture(scope="module")
def masks(colour_images, tmp_path_factory):
    """One mask per colour image: 1 + the class id where the square is, 0 (background) elsewhere."""
    folder = tmp_path_factory.mktemp("masks")
    classes = sorted(p.name for p in colour_images.iterdir())
    for image in get_image_files(colour_images):
        pixels = np.asarray(Image.open(image)).astype(int)
        square = pixels.max(-1) > 150
        Image.fromarray((square * (1 + classes.index(image.parent.name))).astype(np.uint8)).save(folder / image.name)
    return folder


def test_flat_trains_on_segmentation_outputs(colour_images, masks):
    block = DataBlock(blocks=(ImageBlock, MaskBlock(codes=["background", "blue", "green", "red"])),
                      get_items=get_image_files, get_y=lambda p: masks / p.name, splitter=RandomSplitter(0.25, seed=0))
    dls = block.dataloaders(colour_images, bs=8, num_workers=0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 1))
    learn = Learner(dls, model, loss_func=LabelSmoothingCrossEntropyFlat(axis=1))
    before = learn.validate()[0]
    fit_quietly(learn, epochs=2, lr=3e-2)
    assert learn.validate()[0] < before
    probs, targs, decoded = learn.get_preds(with_decoded=True)
    assert probs.shape[1] == 4 and decoded.shape == targs.shape
    torch.testing.assert_close(probs.sum(1), torch.ones_like(probs[:, 0]))
    assert torch.equal(decoded, probs.argmax(1))


class NextToken(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.emb, self.out = nn.Embedding(vocab, 16), nn.Linear(16, vocab)

    def forward(self, x):
        return self.out(self.emb(x))  # (N, T, vocab)


def test_flat_trains_on_text_outputs():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 11, (96, 8), generator=g)
    pairs = [(t, (t + 1) % 11) for t in tokens]  # a learnable next-token rule
    dls = DataLoaders.from_dsets(pairs[:64], pairs[64:], bs=16, num_workers=0)
    learn = Learner(dls, NextToken(11), loss_func=LabelSmoothingCrossEntropyFlat())
    before = learn.validate()[0]
    fit_quietly(learn, epochs=2, lr=3e-2)
    assert learn.validate()[0] < before
    probs, targs, decoded = learn.get_preds(with_decoded=True)
    assert probs.shape == (32, 8, 11) and decoded.shape == targs.shape == (32, 8)
    torch.testing.assert_close(probs.sum(-1), torch.ones(32, 8))
    assert torch.equal(decoded, probs.argmax(-1))


def test_tabular_learner_trains_with_the_flat_loss_on_its_bs_by_1_targets():
    # Issue 20: TabularDataLoaders give (bs, 1) int8 class ids; the flat loss refused them at the first batch.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 2))
    df = pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": rng.choice(["p", "q"], 120),
                       "y": np.where(x[:, 0] > 0.5, "hi", np.where(x[:, 0] < -0.5, "lo", "mid"))})
    dls = TabularDataLoaders.from_df(df, procs=[Categorify, Normalize], cat_names=["c"], cont_names=["a", "b"],
                                     y_names="y", y_block=CategoryBlock,
                                     valid_idx=list(range(90, 120)), bs=16, num_workers=0, device="cpu")
    # n_out given: this fastai's `dls.c` under pandas 3 is [cat vocab, 3] rather than 3.
    learn = tabular_learner(dls, layers=[8], n_out=len(dls.vocab), loss_func=LabelSmoothingCrossEntropyFlat())
    assert dls.one_batch()[-1].shape == (16, 1)
    with learn.no_bar(), learn.no_logging():
        learn.fit(2, 1e-2)
        probs, targets = learn.get_preds()
    assert targets.shape == (30, 1) and probs.shape == (30, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(30))
    metrics = calibration_metrics(probs, targets.reshape(-1))
    assert metrics["n"] == 30 and 0 <= metrics["ece"] <= 1
