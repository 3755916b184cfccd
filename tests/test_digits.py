"""`digits_images` writes scikit-learn's bundled digits as image files, and never deletes what it did not write."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from fastai_ls.digits import N_DIGITS, digits_images


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
