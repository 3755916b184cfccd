"""Intervals over images and seeds (`seed_bootstrap`): the metrics of row-count-weighted rows are those of the
state of the rows repeated, the estimates are means over seeds, and differences are paired by seed and row."""

from __future__ import annotations

import pytest
import torch

from fastai_ls.calibration import CalibrationState
from fastai_ls.calibration.scores import row_scores
from fastai_ls.calibration.seed_bootstrap import SEED_METRICS, seed_bootstrap, weighted_metrics


def outputs(n=240, n_classes=6, sharpen=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, n_classes, generator=g)
    target = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
    return (sharpen * logits).softmax(1), target


def state_metrics(probs, target):
    state = CalibrationState(probs.shape[1])
    state.update(probs, target)
    m = state.metrics()
    return {**m, "error_rate": 1 - m["accuracy"]}


@pytest.mark.parametrize("sharpen", [0.5, 3.0])
def test_unit_weights_give_the_states_metrics(sharpen):
    probs, target = outputs(sharpen=sharpen)
    found = weighted_metrics(row_scores(probs, target), torch.ones(1, len(target)))
    expected = state_metrics(probs, target)
    assert list(found) == list(SEED_METRICS)
    for name, value in found.items():
        assert float(value) == pytest.approx(expected[name], rel=1e-12, abs=1e-15), name


def test_row_counts_give_the_metrics_of_the_rows_repeated():
    probs, target = outputs()
    g = torch.Generator().manual_seed(5)
    counts = torch.multinomial(torch.ones(len(target)), 3 * len(target), replacement=True, generator=g)
    weights = torch.bincount(counts, minlength=len(target))
    found = weighted_metrics(row_scores(probs, target), torch.stack([weights, torch.ones_like(weights)]))
    repeated = state_metrics(probs.repeat_interleave(weights, 0), target.repeat_interleave(weights))
    for name, values in found.items():
        assert float(values[0]) == pytest.approx(repeated[name], rel=1e-10, abs=1e-15), name
        assert float(values[1]) == pytest.approx(state_metrics(probs, target)[name], rel=1e-12, abs=1e-15)


def models(n_seeds=3, n=200):
    """Per seed, the same rows for two models: a sharp (over-confident) one and a softer one."""
    out = {"sharp": [], "soft": []}
    for k in range(n_seeds):
        g = torch.Generator().manual_seed(k)
        logits = torch.randn(n, 5, generator=g)
        target = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
        out["sharp"].append(row_scores((4 * logits).softmax(1), target))
        out["soft"].append(row_scores((1.2 * logits).softmax(1), target))
    return out


def test_estimates_are_means_over_seeds_with_intervals_that_hold_them():
    scores = models()
    found = seed_bootstrap(scores, n_boot=300, seed=1)
    for name, per_seed in scores.items():
        for metric in SEED_METRICS:
            mean = sum(float(weighted_metrics(s, torch.ones(1, 200))[metric]) for s in per_seed) / len(per_seed)
            row = found[(name, metric)]
            assert row["estimate"] == pytest.approx(mean, rel=1e-12)
            assert row["lower"] <= row["estimate"] <= row["upper"] or metric == "ece"  # binned ECE is biased
    assert seed_bootstrap(scores, n_boot=300, seed=1) == found  # the same seed, the same draws


def test_differences_are_paired_against_the_baseline_and_zero_for_itself():
    scores = models()
    found = seed_bootstrap(scores, baseline="soft", n_boot=300, seed=2)
    for metric in SEED_METRICS:
        assert (found[("soft", metric)]["difference"], found[("soft", metric)]["difference_lower"],
                found[("soft", metric)]["difference_upper"]) == (0.0, 0.0, 0.0)
        sharp, soft = found[("sharp", metric)], found[("soft", metric)]
        assert sharp["difference"] == pytest.approx(sharp["estimate"] - soft["estimate"], rel=1e-12)
    # the sharp model's NLL is worse on the same rows: pairing resolves it although the two intervals overlap
    nll = found[("sharp", "nll")]
    assert nll["difference_lower"] > 0
    assert nll["difference_upper"] - nll["difference_lower"] < (nll["upper"] - nll["lower"])


def test_seeds_that_disagree_widen_the_interval_beyond_the_images_noise():
    probs, target = outputs(200, 5)
    noisy = row_scores(probs, target)  # about half the rows wrong
    clean = row_scores(probs, probs.argmax(1))  # every row right
    twins = seed_bootstrap({"model": [noisy, noisy]}, n_boot=400, seed=0)[("model", "error_rate")]
    apart = seed_bootstrap({"model": [noisy, clean]}, n_boot=400, seed=0)[("model", "error_rate")]
    assert apart["upper"] - apart["lower"] > 2 * (twins["upper"] - twins["lower"])


def test_models_scored_on_other_rows_or_an_unknown_baseline_are_refused():
    scores = models()
    with pytest.raises(ValueError, match="same rows of the same seeds"):
        seed_bootstrap({"a": scores["sharp"], "b": scores["soft"][:2]})
    with pytest.raises(ValueError, match="baseline 'ce' is not one of the models"):
        seed_bootstrap(scores, baseline="ce")
    with pytest.raises(ValueError, match="n_boot"):
        seed_bootstrap(scores, n_boot=1)
