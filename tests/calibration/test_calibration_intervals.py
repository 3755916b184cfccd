"""Confidence intervals from the counters: the histogram bootstrap against a row-level bootstrap, its coverage on
data with a known calibration curve, determinism, Wilson and normal intervals, and bad arguments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from calibration_data import rows, sample, state_from
from scipy.stats import binomtest

from fastai_ls import CalibrationState, calibration_metrics
from fastai_ls.calibration import intervals as intervals_module
from fastai_ls.calibration import threads
from fastai_ls.calibration.intervals import bootstrap_metrics, wilson_interval
from fastai_ls.calibration.state import INTERVAL_NAMES


@pytest.fixture
def one_thread():
    """Small tensors run faster on one thread, and much faster on busy cores."""
    with threads.one_thread():
        yield


def test_metrics_with_ci_give_an_interval_for_every_interval_metric_and_without_ci_run_no_bootstrap(monkeypatch):
    state = state_from(*sample("skewed, under-confident", 800, seed=0))
    with_ci = state.metrics(ci=0.9, n_boot=200)
    assert set(with_ci) == set(state.metrics()) | {f"{m}_{end}" for m in INTERVAL_NAMES for end in ("lo", "hi")}
    assert all(with_ci[f"{m}_lo"] <= with_ci[f"{m}_hi"] for m in INTERVAL_NAMES)

    def no_bootstrap(*args, **kwargs):
        raise AssertionError("a bootstrap without ci")

    monkeypatch.setattr(intervals_module, "_replicate_chunks", no_bootstrap)  # every bootstrap's replicates
    assert not any(k.endswith(("_lo", "_hi")) for k in state.metrics())
    with pytest.raises(AssertionError, match="a bootstrap without ci"):  # the guard is in the bootstrap's path
        state.metrics(ci=0.9, n_boot=10)


def test_the_same_seed_gives_the_same_intervals_and_another_seed_others():
    state = state_from(*sample("uniform, over-confident", 500, seed=1))
    first, again = state.intervals(0.95, 300, seed=7), state.intervals(0.95, 300, seed=7)
    assert first == again
    assert state.intervals(0.95, 300, seed=8) != first


def row_bootstrap(conf: np.ndarray, correct: np.ndarray, n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """The textbook bootstrap: resample the rows themselves and recompute each metric from them."""
    g = np.random.default_rng(seed)
    replicates = []
    for _ in range(n_boot):
        idx = g.integers(0, len(conf), len(conf))
        replicates.append(state_from(conf[idx], correct[idx], classwise=False).metrics())
    return {name: np.array([r[name] for r in replicates]) for name in replicates[0]}


def test_the_histogram_bootstrap_has_the_distribution_of_the_row_bootstrap(one_thread):
    conf, correct = sample("skewed, under-confident", 400, seed=2)
    state = state_from(conf, correct)
    ours = {k: v.numpy() for k, v in bootstrap_metrics(state.bins, state.fine, n_boot=2000, seed=0).items()}
    rows = row_bootstrap(conf, correct, n_boot=400, seed=1)
    for name in ("accuracy", "confidence", "ece", "mce", "ece_debiased", "adaptive_ece", "smece", "ks_error",
                 "aurc", "augrc"):
        mean_se = math.hypot(ours[name].std() / math.sqrt(2000), rows[name].std() / math.sqrt(400))
        assert abs(ours[name].mean() - rows[name].mean()) < 4 * mean_se + 1e-3, name  # + the cell width
        assert ours[name].std() == pytest.approx(rows[name].std(), rel=0.2), name


@pytest.mark.slow
@pytest.mark.parametrize("case", ["uniform, over-confident", "skewed, under-confident"])
def test_95_percent_intervals_cover_the_large_sample_value_in_90_to_99_percent_of_repetitions(case, one_thread):
    truth = state_from(*sample(case, 2_000_000, seed=10**6), classwise=False).metrics()
    repetitions, covered = 200, {"accuracy": 0, "smece": 0}
    for r in range(repetitions):
        metrics = state_from(*sample(case, 1000, seed=r), classwise=False).metrics(ci=0.95, n_boot=200, seed=r)
        for name in covered:
            covered[name] += metrics[f"{name}_lo"] <= truth[name] <= metrics[f"{name}_hi"]
    for name, hits in covered.items():
        assert 0.90 <= hits / repetitions <= 0.99, (name, hits)


def test_accuracy_intervals_narrow_as_one_over_root_n():
    widths = []
    for n in (1000, 16000):
        metrics = state_from(*sample("uniform, over-confident", n, seed=3)).metrics(ci=0.95, n_boot=500)
        widths.append(metrics["accuracy_hi"] - metrics["accuracy_lo"])
    assert widths[0] / widths[1] == pytest.approx(4, rel=0.2)


def test_nll_and_brier_intervals_are_normal_intervals_from_their_standard_errors():
    metrics = state_from(*sample("uniform, over-confident", 600, seed=4)).metrics(ci=0.9, n_boot=50)
    z = 1.6448536269514722
    for name in ("nll", "brier"):
        assert metrics[f"{name}_lo"] == pytest.approx(metrics[name] - z * metrics[f"{name}_se"], rel=1e-12)
        assert metrics[f"{name}_hi"] == pytest.approx(metrics[name] + z * metrics[f"{name}_se"], rel=1e-12)


def test_nll_and_brier_intervals_stay_within_the_range_of_the_metric():
    # Regression (found on the 6 validation images of `fastai-ls pets` on a generated tree): a few rows with one
    # large NLL gave the symmetric normal interval a lower end below 0, e.g. NLL 0.4744 [-0.2718, 1.2205].
    state = CalibrationState(2)
    state.update(torch.tensor([[0.999, 0.001]] * 5 + [[0.01, 0.99]]), torch.tensor([0] * 5 + [0]))
    metrics = state.metrics(ci=0.95, n_boot=50)
    z = 1.959963984540054
    assert metrics["nll"] - z * metrics["nll_se"] < 0 and metrics["nll_lo"] == 0.0
    assert metrics["nll_hi"] == pytest.approx(metrics["nll"] + z * metrics["nll_se"], rel=1e-12)
    assert metrics["brier"] - z * metrics["brier_se"] < 0 and metrics["brier_lo"] == 0.0
    wrong = CalibrationState(2)
    wrong.update(torch.tensor([[0.0, 1.0]] * 5 + [[0.5, 0.5]]), torch.tensor([0] * 6))
    metrics = wrong.metrics(ci=0.95, n_boot=50)
    assert metrics["brier"] + z * metrics["brier_se"] > 2 and metrics["brier_hi"] == 2.0


@pytest.mark.parametrize("correct,count", [(0, 1), (1, 1), (3, 7), (40, 41), (120, 400), (0, 25)])
def test_wilson_intervals_equal_scipys(correct, count):
    lo, hi = wilson_interval(torch.tensor([correct], dtype=torch.float64), torch.tensor([count], dtype=torch.float64),
                             0.95)
    want = binomtest(correct, count).proportion_ci(0.95, method="wilson")
    assert (float(lo), float(hi)) == pytest.approx((want.low, want.high), abs=1e-12)


def test_an_empty_state_has_nan_intervals():
    metrics = CalibrationState(3).metrics(ci=0.95)
    assert all(math.isnan(metrics[f"{m}_{end}"]) for m in INTERVAL_NAMES for end in ("lo", "hi"))


@pytest.mark.parametrize("kwargs,match", [
    ({"ci": 1.0}, "ci must"), ({"ci": 0}, "ci must"), ({"ci": True}, "ci must"), ({"ci": 0.95, "n_boot": 1}, "n_boot"),
    ({"ci": 0.9, "n_boot": 2.5}, "n_boot")])
def test_bad_interval_arguments_are_refused(kwargs, match):
    probs = torch.tensor([[.9, .1], [.3, .7]])
    with pytest.raises(ValueError, match=match):
        calibration_metrics(probs, torch.tensor([0, 0]), **kwargs)


def test_intervals_need_at_least_as_many_fine_cells_as_bins():
    state = CalibrationState(2, n_bins=15, n_fine=10)
    state.update(torch.tensor([[.9, .1]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="n_fine"):
        state.metrics(ci=0.95)


def test_a_large_bootstrap_is_drawn_in_chunks_with_the_replicates_of_one_draw(monkeypatch):
    # All replicates were held at once: about 70 kB each at 1000 fine cells, so n_boot=10,000 took 0.7 GB and
    # 100,000 would take 7 GB (the machine has 24). Now at most CHUNK at a time, and the intervals do not change.
    state = state_from(*sample("skewed, under-confident", 600, seed=5))
    sizes = []
    real = intervals_module._resample

    def recorded(cells, n_boot, *args):
        sizes.append(n_boot)
        return real(cells, n_boot, *args)

    monkeypatch.setattr(intervals_module, "_resample", recorded)
    monkeypatch.setattr(intervals_module, "CHUNK", 300)
    chunked = bootstrap_metrics(state.bins, state.fine, n_boot=700, seed=3)
    assert sizes == [300, 300, 100]
    monkeypatch.setattr(intervals_module, "CHUNK", 10**6)
    at_once = bootstrap_metrics(state.bins, state.fine, n_boot=700, seed=3)
    assert sizes[3:] == [700]
    assert chunked.keys() == at_once.keys()
    for name in at_once:
        torch.testing.assert_close(chunked[name], at_once[name], rtol=1e-12, atol=0, equal_nan=True, msg=name)
    _, rep_fine, _ = intervals_module.bootstrap_histograms(state.bins, state.fine, n_boot=700, seed=3)
    assert rep_fine.shape[0] == 700


@pytest.mark.parametrize("scale", [0.1, 1 / 3, 0.7, 1e-3])
def test_weights_scaled_by_any_factor_give_the_intervals_of_the_unscaled_weights(scale):
    # Reviewed: weights of 0.1 (or 1/3) drew other bootstrap replicates than weights of 1: a bin edge inside a fine
    # cell left a rounding error (1e-14 rows) as a bootstrap category of its own, and intervals moved by up to 25%.
    probs, target = rows(*sample("skewed, under-confident", 600, seed=1))
    weight = torch.rand(600, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
    for unit_weight in (torch.ones(600, dtype=torch.float64), weight):
        unit, scaled = CalibrationState(probs.shape[1]), CalibrationState(probs.shape[1])
        unit.update(probs, target, weight=unit_weight)
        scaled.update(probs, target, weight=unit_weight * scale)
        want, got = unit.metrics(ci=0.95, n_boot=200), scaled.metrics(ci=0.95, n_boot=200)
        want.pop("n"), got.pop("n")
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("case", ["uniform, over-confident", "uniform, calibrated", "skewed to 1, over-confident"])
def test_weighted_split_cells_whose_rows_are_all_correct_draw_no_category_of_rounding_errors(case):
    # Reviewed: where every row of a cell split by a bin edge was correct, its count and correct parts differed by
    # ~1e-13 weighted rows, drawn as a category of its own: weights x0.1 moved intervals by up to 165% (a near-0
    # underconfidence by far more).
    probs, target = rows(*sample(case, 3000, seed=1))
    weight = torch.rand(3000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    unit, scaled = CalibrationState(probs.shape[1]), CalibrationState(probs.shape[1])
    unit.update(probs, target, weight=weight)
    scaled.update(probs, target, weight=weight * 0.1)
    want, got = unit.metrics(ci=0.95, n_boot=100), scaled.metrics(ci=0.95, n_boot=100)
    want.pop("n"), got.pop("n")
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
