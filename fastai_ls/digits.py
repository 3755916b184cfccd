"""An offline stand-in for Pets: scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, 10 classes),
run through the same pipeline shape (image files, labels from file names, a small CNN, our loss, calibration)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

# Importing these registers `Learner.fit_one_cycle` and fastai's progress bars, as `fastai.vision.all` would.
import fastai.callback.progress  # noqa: F401
import fastai.callback.schedule  # noqa: F401
import numpy as np
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.external import fastai_path
from fastai.data.transforms import IndexSplitter, Normalize, RegexLabeller, get_image_files
from fastai.layers import ConvLayer, Flatten
from fastai.learner import Learner
from fastai.metrics import error_rate
from fastai.torch_core import rank_distrib
from fastai.vision.augment import Resize, aug_transforms
from fastai.vision.data import ImageBlock
from fastcore.basics import using_attr
from PIL import Image
from torch import nn

from fastai_ls.integration.callback import CalibrationCallback
from fastai_ls.integration.splits import check_split
from fastai_ls.loss.modules import LabelSmoothingCrossEntropy

DIGITS_PATTERN = r"^digit(\d)_\d+\.png$"
N_DIGITS = 1797


def digits_images(path: str | Path | None = None) -> Path:
    """A folder of `digit<label>_<index>.png` files made from `sklearn.datasets.load_digits`, written on first use
    (with a line saying so).

    Parameters
    ----------
    path : str or Path, optional
        The folder. None (the default): `sklearn_digits/` under fastai's data folder (`~/.fastai/data`, or
        `$FASTAI_HOME/data`). A folder that exists must be empty or hold the 1,797 images already: anything else
        is refused, never deleted.

    Returns
    -------
    Path
        The folder, holding the 1,797 images.

    Examples
    --------
    >>> folder = digits_images()  # doctest: +SKIP
    writing scikit-learn's 1797 digit scans as PNG files into ~/.fastai/data/sklearn_digits (first use only)
    """
    folder = Path(path) if path is not None else fastai_path("data") / "sklearn_digits"
    if _holds_digits(folder):
        return folder
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"{folder} exists and does not hold the {N_DIGITS} digit images: pass path= a new or "
                              "empty folder")
    from sklearn.datasets import load_digits

    if rank_distrib() == 0:
        print(f"writing scikit-learn's {N_DIGITS} digit scans as PNG files into {folder} (first use only)", flush=True)
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
    """A small CNN (24,346 parameters for 10 classes) that trains in seconds on 2 CPU cores.

    Parameters
    ----------
    n_out : int, default 10
        Number of classes.

    Examples
    --------
    >>> sum(p.numel() for p in digits_model().parameters())
    24346
    """
    return nn.Sequential(ConvLayer(3, 16, stride=2), ConvLayer(16, 32, stride=2), ConvLayer(32, 64, stride=2),
                         nn.AdaptiveAvgPool2d(1), Flatten(), nn.Linear(64, n_out))


def stratified_split(
    labels: Sequence, valid_pct: float = 0.2, seed: int = 42, max_items: int | None = None
) -> tuple[list[int], list[int]]:
    """Training and validation indices into `labels`, drawn at random class by class, so that every class is in
    both sets in the same proportion; with `max_items`, from a subset of that size in which each class keeps its
    share of the whole.

    Parameters
    ----------
    labels : sequence
        The class of each item.
    valid_pct : float, default 0.2
        Share of each class held out for validation (rounded, at least one item, and at least one left to train).
    seed : int, default 42
        Seed of the random draw.
    max_items : int, optional
        Keep only this many items in all. It must leave every class two items (one to train, one to validate).

    Returns
    -------
    tuple of two lists of int
        The training and the validation indices, sorted.

    Examples
    --------
    >>> train, valid = stratified_split([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2], max_items=6)
    >>> sorted(train + valid) == sorted(set(train + valid)) and len(train + valid) == 6
    True
    >>> sorted(i // 5 for i in valid), sorted(i // 5 for i in train)
    ([0, 1, 2], [0, 1, 2])
    """
    if not 0 < valid_pct < 1:
        raise ValueError(f"valid_pct must be between 0 and 1, got {valid_pct}")
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min(initial=2) < 2:
        raise ValueError(f"class {classes[counts.argmin()]!r} has one item: every class needs one to train and one "
                         "to validate")
    n = len(labels) if max_items is None else min(max_items, len(labels))
    if n < 2 * len(classes):
        raise ValueError(f"max_items={max_items} is too few for {len(classes)} classes: every class needs one "
                         f"training and one validation item, so use at least {2 * len(classes)}")
    rng = np.random.default_rng(seed)
    train, valid = [], []
    for c, size in zip(classes, _class_sizes(counts, n)):
        chosen = rng.permutation(np.flatnonzero(labels == c))[:size]
        n_valid = min(max(1, round(size * valid_pct)), size - 1)
        valid += chosen[:n_valid].tolist()
        train += chosen[n_valid:].tolist()
    return sorted(train), sorted(valid)


def _class_sizes(counts: np.ndarray, n: int) -> np.ndarray:
    """How many items of each class a subset of `n` keeps: proportional to `counts` (largest remainders first),
    at least 2 and at most the class's count. Needs 2 * len(counts) <= n <= counts.sum() and every count >= 2."""
    exact = counts * n / counts.sum()
    sizes = np.maximum(np.floor(exact).astype(int), 2)
    by_remainder = np.argsort(np.floor(exact) - exact, kind="stable")
    while sizes.sum() < n:
        for c in by_remainder:
            if sizes.sum() < n and sizes[c] < counts[c]:
                sizes[c] += 1
    while sizes.sum() > n:  # the floor of 2 overshot: give back from the largest
        sizes[sizes.argmax()] -= 1
    return sizes


def replace_labels(
    labels: Sequence, rows: Sequence[int], fraction: float, seed: int = 42
) -> tuple[list, list[int]]:
    """Label noise: `round(fraction * len(rows))` of the given rows, drawn at random, get a random *wrong* class
    (uniform over the other classes of `labels`); every other label is kept. Deterministic for a seed.

    Parameters
    ----------
    labels : sequence
        The class of every item (all of them: the classes to draw from are those present here).
    rows : sequence of int
        Indices into `labels` that may be changed (the training rows; validation rows stay clean).
    fraction : float
        Share of `rows` to change, in [0, 1).
    seed : int, default 42
        Seed of the draw (a stream of its own: the same seed as the split's draws other numbers).

    Returns
    -------
    tuple of a list and a list of int
        The labels after the change (a new list; `labels` is not modified), and the changed indices, sorted.

    Examples
    --------
    >>> labels = list("aabbccddee")
    >>> noisy, changed = replace_labels(labels, rows=range(8), fraction=0.25, seed=0)
    >>> len(changed), all(noisy[i] != labels[i] for i in changed), noisy[8:] == labels[8:]
    (2, True, True)
    """
    if not (isinstance(fraction, (int, float)) and 0 <= fraction < 1):
        raise ValueError(f"the label-noise fraction must be a number in [0, 1), got {fraction!r}")
    labels = list(labels)
    rows = np.asarray(list(rows), dtype=np.int64)
    classes, codes = np.unique(np.asarray(labels), return_inverse=True)
    n_changed = round(fraction * len(rows))
    if n_changed and len(classes) < 2:
        raise ValueError("label noise needs at least two classes: a wrong class must exist")
    rng = np.random.default_rng([seed, 1])  # not the split's stream (`default_rng(seed)`)
    changed = np.sort(rng.choice(rows, size=n_changed, replace=False)) if n_changed else rows[:0]
    # A shift of 1 .. C-1 classes from the true one: uniform over the C-1 wrong classes.
    shift = rng.integers(1, len(classes), size=len(changed))
    noisy = list(labels)
    for i, new in zip(changed.tolist(), ((codes[changed] + shift) % len(classes)).tolist()):
        noisy[i] = classes[new].item()  # a Python str or int, like the labels given
    return noisy, changed.tolist()


class LabelOf:
    """`get_y` of a `DataBlock` that reads each item's label from a table of file names (e.g. after
    `replace_labels`); a module-level class, so an exported learner keeps it.

    Parameters
    ----------
    labels : dict of str to str
        File name -> label.
    """

    def __init__(self, labels: dict[str, str]):
        """A lookup of the labels of these file names."""
        self.labels = labels

    def __call__(self, item: Path) -> str:
        return self.labels[Path(item).name]


def digits_learner(
    path: str | Path | None = None,
    eps: float = 0.1,
    smoothing: str = "uniform",
    bs: int = 64,
    size: int = 32,
    valid_pct: float = 0.2,
    seed: int = 42,
    lr: float = 3e-2,
    calibration: bool = True,
    num_workers: int = 0,
    max_items: int | None = None,
    augment: bool = False,
    label_noise: float = 0.0,
) -> Learner:
    """A `Learner` on scikit-learn's handwritten digits with label smoothing and calibration tracking: the offline
    stand-in for Pets that `fastai-ls demo` and `nbs/02_calibration.ipynb` train.

    The split is stratified: each digit is in the training and the validation set in the same proportion, also
    with `max_items`.

    Parameters
    ----------
    path : str or Path, optional
        Where the digit images live; written on first use (see `digits_images`). None: fastai's data folder.
    eps : float, default 0.1
        Label smoothing (0: plain cross-entropy).
    smoothing : {'uniform', 'others'}, default 'uniform'
        How the smoothing mass is spread, see `LabelSmoothingCrossEntropy`.
    bs : int, default 64
        Batch size.
    size : int, default 32
        The 8x8 scans are upsampled to this size.
    valid_pct : float, default 0.2
        Share of each class held out for validation.
    seed : int, default 42
        Seed of the split (and of the subset, with `max_items`).
    lr : float, default 3e-2
        Learning rate for `fit_one_cycle`; this small CNN converges in about 10 epochs.
    calibration : bool, default True
        Add a `CalibrationCallback` (the `ece` column, `learn.calibration`).
    num_workers : int, default 0
        DataLoader workers. The images are tiny: worker processes cost more than they save.
    max_items : int, optional
        Use only this many images, each class in its share (quick runs); at least 20 (two per class).
    augment : bool, default False
        Small random rotations and crops in each batch (4x slower on a CPU).
    label_noise : float, default 0.0
        Share of the *training* labels replaced by a random wrong digit (seeded by `seed`, see `replace_labels`);
        the validation labels stay clean. `learn.relabelled` maps each changed file name to (true, given) label.

    Returns
    -------
    Learner
        Ready for `learn.fit_one_cycle(10)`.

    Raises
    ------
    ValueError
        If `max_items` leaves a class without a training or validation image, no training batch is left
        (`bs` larger than the training set), or `label_noise` is outside [0, 1).

    Examples
    --------
    >>> learn = digits_learner(eps=0.1)   # doctest: +SKIP
    >>> learn.fit_one_cycle(10)           # doctest: +SKIP
    """
    items = get_image_files(digits_images(path)).sorted()
    labeller = using_attr(RegexLabeller(DIGITS_PATTERN), "name")
    labels = [labeller(item) for item in items]
    train, valid = stratified_split(labels, valid_pct, seed, max_items)
    check_split(len(train), len(valid), bs)
    given, changed = replace_labels(labels, train, label_noise, seed)
    block = DataBlock(
        # The ten digits, whatever the training labels hold: fastai's vocabulary would otherwise come from the
        # training labels alone, and label noise on a small subset can take a digit out of them entirely (then
        # every clean validation image of that digit is a KeyError, "not included in the training dataset").
        blocks=(ImageBlock, CategoryBlock(vocab=sorted(set(labels)))),
        splitter=IndexSplitter(list(range(len(train), len(train) + len(valid)))),
        get_y=LabelOf({items[i].name: given[i] for i in train + valid}) if changed else labeller,
        item_tfms=Resize(size),
        batch_tfms=[*(aug_transforms(size=size, do_flip=False, max_rotate=10, min_scale=0.9) if augment else []),
                    Normalize()],
    )
    dls = block.dataloaders(items[train + valid], bs=bs, num_workers=num_workers)
    cbs = [CalibrationCallback()] if calibration else []
    learn = Learner(dls, digits_model(dls.c), loss_func=LabelSmoothingCrossEntropy(eps, smoothing=smoothing),
                    metrics=error_rate, lr=lr, cbs=cbs)
    learn.relabelled = {items[i].name: (labels[i], given[i]) for i in changed}
    return learn
