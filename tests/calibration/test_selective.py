"""Selective classification: confidence scores against their formulas, the sort-based metrics against plain loops
(ties by expectation), the bootstrap against the metrics of its resampled rows, torch-uncertainty as an oracle
where there are no ties, the cross-fitted choice, the streamed bound, the command, the plot and bad input."""

from __future__ import annotations

import importlib.util
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fastai_ls import CalibrationState, augrc, aurc, compare_confidence_scores, confidence_scores
from fastai_ls.calibration.compare_scores import softmax_response_note
from fastai_ls.calibration.confidence_scores import SCORE_NAMES
from fastai_ls.calibration.selective import (
    coverage_at_risk,
    expected_errors,
    risk_at_coverage,
    selective_accuracy,
    streamed_error_bound,
)
from fastai_ls.calibration.selective_bootstrap import (
    _generator,
    _replicate_weights,
    bootstrap_selective,
    selective_table,
)
from fastai_ls.cli import main

# --- plain references ------------------------------------------------------------------------------------------------


def reference_expected_errors(scores, correct) -> list[float]:
    """E(k) by a loop over k: the errors of the rows scored strictly above the k-th score, plus the share of the
    tied rows still needed times their error rate."""
    scores, wrong = [float(s) for s in scores], [0.0 if bool(c) else 1.0 for c in correct]
    ranked = sorted(scores, reverse=True)
    out = []
    for k in range(1, len(scores) + 1):
        level = ranked[k - 1]
        above = [i for i, s in enumerate(scores) if s > level]
        tied = [i for i, s in enumerate(scores) if s == level]
        needed = k - len(above)
        out.append(sum(wrong[i] for i in above) + needed * sum(wrong[i] for i in tied) / len(tied))
    return out


def reference_metrics(scores, correct) -> dict[str, float]:
    e = reference_expected_errors(scores, correct)
    n = len(e)
    return {"aurc": sum(e[k - 1] / k for k in range(1, n + 1)) / n, "augrc": sum(e) / n / n}


def tied_data(n=400, levels=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (n,), generator=g).double() / levels
    return scores, torch.rand(n, generator=g) < 0.3 + 0.6 * scores


def realistic_logits(n=600, c=10, seed=0, smoothing=0.0):
    """Logits of a classifier that is right more often on confident rows; with `smoothing`, the top logit of the
    likely-right rows is pulled down, as label smoothing does (Xia et al. 2025)."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, c, (n,), generator=g)
    strength = 4 * torch.rand(n, generator=g)
    z = torch.randn(n, c, generator=g)
    z[torch.arange(n), targets] += strength
    return z, targets


# --- the metrics --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aurc_and_augrc_equal_the_plain_loop_with_many_ties(seed):
    scores, correct = tied_data(seed=seed)
    want = reference_metrics(scores, correct)
    assert aurc(scores, correct) == pytest.approx(want["aurc"], abs=1e-12)
    assert augrc(scores, correct) == pytest.approx(want["augrc"], abs=1e-12)


def test_every_score_of_realistic_logits_equals_the_plain_loop():
    z, y = realistic_logits()
    correct = z.argmax(1) == y
    for name, s in confidence_scores(z).items():
        want = reference_metrics(s, correct)
        assert aurc(s, correct) == pytest.approx(want["aurc"], abs=1e-12), name
        assert augrc(s, correct) == pytest.approx(want["augrc"], abs=1e-12), name


def test_tied_rows_share_their_errors_as_the_mean_over_their_orders():
    scores = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.5, 0.5, 0.5])
    wrong = np.array([1, 0, 1, 0, 0, 1, 0])
    orders = [list(a) + list(b) for a in itertools.permutations(range(4)) for b in itertools.permutations(range(4, 7))]
    curves = np.array([np.cumsum(wrong[o]) for o in orders], dtype=float)
    k = np.arange(1, 8)
    correct = torch.from_numpy(wrong == 0)
    assert expected_errors(scores, correct).numpy() == pytest.approx(curves.mean(0), abs=1e-12)
    assert aurc(scores, correct) == pytest.approx(float((curves / k).mean(1).mean()), abs=1e-12)
    assert augrc(scores, correct) == pytest.approx(float(curves.sum(1).mean()) / 49, abs=1e-12)


def test_risk_and_accuracy_at_coverage_and_coverage_at_risk_equal_plain_loops():
    scores, correct = tied_data(n=300, seed=3)
    e = reference_expected_errors(scores, correct)
    n = len(e)
    coverages = [0.01, 0.1, 0.333, 0.5, 0.9, 1.0]
    want = [e[max(1, math.ceil(c * n - 1e-9)) - 1] / max(1, math.ceil(c * n - 1e-9)) for c in coverages]
    assert risk_at_coverage(scores, correct, coverages).tolist() == pytest.approx(want, abs=1e-12)
    assert selective_accuracy(scores, correct, 0.5) == pytest.approx(1 - want[3], abs=1e-12)
    for risk in (0.0, 0.05, 0.2, 0.5, 1.0):
        best = max([k for k in range(1, n + 1) if e[k - 1] / k <= risk + 1e-12], default=0)
        assert coverage_at_risk(scores, correct, risk) == pytest.approx(best / n, abs=1e-12)


def torch_uncertainty_risk_coverage():
    """torch-uncertainty's risk_coverage.py loaded on its own (its package root needs Lightning, so
    `pytest.importorskip("torch_uncertainty")` would skip where the metrics are there); skipped without it."""
    spec = importlib.util.find_spec("torch_uncertainty")
    if spec is None:
        pytest.skip("torch-uncertainty is not installed")
    path = Path(spec.origin).parent / "metrics" / "classification" / "risk_coverage.py"
    module_spec = importlib.util.spec_from_file_location("tu_risk_coverage", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_aurc_and_augrc_agree_with_torch_uncertainty_on_the_softmax_response_without_ties():
    tu = torch_uncertainty_risk_coverage()
    z, y = realistic_logits(n=500, seed=4)
    msp = confidence_scores(z, ["msp"])["msp"]
    assert len(torch.unique(msp)) == len(msp)
    correct = z.argmax(1) == y
    n = len(y)
    for name, metric, ours in (("aurc", tu.AURC(), aurc), ("augrc", tu.AUGRC(), augrc)):
        metric.update(z.double().softmax(1), y)
        risk = metric.partial_compute().double().numpy()  # theirs at coverage k/n, most confident first
        weights = np.arange(1, n + 1) / n if name == "augrc" else np.ones(n)
        # Ours is the mean over k; theirs the trapezoid over coverage [1/n, 1] rescaled to [0, 1]: O(1/n) apart.
        assert ours(msp, correct) == pytest.approx(float(np.mean(risk * weights)), abs=1e-6)  # theirs: float32
        assert ours(msp, correct) == pytest.approx(float(metric.compute()), abs=2 / n)


# --- the scores ---------------------------------------------------------------------------------------------------


def test_scores_equal_their_formulas():
    z, _ = realistic_logits(n=50, c=7, seed=5)
    z = z.double()
    s = confidence_scores(z, p=3, temperature=0.5)
    probs = z.softmax(1)
    top2 = probs.topk(2, 1).values
    centred = z - z.mean(1, keepdim=True)
    norm = centred.abs().pow(3).sum(1).pow(1 / 3)
    sum_sq = (probs ** 2).sum(1)
    want = {"msp": top2[:, 0], "max_logit": z.max(1).values, "margin": top2[:, 0] - top2[:, 1],
            "energy": torch.log(torch.exp(z).sum(1)), "entropy": (probs * probs.log()).sum(1),
            "doctor": -(1 - sum_sq) / sum_sq, "pnorm": centred.max(1).values / norm,
            "pnorm_softmax": (centred / (0.5 * norm[:, None])).softmax(1).max(1).values}
    assert list(s) == list(SCORE_NAMES)
    for name, values in want.items():
        assert s[name].dtype == torch.float64
        torch.testing.assert_close(s[name], values, rtol=1e-12, atol=1e-12, msg=name)


def test_normalised_scores_are_the_same_from_log_probabilities():
    z, _ = realistic_logits(n=40, seed=6)
    for p in (1, 2, 7, math.inf):
        a = confidence_scores(z.double(), ["pnorm", "pnorm_softmax", "msp", "doctor"], p=p)
        b = confidence_scores(z.double().log_softmax(1), ["pnorm", "pnorm_softmax", "msp", "doctor"], p=p)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-12, atol=1e-12)


def test_doctor_keeps_its_precision_on_confident_rows_and_equal_logits_get_the_lowest_scores():
    z = torch.tensor([[40.0, 0.0, 0.0], [41.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    s = confidence_scores(z)
    # 1 - sum p^2 ~ 2 * 2e-18 would round to 0 from 1 - sum p^2: the two confident rows would tie.
    assert s["doctor"][0] < s["doctor"][1] < 0
    assert s["pnorm"][2] == 0 and s["pnorm_softmax"][2] == pytest.approx(1 / 3)
    assert s["pnorm"][2] < s["pnorm"][:2].min()


def test_a_minus_inf_logit_is_a_class_ruled_out():
    z = torch.tensor([[2.0, 0.0, -math.inf], [0.0, 1.0, 0.5]])
    s = confidence_scores(z)
    assert all(bool(v.isfinite().all()) for v in s.values())
    assert s["msp"][0] == pytest.approx(math.exp(2) / (math.exp(2) + 1))


# --- the bootstrap ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [8, 10**9])
def test_each_replicate_is_the_exact_metric_of_its_resampled_rows(levels):
    scores, correct = tied_data(n=200, levels=levels, seed=7)
    other = scores.flip(0)
    reps = bootstrap_selective({"a": scores, "b": other}, correct, n_boot=6, seed=11)
    weights = next(_replicate_weights(200, 6, _generator(11)))
    for b in range(6):
        rows = torch.repeat_interleave(torch.arange(200), weights[:, b].long())
        for name, s in (("a", scores), ("b", other)):
            assert float(reps[name]["aurc"][b]) == pytest.approx(aurc(s[rows], correct[rows]), abs=1e-12)
            assert float(reps[name]["augrc"][b]) == pytest.approx(augrc(s[rows], correct[rows]), abs=1e-12)


def test_the_bootstrap_is_seeded_pairs_scores_and_does_not_depend_on_the_chunk_size(monkeypatch):
    scores, correct = tied_data(n=300, seed=8)
    a = bootstrap_selective({"x": scores, "y": scores.clone()}, correct, n_boot=50, seed=3)
    assert torch.equal(a["x"]["aurc"], a["y"]["aurc"])  # the same rows: a paired difference of exactly 0
    monkeypatch.setattr("fastai_ls.calibration.selective_bootstrap._CHUNK_ELEMENTS", 300 * 7)  # chunks of 7 replicates
    b = bootstrap_selective({"x": scores}, correct, n_boot=50, seed=3)
    assert not torch.equal(a["x"]["aurc"], bootstrap_selective({"x": scores}, correct, n_boot=50, seed=4)["x"]["aurc"])
    # Chunks draw other numbers than one draw of all replicates; the distributions agree.
    assert float(b["x"]["aurc"].mean()) == pytest.approx(float(a["x"]["aurc"].mean()), rel=0.05)


def test_selective_table_has_intervals_around_the_estimates_and_paired_differences():
    z, y = realistic_logits(n=800, seed=9)
    correct = z.argmax(1) == y
    table = selective_table(confidence_scores(z), correct, n_boot=200)
    assert (table["aurc_lo"] <= table["aurc"]).all() and (table["aurc"] <= table["aurc_hi"]).all()
    assert table.loc["msp", "aurc_vs_msp"] == 0 and table.loc["msp", "aurc_vs_msp_hi"] == 0
    row = table.loc["energy"]
    assert row["aurc_vs_msp"] == pytest.approx(row["aurc"] - table.loc["msp", "aurc"], abs=1e-15)
    # Paired intervals are narrower than the difference of two unpaired ones would be.
    assert row["aurc_vs_msp_hi"] - row["aurc_vs_msp_lo"] < (row["aurc_hi"] - row["aurc_lo"])


# --- the cross-fitted choice --------------------------------------------------------------------------------------


def test_the_choice_falls_back_to_msp_when_no_score_is_better():
    # Labels drawn from the model's own softmax: the softmax response is the best ranking there is.
    g = torch.Generator().manual_seed(10)
    z = 2.5 * torch.randn(1500, 5, generator=g)
    y = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    table = compare_confidence_scores(z, y, folds=3, n_boot=200)
    assert list(table.index) == [*SCORE_NAMES, "selected"]
    assert table.loc["selected", "choice"] == "msp"
    assert table.loc["selected", "aurc"] == table.loc["msp", "aurc"]
    assert not table.attrs["msp_ranks_worse"]
    assert "do not show the softmax response ranking worse" in softmax_response_note(table) \
        or "ranks better" in softmax_response_note(table)


def test_a_normalised_score_is_chosen_when_the_logit_scale_misleads_the_softmax_response():
    # Rows whose logits are scaled up at random, unrelated to being right: the softmax response ranks by the scale,
    # a normalised score by the shape (whether the target stands out), which decides correctness.
    g = torch.Generator().manual_seed(12)
    n, c = 2000, 10
    y = torch.randint(0, c, (n,), generator=g)
    z = torch.randn(n, c, generator=g)
    z[torch.arange(n), y] += 3 * torch.rand(n, generator=g)
    z = z * torch.exp(1.5 * torch.randn(n, 1, generator=g))
    table = compare_confidence_scores(z, y, folds=3, n_boot=200)
    assert table.loc["selected", "choice"].startswith("pnorm")
    assert table.loc["selected", "aurc_vs_msp_hi"] < 0
    assert table.attrs["msp_ranks_worse"]
    note = softmax_response_note(table)
    assert note.startswith("the softmax response ranks worse than pnorm") and "paired" in note


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compare_and_the_scores_leave_their_inputs_as_they_were(dtype):
    z, y = realistic_logits(n=300, seed=13)
    z = z.to(dtype)
    z[0, 1] = -math.inf
    z_before, y_before = z.clone(), y.clone()
    compare_confidence_scores(z, y, folds=2, n_boot=20)
    confidence_scores(z, p=1.5)
    assert torch.equal(z, z_before) and torch.equal(y, y_before)


# --- the streamed values ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_the_streamed_aurc_and_augrc_are_within_the_stated_bound_of_the_exact_values(seed):
    z, y = realistic_logits(n=3000, seed=seed)
    probs = z.double().softmax(1)
    state = CalibrationState(10, n_fine=100)
    state.update(probs, y)
    streamed = state.metrics()
    msp, correct = probs.max(1).values, probs.argmax(1) == y
    bound = streamed_error_bound(state.fine)
    for name, exact in (("aurc", aurc(msp, correct)), ("augrc", augrc(msp, correct))):
        assert abs(streamed[name] - exact) <= bound[name] + 1e-12
        assert abs(streamed[name] - exact) > 0  # the histogram does lose the order within its cells


def test_the_augrc_bound_is_reached_when_a_cell_holds_its_errors_first():
    conf = torch.tensor([0.951, 0.952, 0.953, 0.954, 0.7], dtype=torch.float64)  # a fine cell of four, then one
    correct = torch.tensor([True, True, False, False, True])  # the two errors are the most confident of the cell
    probs = torch.stack([conf, 1 - conf], 1)
    state = CalibrationState(2, n_bins=2, n_fine=10)
    state.update(probs, (~correct).long())
    bound = streamed_error_bound(state.fine)
    exact = augrc(conf, correct)
    assert abs(state.metrics()["augrc"] - exact) == pytest.approx(bound["augrc"], abs=1e-12)
    assert abs(state.metrics()["aurc"] - aurc(conf, correct)) == pytest.approx(bound["aurc"], abs=1e-12)


# --- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, message", [
    (lambda: confidence_scores(torch.zeros(3)), "must be \\(N, C\\)"),
    (lambda: confidence_scores(torch.tensor([[0.0, math.nan]])), "NaN or \\+inf"),
    (lambda: confidence_scores(torch.zeros(2, 3, dtype=torch.long)), "floating point"),
    (lambda: confidence_scores(torch.zeros(2, 3), p=0), "p must be a positive number"),
    (lambda: confidence_scores(torch.zeros(2, 3), p=-1), "p must be a positive number"),
    (lambda: confidence_scores(torch.zeros(2, 3), p=True), "p must be a positive number"),
    (lambda: confidence_scores(torch.zeros(2, 3), ["softmax"]), "scores must be distinct names"),
    (lambda: aurc(torch.zeros(3), torch.ones(4, dtype=torch.bool)), "both be \\(N,\\)"),
    (lambda: aurc(torch.tensor([0.5, math.nan]), torch.ones(2, dtype=torch.bool)), "scores hold NaN"),
    (lambda: augrc(torch.zeros(2), torch.tensor([0.5, 1.0])), "correct must be bool, or 0 and 1"),
    (lambda: risk_at_coverage(torch.zeros(2), torch.ones(2), 0.0), "coverage must be in \\(0, 1\\]"),
    (lambda: coverage_at_risk(torch.zeros(2), torch.ones(2), 1.5), "risk must be in \\[0, 1\\]"),
    (lambda: compare_confidence_scores(torch.zeros(4, 3), torch.tensor([0.0, 1.0, 2.0, 0.5])), "integer class ids"),
    (lambda: compare_confidence_scores(torch.zeros(4, 3), torch.tensor([0, 1, 3, 0])), "outside \\[0, 3\\)"),
    (lambda: compare_confidence_scores(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long)), "4 integer class ids"),
    (lambda: compare_confidence_scores(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), grid=[2, 0]),
     "every p of grid"),
    (lambda: compare_confidence_scores(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), seed=-1), "seed"),
])
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_scores_at_both_infinities_and_signed_zeros_tie_as_the_plain_loop_says():
    scores = torch.tensor([math.inf, 0.0, -0.0, -math.inf, math.inf, 0.0, -math.inf, 1.0], dtype=torch.float64)
    correct = torch.tensor([1, 0, 1, 0, 0, 1, 1, 1])
    want = reference_metrics(scores, correct)
    assert aurc(scores, correct) == pytest.approx(want["aurc"], abs=1e-12)
    assert augrc(scores, correct) == pytest.approx(want["augrc"], abs=1e-12)
    assert expected_errors(scores, correct).tolist() == pytest.approx(reference_expected_errors(scores, correct))


def test_logits_so_large_that_float64_overflows_are_refused_not_scored_as_nan():
    # Regression: [1e308, -1e308, 0] gave a NaN entropy; [1e308, 1e308, -1e308] NaN normalised scores.
    for row in ([1e308, -1e308, 0.0], [1e308, 1e308, -1e308]):
        with pytest.raises(ValueError, match="beyond \\+-1e\\+300"):
            confidence_scores(torch.tensor([row, [0.0, 1.0, 2.0]], dtype=torch.float64))
    finite = confidence_scores(torch.tensor([[1e300, -1e300, -math.inf]], dtype=torch.float64))
    assert all(bool(v.isfinite().all()) for v in finite.values())


def test_a_p_so_small_that_the_norm_overflows_is_refused_rather_than_tying_every_row():
    # Regression: p=1e-3 made ||c||_p overflow, so pnorm was 0 (and pnorm_softmax 1/C) on every row, and
    # compare_confidence_scores could pick that all-tied ranking.
    z, y = realistic_logits(n=60, c=3, seed=20)
    with pytest.raises(ValueError, match="p=0.001 is too small"):
        confidence_scores(z, ["pnorm"], p=1e-3)
    with pytest.raises(ValueError, match="p=0.001 is too small"):
        compare_confidence_scores(z, y, grid=[1e-3, 2], n_boot=20)
    small = confidence_scores(z, ["pnorm"], p=0.05)["pnorm"]
    assert bool((small > 0).all()) and len(torch.unique(small)) == len(small)


def test_the_grid_takes_numpy_numbers_and_refuses_ints_beyond_float64_with_a_clear_error():
    # Regression: grid=np.arange(1, 10) was refused (np.int64 is not an int), and p=10**400 raised an OverflowError.
    z, y = realistic_logits(n=60, c=3, seed=23)
    by_numpy = compare_confidence_scores(z, y, grid=np.arange(1, 4), n_boot=20)
    assert by_numpy.equals(compare_confidence_scores(z, y, grid=[1, 2, 3], n_boot=20))
    with pytest.raises(ValueError, match="every p of grid must be a positive number"):
        compare_confidence_scores(z, y, grid=[2, 10**400], n_boot=20)
    with pytest.raises(ValueError, match="p must be a positive number"):
        confidence_scores(z, ["pnorm"], p=10**400)
    big = confidence_scores(z, ["pnorm"], p=2**70)["pnorm"]
    assert torch.equal(big, confidence_scores(z, ["pnorm"], p=2.0**70)["pnorm"])


def test_integer_and_low_precision_scores_rank_as_their_values_and_inexact_ones_are_refused():
    # Regression: complex scores lost their imaginary part with only a warning, and int64 scores beyond 2**53 became
    # false ties in float64.
    correct = torch.tensor([1, 0, 1, 1, 0])
    ints = torch.tensor([3, 1, 2, 2, 0])
    want = reference_metrics(ints, correct)
    for scores in (ints, ints.int(), ints.half(), ints.bfloat16(), ints.double()):
        assert aurc(scores, correct) == pytest.approx(want["aurc"], abs=1e-12)
    with pytest.raises(ValueError, match="beyond 2\\*\\*53"):
        aurc(torch.tensor([2**53 + 1, 2**53, 0, 1, 2]), correct)
    with pytest.raises(ValueError, match="real numbers"):
        augrc(ints.to(torch.complex64), correct)

def test_coverage_and_risk_take_numbers_arrays_and_tensors_and_refuse_bools_and_strings():
    scores, correct = tied_data(n=50, seed=21)
    want = risk_at_coverage(scores, correct, 0.5)
    assert risk_at_coverage(scores, correct, torch.tensor(0.5)) == want
    assert risk_at_coverage(scores, correct, np.float32(0.5)) == want
    assert risk_at_coverage(scores, correct, np.array([0.5, 1.0])).tolist() == \
        risk_at_coverage(scores, correct, [0.5, 1.0]).tolist()
    assert coverage_at_risk(scores, correct, torch.tensor([0.2])).tolist() == [coverage_at_risk(scores, correct, 0.2)]
    for bad in (True, "0.5", [[0.5]], None):
        with pytest.raises(ValueError, match="coverage must be in"):
            risk_at_coverage(scores, correct, bad)
    with pytest.raises(ValueError, match="risk must be in"):
        coverage_at_risk(scores, correct, False)


def test_the_bootstrap_refuses_folds_and_subsets_that_do_not_fit_the_rows():
    # Regression: folds of the wrong length or for an unknown score were ignored or misread silently, and a
    # subset with an out-of-range row id raised an IndexError.
    s, c = {"a": torch.tensor([0.9, 0.8, 0.1, 0.5])}, torch.tensor([1, 1, 0, 1])
    for kwargs, message in (({"folds": {"a": torch.tensor([0, 1])}}, "folds\\['a'\\] must be an \\(4,\\)"),
                            ({"folds": {"b": torch.tensor([0, 1, 0, 1])}}, "folds name scores that are not given"),
                            ({"subsets": {"a": torch.tensor([0, 9])}}, "integer row ids in \\[0, 4\\)"),
                            ({"subsets": {"a": torch.tensor([0, -1])}}, "integer row ids in \\[0, 4\\)"),
                            ({"subsets": {"a": torch.tensor([0.0, 1.0])}}, "integer row ids")):
        with pytest.raises(ValueError, match=message):
            bootstrap_selective(s, c, n_boot=5, **kwargs)


def test_the_streamed_bound_of_no_rows_is_a_clear_error():
    # Regression: empty counters raised ZeroDivisionError.
    for fine in (torch.zeros(0, 3), torch.zeros(5, 3)):
        with pytest.raises(ValueError, match="counts no rows"):
            streamed_error_bound(fine)
    with pytest.raises(ValueError, match="\\(K, 3\\)"):
        streamed_error_bound(torch.zeros(5))


# --- the command, the plot ----------------------------------------------------------------------------------------


def test_the_command_prints_every_score_and_the_note(tmp_path, capsys):
    z, y = realistic_logits(n=400, seed=14)
    np.savez(tmp_path / "p.npz", logits=z.numpy(), targets=y.numpy())
    assert main(["selective", str(tmp_path / "p.npz"), "--folds", "3", "--out", str(tmp_path / "s.csv")]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert set(SCORE_NAMES) | {"selected"} <= lines
    assert "AURC - MSP" in out and "the softmax response ranks" in out
    assert (tmp_path / "s.csv").read_text().startswith("score,aurc,aurc_lo,aurc_hi")


def test_the_command_never_writes_over_its_input_and_replaces_a_file_only_with_force(tmp_path, capsys):
    z, y = realistic_logits(n=200, seed=16)
    np.savez(tmp_path / "p.npz", logits=z.numpy(), targets=y.numpy())
    before = (tmp_path / "p.npz").read_bytes()
    for option in ("--out", "--plot"):
        assert main(["selective", str(tmp_path / "p.npz"), option, str(tmp_path / "p.npz"), "--force"]) == 1
        assert "is the predictions file" in capsys.readouterr().err
    assert (tmp_path / "p.npz").read_bytes() == before
    (tmp_path / "s.csv").write_text("an earlier table")
    assert main(["selective", str(tmp_path / "p.npz"), "--out", str(tmp_path / "s.csv")]) == 1
    assert "pass --force to replace it" in capsys.readouterr().err
    assert (tmp_path / "s.csv").read_text() == "an earlier table"
    assert main(["selective", str(tmp_path / "p.npz"), "--folds", "3", "--out", str(tmp_path / "s.csv"),
                 "--force"]) == 0
    assert (tmp_path / "s.csv").read_text().startswith("score,")


def test_the_command_reports_a_bad_file_in_one_line(tmp_path, capsys):
    np.savez(tmp_path / "p.npz", logits=np.zeros((3, 2)), targets=np.array([0.5, 1, 0]))
    assert main(["selective", str(tmp_path / "p.npz")]) == 1
    assert "'targets' must be integer class ids" in capsys.readouterr().err


def test_the_plot_labels_its_axes_and_has_a_legend_entry_per_curve():
    pytest.importorskip("matplotlib")
    from fastai_ls import plot_selective

    z, y = realistic_logits(n=300, seed=15)
    fig = plot_selective(z, y, scores=["msp", "pnorm", "energy"], n_boot=30)
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert ax.get_xlabel() and ax.get_ylabel()
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert [label.split()[0] for label in labels[:3]] == ["msp", "pnorm", "energy"]
        assert "bootstrap band" in labels[3]


def test_the_plot_checks_its_targets_as_the_comparison_does_and_takes_numpy():
    # Regression: out-of-range, ignored (-100) and bool targets were drawn as wrong rows without a word, numpy
    # inputs refused, coverages=0 a ZeroDivisionError.
    pytest.importorskip("matplotlib")
    from fastai_ls import plot_selective

    z, y = realistic_logits(n=60, c=3, seed=22)
    for targets, message in ((y + 3, "outside \\[0, 3\\)"), (torch.where(y == 0, -100, y), "outside"),
                             (y > 0, "integer class ids")):
        with pytest.raises(ValueError, match=message):
            plot_selective(z, targets, scores=["msp"], n_boot=20)
    with pytest.raises(ValueError, match="coverages must be an int >= 1"):
        plot_selective(z, y, scores=["msp"], n_boot=20, coverages=0)
    fig = plot_selective(z.numpy(), y.numpy(), scores=["msp"], n_boot=20)
    assert fig.axes[0].get_legend().get_texts()[0].get_text().startswith("msp")


def test_the_demo_section_prints_both_models_and_writes_one_table(tmp_path, capsys):
    from fastai_ls.cli.selective import selective_section

    z, y = realistic_logits(n=300, seed=16)
    held_out = {"cross-entropy": (z, y), "label smoothing 0.1": (0.5 * z, y)}
    assert selective_section(held_out, tmp_path, folds=3) == ["selective.csv"]
    out = capsys.readouterr().out
    assert out.count("selective classification on the 300 validation images") == 2
    table = __import__("pandas").read_csv(tmp_path / "selective.csv", index_col=[0, 1])
    assert set(table.index.get_level_values(0)) == set(held_out)
    assert len(table) == 2 * (len(SCORE_NAMES) + 1)
    assert selective_section({"tiny": (z[:2], y[:2])}, tmp_path, folds=3) == []
    assert "not compared" in capsys.readouterr().out
