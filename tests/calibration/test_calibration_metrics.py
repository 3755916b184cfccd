"""The metrics added to the counters (smooth ECE, debiased ECE, KS error, AUGRC, the risk-coverage curve, standard
errors), each against an independent reference: relplot, uncertainty-calibration, torch-uncertainty, and the
definitions computed row by row. Where the fine grid's cell width limits accuracy, the error is checked to be within
it."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from calibration_data import CASES, rows, sample, state_from
from oracles import relplot, uncertainty_calibration

from fastai_ls import CalibrationState
from fastai_ls.calibration.intervals import joint_cells


def sorted_by_confidence(conf: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(conf, kind="stable")
    return conf[order], correct[order].astype(float)


def ks_reference(conf: np.ndarray, correct: np.ndarray) -> float:
    """Gupta et al. 2021 row by row: max_k |(1/n) sum_{i<=k} (a_i - c_i)| over rows sorted by confidence."""
    c, a = sorted_by_confidence(conf, correct)
    return float(np.abs(np.cumsum(a - c)).max() / len(c))


def distinct_cells(n: int, seed: int, n_fine: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Confidences in n different fine cells (no ties), random correctness."""
    g = np.random.default_rng(seed)
    cells = g.choice(np.arange(n_fine // 5, n_fine), size=n, replace=False)
    conf = (cells + g.uniform(0.05, 0.95, n)) / n_fine
    return conf, g.random(n) < conf


# --- smooth ECE ----------------------------------------------------------------------------------------------------


def relplot_smece(conf: np.ndarray, correct: np.ndarray) -> float:
    """relplot.smECE with every row at exactly 0 or 1 counted twice. relplot 1.0.3 reflects its grid about the
    end points without the end point itself, so a row at exactly 0 or 1 keeps half its kernel mass (the paper's
    reflected kernel, and ours, keep all of it); counting it twice gives it its full weight."""
    edge = (conf == 0) | (conf == 1)
    return float(relplot.smECE(np.r_[conf, conf[edge]], np.r_[correct, correct[edge]].astype(float)))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n", [1_000, 10_000, 100_000])
def test_smooth_ece_agrees_with_relplot(case, n):
    if n == 100_000 and case.startswith("uniform, c"):
        pytest.skip("one large calibrated case is enough (relplot is slow on it)")
    conf, correct = sample(case, n, seed=n)
    ours = state_from(conf, correct).metrics()["smece"]
    assert ours == pytest.approx(relplot_smece(conf, correct), abs=2e-3)
    if not ((conf == 0) | (conf == 1)).any():
        assert ours == pytest.approx(relplot.smECE(conf, correct.astype(float)), abs=2e-3)


def test_where_every_row_is_over_confident_smooth_ece_is_the_mean_gap_at_any_bandwidth():
    # The reflected kernel keeps every row's mass in [0, 1], so a residual of one sign integrates to its mean:
    # smECE_sigma = mean(c - a) for every sigma, rows at exactly 1.0 included (relplot 1.0.3 gives 0.0757 for 0.0537
    # on a CIFAR-10 WideResNet's outputs, a quarter of them at 1.0).
    from fastai_ls.calibration.smooth import smooth_ece_at

    levels = np.r_[np.linspace(0.3, 0.99, 70), 1.0]  # 40 rows at each, a share c - 0.1 (at least 1 row) wrong
    conf = np.repeat(levels, 40)
    correct = np.concatenate([np.arange(40) >= max(1, round(40 * (1.1 - c))) for c in levels])
    state = state_from(conf, correct)
    metrics = state.metrics()
    fine = state.fine[state.fine[:, 0] > 0]
    assert (fine[:, 1] > fine[:, 2]).all()  # over-confident in every cell
    mean_gap = float(conf.mean() - correct.mean())
    assert metrics["smece"] == pytest.approx(mean_gap, abs=1e-9) and metrics["ece"] == pytest.approx(mean_gap)
    for sigma in (0.002, 0.05, 0.5):
        assert float(smooth_ece_at(state.fine, sigma)) == pytest.approx(mean_gap, abs=1e-9)


def test_relplot_gives_a_row_at_confidence_one_half_weight_and_the_reflected_kernel_full_weight():
    from fastai_ls.calibration.smooth import smooth_curve

    t = np.linspace(0, 1, 2001)
    relplot_mass = np.trapezoid(relplot.kernels.ReflectedGaussianKernel(0.05).apply(np.ones(1), np.ones(1), t), t)
    state = state_from(np.ones(1), np.ones(1, bool))
    curve = smooth_curve(state.fine, 0.05)
    ours_mass = float(torch.trapezoid(curve["density"], curve["t"]))
    assert relplot_mass == pytest.approx(0.5, abs=1e-6) and ours_mass == pytest.approx(1.0, abs=1e-6)


def test_smooth_ece_is_its_own_bandwidth_and_smoothing_more_never_raises_it():
    from fastai_ls.calibration.smooth import smooth_ece, smooth_ece_at

    fine = state_from(*sample("skewed, under-confident", 5000, seed=1)).fine
    value, sigma = smooth_ece(fine)
    assert float(value) == pytest.approx(float(sigma), abs=1e-8)  # the fixed point smECE_sigma = sigma
    values = [float(smooth_ece_at(fine, s)) for s in (0.005, 0.01, 0.03, 0.1, 0.3)]
    assert values == sorted(values, reverse=True)


@pytest.mark.parametrize("case", ["uniform, calibrated", "skewed, under-confident"])
def test_smooth_ece_from_the_fine_grid_is_within_its_cell_width_of_the_row_level_value(case):
    # 20,000 cells put every row within 5e-5 of its own confidence: the row-level value to well under 1e-3.
    conf, correct = sample(case, 20_000, seed=2)
    coarse = state_from(conf, correct, n_fine=1000).metrics()["smece"]
    fine = state_from(conf, correct, n_fine=20_000).metrics()["smece"]
    assert abs(coarse - fine) <= 1e-3


# --- debiased ECE ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["uniform, over-confident", "skewed, under-confident", "uniform, calibrated"])
def test_debiased_ece_equals_uncertainty_calibrations_estimator_on_the_same_bins(case):
    conf, correct = sample(case, 3000, seed=3)
    edges = uncertainty_calibration.utils.get_equal_prob_bins(conf, num_bins=15)  # (lo, hi] bins, as ours
    binned = uncertainty_calibration.utils.bin(list(zip(conf, correct.astype(float))), edges)
    want = uncertainty_calibration.utils.unbiased_l2_ce(binned)
    assert state_from(conf, correct).metrics()["ece_debiased"] == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_debiased_ece_is_near_zero_for_a_calibrated_model_where_binned_ece_is_clearly_positive():
    results = [state_from(*sample("uniform, calibrated", 5000, seed=s)).metrics() for s in range(8)]
    ece, rmsce, debiased = (np.mean([m[k] for m in results]) for k in ("ece", "rmsce", "ece_debiased"))
    assert ece > 0.01 and rmsce > 0.015  # noise alone, 5,000 rows in 15 bins
    assert debiased < 0.008 and debiased < rmsce / 4
    # On a miscalibrated model the two l2 estimates agree up to the small bias correction.
    over = state_from(*sample("uniform, over-confident", 2000, seed=0)).metrics()
    assert over["ece_debiased"] == pytest.approx(over["rmsce"], abs=0.01)


# --- KS error ------------------------------------------------------------------------------------------------------


def test_ks_error_equals_the_row_sorted_definition_when_rows_do_not_share_cells():
    conf, correct = distinct_cells(300, seed=4)
    assert state_from(conf, correct).metrics()["ks_error"] == pytest.approx(ks_reference(conf, correct), abs=1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_ks_error_is_within_the_documented_bound_of_the_row_sorted_value(case):
    conf, correct = sample(case, 5000, seed=5)
    state = state_from(conf, correct)
    bound = float(state.fine[:, 0].max()) / len(conf)  # rows of the fullest cell / n
    assert abs(state.metrics()["ks_error"] - ks_reference(conf, correct)) <= bound


# --- selective classification: AURC, AUGRC, the risk-coverage curve --------------------------------------------------


def torch_uncertainty_risk_coverage():
    """torch-uncertainty's risk_coverage.py loaded on its own: its package root needs Lightning."""
    spec = importlib.util.find_spec("torch_uncertainty")
    path = Path(spec.origin).parent / "metrics" / "classification" / "risk_coverage.py"
    module_spec = importlib.util.spec_from_file_location("tu_risk_coverage", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_aurc_and_augrc_agree_with_torch_uncertainty_on_rows_without_ties():
    tu = torch_uncertainty_risk_coverage()
    conf, correct = distinct_cells(400, seed=6)
    probs, target = rows(conf, correct)
    metrics = state_from(conf, correct).metrics()
    n = len(conf)
    for name, metric in (("aurc", tu.AURC()), ("augrc", tu.AUGRC())):
        metric.update(probs.float(), target)
        risk = metric.partial_compute().double().numpy()  # selective risk at coverage k/n, most confident first
        weights = np.arange(1, n + 1) / n if name == "augrc" else np.ones(n)
        # Ours is the mean over k (Traub et al.'s (1/n^2) sum_k E_k for AUGRC); torch-uncertainty takes the
        # trapezoid over coverage [1/n, 1] rescaled to [0, 1]: the two differ by O(1/n).
        assert metrics[name] == pytest.approx(float(np.mean(risk * weights)), abs=1e-6)  # theirs: float32
        assert metrics[name] == pytest.approx(float(metric.compute()), abs=2 / n)


def test_augrc_of_tied_confidences_is_the_mean_over_their_orders():
    conf = np.array([.95, .95, .95, .95, .70, .70, .70])
    error = np.array([1., 0., 1., 0., 0., 1., 0.])
    orders = [np.r_[list(a), list(b)] for a in itertools.permutations(range(4))
              for b in itertools.permutations(range(4, 7))]
    want = np.mean([np.cumsum(error[o]).sum() / 49 for o in orders])
    assert state_from(conf, error == 0).metrics()["augrc"] == pytest.approx(want, abs=1e-12)


def test_aurc_and_augrc_of_a_perfect_and_of_an_inverted_ranking():
    conf = np.linspace(0.2, 0.99, 500)
    best = state_from(conf, conf > np.quantile(conf, 0.3)).metrics()  # every error less confident than any hit
    a = 0.7
    assert best["aurc"] == pytest.approx(1 - a + a * np.log(a), abs=5e-3)
    assert best["augrc"] == pytest.approx((1 - a) ** 2 / 2, abs=2e-3)
    worst = state_from(conf, conf < np.quantile(conf, 0.3)).metrics()
    assert worst["aurc"] > 0.9 and worst["augrc"] > best["augrc"]


def test_risk_coverage_curve_is_read_at_cell_edges_and_its_means_are_aurc_and_augrc():
    conf, correct = distinct_cells(250, seed=7)
    state = state_from(conf, correct)
    curve = state.risk_coverage()
    c, a = sorted_by_confidence(conf, correct)
    c, errors = c[::-1], np.cumsum(1 - a[::-1])
    k = np.arange(1, len(c) + 1)
    np.testing.assert_allclose(curve["coverage"].numpy(), k / len(c))
    np.testing.assert_allclose(curve["risk"].numpy(), errors / k)
    np.testing.assert_allclose(curve["generalized_risk"].numpy(), errors / len(c))
    assert (curve["threshold"].numpy() < c).all() and (c - curve["threshold"].numpy() < 1e-3).all()
    metrics = state.metrics()
    assert float(curve["risk"].mean()) == pytest.approx(metrics["aurc"])
    assert float(curve["generalized_risk"].mean()) == pytest.approx(metrics["augrc"])


# --- NLL and Brier standard errors ----------------------------------------------------------------------------------


def test_nll_and_brier_standard_errors_equal_the_sample_standard_error_of_the_rows():
    g = torch.Generator().manual_seed(8)
    probs = (3 * torch.randn(500, 5, generator=g, dtype=torch.float64)).softmax(1)
    target = torch.randint(0, 5, (500,), generator=g)
    state = CalibrationState(5)
    for p, t in zip(probs.split(64), target.split(64)):  # streamed
        state.update(p, t)
    metrics = state.metrics()
    nll = -probs[torch.arange(500), target].log().numpy()
    brier = ((probs - torch.nn.functional.one_hot(target, 5)) ** 2).sum(1).numpy()
    for name, values in (("nll", nll), ("brier", brier)):
        assert metrics[name] == pytest.approx(values.mean(), rel=1e-12)
        assert metrics[f"{name}_se"] == pytest.approx(values.std(ddof=1) / np.sqrt(500), rel=1e-9)


# --- the common refinement of bins and fine cells behind the bootstrap ---------------------------------------------


@pytest.mark.parametrize("n_bins,n_fine", [(15, 1000), (10, 1000), (7, 50), (15, 15)])
def test_joint_cells_are_exactly_the_rows_counted_per_fine_cell_and_bin(n_bins, n_fine):
    conf, correct = sample("uniform, over-confident", 4000, seed=9)
    # Put rows right next to the bin edges inside split cells, where a wrong split would show.
    edges = np.arange(1, n_bins) / n_bins
    edges = edges[edges > 0.15]  # the top label stays class 0 (10 classes)
    conf = np.r_[conf, edges - 1e-7, edges + 1e-7, edges]
    correct = np.r_[correct, np.ones(len(edges), bool), np.zeros(2 * len(edges), bool)]
    state = state_from(conf, correct, n_bins=n_bins, n_fine=n_fine)
    cells, fine_of, bin_of = joint_cells(state.bins, state.fine)
    fine_idx = np.clip(np.ceil(conf * n_fine) - 1, 0, n_fine - 1).astype(int)
    bin_idx = np.clip(np.ceil(conf * n_bins) - 1, 0, n_bins - 1).astype(int)
    for j, (f, b) in enumerate(zip(fine_of.tolist(), bin_of.tolist())):
        rows_here = (fine_idx == f) & (bin_idx == b)
        assert cells[j, 0] == rows_here.sum()
        assert cells[j, 2] == correct[rows_here].sum()
        assert float(cells[j, 1]) == pytest.approx(conf[rows_here].sum(), abs=1e-9)
    assert len(set(zip(fine_of.tolist(), bin_of.tolist()))) == len(cells)
