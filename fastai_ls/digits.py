"""An offline stand-in for Pets: scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, 10 classes),
run through the same pipeline shape (image files, labels from file names, a small CNN, our loss, calibration)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Importing these registers `Learner.fit_one_cycle` and fastai's progress bars, as `fastai.vision.all` would.
import fastai.callback.progress  # noqa: F401
import fastai.callback.schedule  # noqa: F401
import numpy as np
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.external import fastai_path
from fastai.data.transforms import Normalize, RandomSplitter, RegexLabeller, get_image_files
from fastai.layers import ConvLayer, Flatten
from fastai.learner import Learner
from fastai.metrics import error_rate
from fastai.vision.augment import Resize, aug_transforms
from fastai.vision.data import ImageBlock
from fastcore.basics import using_attr
from PIL import Image
from torch import nn

from fastai_ls.callback import CalibrationCallback
from fastai_ls.losses import LabelSmoothingCrossEntropy

DIGITS_PATTERN = r"^digit(\d)_\d+\.png$"
N_DIGITS = 1797


def digits_images(path: str | Path | None = None) -> Path:
    """A folder of `digit<label>_<index>.png` files made from `sklearn.datasets.load_digits`, written on first use
    (default: `digits/` under fastai's data folder, `~/.fastai/data` or `$FASTAI_HOME/data`).

    >>> folder = digits_images()  # doctest: +SKIP
    """
    folder = Path(path) if path is not None else fastai_path("data") / "sklearn_digits"
    if _holds_digits(folder):
        return folder
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"{folder} exists and does not hold the {N_DIGITS} digit images: pass path= a new or "
                              "empty folder")
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Write into a fresh folder and rename it into place, so that several processes starting at once
    # (distributed training) never see a half-written folder. Only that fresh folder is ever deleted.
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".digits-"))
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        grey = (pixels * (255 / 16)).round().astype(np.uint8)  # scans are 0..16
        Image.fromarray(grey, mode="L").save(staging / f"digit{label}_{i:04d}.png")
    try:
        os.replace(staging, folder)  # also replaces an empty folder
    except OSError:  # another process renamed its copy into place first
        shutil.rmtree(staging, ignore_errors=True)
        if not _holds_digits(folder):
            raise
    return folder


def _holds_digits(folder: Path) -> bool:
    return folder.is_dir() and len(list(folder.glob("digit*_*.png"))) == N_DIGITS


def digits_model(n_out: int = 10) -> nn.Module:
    """A small CNN (24,346 parameters for 10 classes) that trains in seconds on 2 CPU cores."""
    return nn.Sequential(ConvLayer(3, 16, stride=2), ConvLayer(16, 32, stride=2), ConvLayer(32, 64, stride=2),
                         nn.AdaptiveAvgPool2d(1), Flatten(), nn.Linear(64, n_out))


def digits_learner(
    path: str | Path | None = None,  # where the digit images live (written on first use)
    eps: float = 0.1,  # label smoothing (0: plain cross-entropy)
    smoothing: str = "uniform",  # 'uniform' or 'others'
    bs: int = 64,  # batch size
    size: int = 32,  # the 8x8 scans are upsampled to this size
    valid_pct: float = 0.2,  # validation share
    seed: int = 42,  # seed of the random split
    lr: float = 3e-2,  # learning rate for `fit_one_cycle` (this small CNN converges in about 10 epochs)
    calibration: bool = True,  # add a `CalibrationCallback`
    num_workers: int = 0,  # the images are tiny: worker processes cost more than they save
    max_items: int | None = None,  # use only the first `max_items` images (quick runs)
    augment: bool = False,  # small random rotations and crops in each batch (4x slower on a CPU)
) -> Learner:
    """A `Learner` on scikit-learn's handwritten digits with label smoothing and calibration tracking.

    >>> learn = digits_learner(eps=0.1)   # doctest: +SKIP
    >>> learn.fit_one_cycle(10)           # doctest: +SKIP
    """
    items = get_image_files(digits_images(path)).sorted()
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock),
        splitter=RandomSplitter(valid_pct, seed=seed),
        get_y=using_attr(RegexLabeller(DIGITS_PATTERN), "name"),
        item_tfms=Resize(size),
        batch_tfms=[*(aug_transforms(size=size, do_flip=False, max_rotate=10, min_scale=0.9) if augment else []),
                    Normalize()],
    )
    dls = block.dataloaders(items[:max_items], bs=bs, num_workers=num_workers)
    cbs = [CalibrationCallback()] if calibration else []
    return Learner(dls, digits_model(dls.c), loss_func=LabelSmoothingCrossEntropy(eps, smoothing=smoothing),
                   metrics=error_rate, lr=lr, cbs=cbs)
