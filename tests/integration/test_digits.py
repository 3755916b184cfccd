"""`digits_images` writes scikit-learn's bundled digits as image files (saying so, once), and never deletes what it did
not write; `digits_learner` splits them class by class, also in a subset (`max_items`)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from fastai_ls.digits import N_DIGITS, digits_images, digits_learner, stratified_split


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    return digits_images(tmp_path_factory.mktemp("digits") / "digits")


def class_counts(ds):
    """Images per digit in a fastai `Datasets`, from the file names `digit<label>_<index>.png`."""
    return np.bincount([int(item.name[len("digit")]) for item in ds.items], minlength=10)


def test_the_bundled_scans_become_labelled_image_files(tmp_path):
    folder = digits_images(tmp_path / "digits")
    files = sorted(folder.glob("digit*_*.png"))
    digits = load_digits()
    assert len(files) == N_DIGITS == len(digits.target)
    labels = [int(f.name[len("digit")]) for f in files]
    assert np.bincount(labels).tolist() == np.bincount(digits.target).tolist()
    index = int(files[0].stem.split("_")[1])
    pixels = np.asarray(Image.open(files[0]))
    assert pixels.shape == (8, 8) and labels[0] == digits.target[index]
    np.testing.assert_array_equal(pixels, (digits.images[index] * 255 / 16).round())
    assert digits_images(folder) == folder  # written once, then reused


def test_an_empty_folder_is_filled(tmp_path):
    (tmp_path / "empty").mkdir()
    assert len(list(digits_images(tmp_path / "empty").glob("*.png"))) == N_DIGITS


def test_a_folder_holding_other_files_is_refused_and_kept(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="does not hold the 1797 digit images"):
        digits_images(folder)
    assert (folder / "keep.txt").read_text() == "precious" and list(folder.iterdir()) == [folder / "keep.txt"]


def test_the_first_use_says_that_it_writes_the_images(tmp_path, capsys):
    folder = digits_images(tmp_path / "digits")
    assert capsys.readouterr().out == (f"writing scikit-learn's 1797 digit scans as PNG files into {folder} "
                                       "(first use only)\n")
    digits_images(folder)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("max_items, train, valid", [(100, 8, 2), (300, None, 6)])
def test_max_items_keeps_every_digit_in_training_and_validation(digits_folder, max_items, train, valid):
    # The first `max_items` files sorted by name used to be one digit (100) or two (300, notebook 02's small mode).
    learn = digits_learner(digits_folder, max_items=max_items, calibration=False)
    assert list(learn.dls.vocab) == [str(d) for d in range(10)] and learn.dls.c == 10
    n_train, n_valid = class_counts(learn.dls.train_ds), class_counts(learn.dls.valid_ds)
    assert n_train.sum() + n_valid.sum() == max_items and (n_valid == valid).all() and (n_train > 0).all()
    if train is not None:
        assert (n_train == train).all()


def test_the_full_split_is_stratified_and_seeded(digits_folder):
    learn = digits_learner(digits_folder, calibration=False)
    n_train, n_valid = class_counts(learn.dls.train_ds), class_counts(learn.dls.valid_ds)
    per_class = np.bincount(load_digits().target)
    assert (n_train + n_valid == per_class).all() and (n_valid == np.round(per_class * 0.2)).all()
    assert (n_train.sum(), n_valid.sum()) == (1438, 359)
    again = digits_learner(digits_folder, calibration=False)
    other = digits_learner(digits_folder, seed=0, calibration=False)
    assert list(again.dls.valid_ds.items) == list(learn.dls.valid_ds.items)
    assert list(other.dls.valid_ds.items) != list(learn.dls.valid_ds.items)


def test_too_few_items_or_too_large_a_batch_is_refused_with_the_reason(digits_folder):
    with pytest.raises(ValueError, match="max_items=15 is too few for 10 classes: .* at least 20"):
        digits_learner(digits_folder, max_items=15)
    # fastai's own message, from inside `dataloaders()`, was "This DataLoader does not contain any batches"
    with pytest.raises(ValueError, match=r"the training set has 80 images, fewer than one batch \(bs=128\)"):
        digits_learner(digits_folder, max_items=100, bs=128)


def test_label_noise_that_takes_a_digit_out_of_the_training_labels_keeps_all_ten_classes(digits_folder):
    # fastai took the vocabulary from the (noisy) training labels: `fastai-ls demo --max-items 20 --label-noise 0.99
    # --seed 3` trained, then failed on a clean validation image: "KeyError: Label '0' was not included in the
    # training dataset" (a traceback, exit 1).
    learn = digits_learner(digits_folder, max_items=20, bs=4, label_noise=0.99, seed=3, calibration=False)
    given = {learn.dls.vocab[int(y)] for _, y in learn.dls.train_ds}
    assert len(given) < 10  # the case: a digit has no training label left
    assert list(learn.dls.vocab) == [str(d) for d in range(10)] and learn.dls.c == 10
    with learn.no_bar(), learn.no_logging():
        learn.fit(1)
    assert len(learn.dls.valid_ds) == 10 and class_counts(learn.dls.valid_ds).tolist() == [1] * 10


@pytest.mark.parametrize("counts, max_items, sizes", [
    ([50, 30, 20], 10, [5, 3, 2]),   # proportional
    ([90, 5, 5], 10, [6, 2, 2]),     # every class keeps one to train and one to validate
    ([7, 7, 7], 10, [4, 3, 3]),      # the largest remainder first, ties in class order
    ([3, 4], None, [3, 4]),          # no max_items: everything
])
def test_stratified_split_keeps_each_class_in_its_share(counts, max_items, sizes):
    labels = np.repeat(np.arange(len(counts)), counts)
    train, valid = stratified_split(labels, valid_pct=0.2, seed=1, max_items=max_items)
    assert not set(train) & set(valid)
    kept = np.bincount(labels[train + valid], minlength=len(counts))
    assert kept.tolist() == sizes
    assert (np.bincount(labels[valid], minlength=len(counts)) >= 1).all()
    assert (np.bincount(labels[train], minlength=len(counts)) >= 1).all()
    assert stratified_split(labels, 0.2, 1, max_items) == (train, valid)
