"""Label noise for the demo (`digits_learner(label_noise=...)`, `fastai-ls demo --label-noise`): exactly the asked
share of training labels becomes a random *wrong* class, seeded; the validation labels are never touched."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from fastai.learner import load_learner

import fastai_ls.cli.demo
from fastai_ls.cli import main
from fastai_ls.digits import digits_images, digits_learner, replace_labels


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    return digits_images(tmp_path_factory.mktemp("digits") / "digits")


def test_exactly_the_share_of_the_given_rows_changes_each_to_another_class():
    rng = np.random.default_rng(0)
    labels = [str(c) for c in rng.integers(0, 10, 1000)]
    rows = list(range(0, 1000, 2))  # "training" rows; the odd ones play validation
    noisy, changed = replace_labels(labels, rows, 0.3, seed=5)
    assert len(changed) == 150 == round(0.3 * len(rows)) and changed == sorted(set(changed))
    assert set(changed) <= set(rows)
    assert [i for i in range(1000) if noisy[i] != labels[i]] == changed  # each changed row has a new class
    assert all(isinstance(label, str) and label in set(labels) for label in noisy)
    assert labels == [str(c) for c in np.random.default_rng(0).integers(0, 10, 1000)]  # the input is not modified
    assert replace_labels(labels, rows, 0.3, seed=5) == (noisy, changed)  # deterministic for a seed
    assert replace_labels(labels, rows, 0.3, seed=6)[1] != changed
    assert replace_labels(labels, rows, 0.0, seed=5) == (labels, [])


def test_the_wrong_class_is_uniform_over_the_other_classes():
    labels = [0] * 20000 + [1] * 20000
    three = labels + [2] * 20000  # class 0's rows may become 1 or 2, equally often
    noisy, changed = replace_labels(three, range(20000), 0.9, seed=0)
    counts = Counter(noisy[i] for i in changed)
    assert set(counts) == {1, 2} and abs(counts[1] - counts[2]) < 4 * np.sqrt(len(changed))  # 4 sigma
    assert all(isinstance(label, int) for label in noisy)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan"), "0.2"])
def test_a_fraction_outside_0_1_is_refused(fraction):
    with pytest.raises(ValueError, match="label-noise fraction must be a number in \\[0, 1\\)"):
        replace_labels(["a", "b"], [0, 1], fraction)


def training_and_validation_labels(learn):
    """(given, true) labels of the training and of the validation set, as the learner's data serves them."""
    out = []
    for ds in (learn.dls.train_ds, learn.dls.valid_ds):
        given = [learn.dls.vocab[int(y)] for y in ds.tls[1]]
        true = [item.name[len("digit")] for item in ds.items]
        out.append((given, true))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("max_items, fraction", [(None, 0.2), (300, 0.4)])
def test_a_digits_learner_with_label_noise_trains_on_wrong_labels_and_validates_on_clean_ones(
        digits_folder, max_items, fraction):
    learn = digits_learner(path=digits_folder, max_items=max_items, label_noise=fraction, seed=7, calibration=False)
    (train_given, train_true), (valid_given, valid_true) = training_and_validation_labels(learn)
    wrong = [i for i, (g, t) in enumerate(zip(train_given, train_true)) if g != t]
    assert len(wrong) == round(fraction * len(train_true))  # exactly that share, each to another digit
    assert valid_given == valid_true  # validation stays clean
    names = [learn.dls.train_ds.items[i].name for i in wrong]
    assert learn.relabelled == {n: (t, g) for n, t, g in zip(names, (train_true[i] for i in wrong),
                                                                (train_given[i] for i in wrong))}
    again = digits_learner(path=digits_folder, max_items=max_items, label_noise=fraction, seed=7, calibration=False)
    assert again.relabelled == learn.relabelled  # deterministic for a seed
    other = digits_learner(path=digits_folder, max_items=max_items, label_noise=fraction, seed=8, calibration=False)
    assert other.relabelled != learn.relabelled
    clean = digits_learner(path=digits_folder, max_items=max_items, seed=7, calibration=False)
    assert clean.relabelled == {} and training_and_validation_labels(clean)[0] == (train_true, train_true)


def test_an_exported_learner_with_label_noise_loads(digits_folder, tmp_path):
    learn = digits_learner(path=digits_folder, max_items=100, bs=16, label_noise=0.2, calibration=False)
    learn.export(tmp_path / "noisy.pkl")
    loaded = load_learner(tmp_path / "noisy.pkl")
    item = learn.dls.train_ds.items[0]
    assert loaded.dls.vocab == learn.dls.vocab and loaded.predict(item)[0] in learn.dls.vocab


def test_the_demo_option_reaches_the_learner(monkeypatch):
    calls = []
    monkeypatch.setattr(fastai_ls.cli.demo, "compare", lambda make, runs, **kwargs: calls.append((make, kwargs)))
    assert main(["demo", "--label-noise", "0.2", "--methods", "temperature,ets", "--folds", "3"]) == 0
    (make, kwargs), = calls
    assert make.func is digits_learner and make.keywords["label_noise"] == 0.2
    assert kwargs["methods"] == ["temperature", "ets"] and kwargs["folds"] == 3
    assert main(["demo"]) == 0 and calls[-1][0].keywords["label_noise"] == 0.0
