"""Per-row scores (`fastai_ls.calibration.scores`): the one home of each row's confidence, correctness, NLL (with
its floor) and Brier score, of the error rate's interval turned round from the accuracy's, and of paired
differences; the state, the calibrators' comparison and the command all use it (regressions: each was written two
or three times, and the copies must keep giving the numbers they gave)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from scipy import stats

from fastai_ls.calibration import CalibrationState
from fastai_ls.calibration.calibrators import CalibrationWarning
from fastai_ls.calibration.calibrators.base import calibration_messages
from fastai_ls.calibration.compare import compare_on_logits
from fastai_ls.calibration.scores import (
    NLL_FLOOR,
    ROW_SCORES,
    paired_difference,
    row_scores,
    target_nll,
    with_error_rate,
)


def outputs(n=300, n_classes=5, sharpen=2.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, n_classes, generator=g)
    target = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
    return (sharpen * logits).softmax(1).to(dtype), target


def old_state_terms(p, y):
    """The state's per-row terms as `CalibrationState.update` wrote them before they moved to `row_scores`."""
    conf, hit = p.amax(1), p.argmax(1) == y
    p_y = p.gather(1, y[:, None]).squeeze(1)
    nll = -p_y.clamp_min(float(torch.finfo(torch.float32).tiny)).log()
    brier = (p * p).sum(1) - 2 * p_y + 1
    return torch.stack([conf, hit.to(conf.dtype), nll, brier], 1).to(torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_scores_are_the_terms_the_state_sums_bit_for_bit(dtype):
    probs, target = outputs(dtype=dtype)
    probs[0], target[0] = torch.tensor([1.0, 0, 0, 0, 0], dtype=dtype), 3  # target probability 0: the floor
    scores = row_scores(probs, target)
    assert list(scores) == list(ROW_SCORES) and all(v.dtype == dtype for v in scores.values())
    new = torch.stack(list(scores.values()), 1).to(torch.float64)
    assert torch.equal(new, old_state_terms(probs, target))
    state = CalibrationState(5)
    state.update(probs, target)
    sums = {name: float(state.scalar(name)) for name in ("confidence", "correct", "nll", "brier")}
    for name, column in zip(ROW_SCORES, new.T):
        assert sums[name] == pytest.approx(float(column.sum()), rel=1e-12)


def test_the_nll_of_a_target_probability_of_0_is_capped_at_the_same_87_nats_in_every_dtype():
    for dtype in (torch.float32, torch.float64):
        nll = target_nll(torch.tensor([0.0, 1e-300, 0.5], dtype=dtype))
        assert nll[:2].tolist() == pytest.approx([-math.log(NLL_FLOOR)] * 2, rel=1e-6)
        assert float(nll[2]) == pytest.approx(math.log(2))
    assert NLL_FLOOR == torch.finfo(torch.float32).tiny
    assert -math.log(NLL_FLOOR) == pytest.approx(87.3365, abs=1e-4)


def test_the_error_rate_interval_is_the_accuracy_interval_turned_round_and_the_input_is_not_changed():
    metrics = {"accuracy": 0.8, "accuracy_lo": 0.7, "accuracy_hi": 0.85, "ece": 0.1}
    out = with_error_rate(metrics)
    assert (out["error_rate"], out["error_rate_lo"], out["error_rate_hi"]) == pytest.approx((0.2, 0.15, 0.3))
    assert out["ece"] == 0.1 and "error_rate" not in metrics
    assert set(with_error_rate({"accuracy": 0.8})) == {"accuracy", "error_rate"}  # no interval, none made up


def test_the_comparison_tables_error_rate_interval_is_still_the_accuracys_turned_round():
    probs, target = outputs(n=400)
    logits = probs.log()
    table = compare_on_logits(logits, target, methods=["temperature"], folds=4, seed=3)
    state = CalibrationState(5)
    state.update(logits.softmax(1), target)
    m = state.metrics(ci=0.95, seed=3)
    row = table.loc["uncalibrated"]
    assert (row["error_rate"], row["error_rate_lo"], row["error_rate_hi"]) == pytest.approx(
        (1 - m["accuracy"], 1 - m["accuracy_hi"], 1 - m["accuracy_lo"]), abs=1e-12)


def test_a_paired_difference_is_the_mean_difference_with_the_normal_interval_of_scipys_standard_error():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(200, generator=g, dtype=torch.float64)
    b = a + 0.05 + 0.1 * torch.randn(200, generator=g, dtype=torch.float64)
    estimate, lower, upper = paired_difference(a, b, ci=0.9)
    d = (b - a).numpy()
    half = stats.norm.ppf(0.95) * stats.sem(d)
    assert (estimate, lower, upper) == pytest.approx((d.mean(), d.mean() - half, d.mean() + half), rel=1e-12)
    assert all(math.isnan(v) for v in paired_difference(a[:1], b[:1])[1:])
    with pytest.raises(ValueError, match="paired scores must be two"):
        paired_difference(a, b[:10])


def test_recorded_calibration_warnings_are_returned_and_every_other_warning_is_issued_again():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("T at its bound", CalibrationWarning, stacklevel=1)
        warnings.warn("something else", RuntimeWarning, stacklevel=1)
        warnings.warn("class 3 missing", CalibrationWarning, stacklevel=1)
    with pytest.warns(RuntimeWarning, match="something else") as again:
        assert calibration_messages(caught) == ["T at its bound", "class 3 missing"]
    assert [w.category for w in again] == [RuntimeWarning]
