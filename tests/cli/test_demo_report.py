"""The demo's report in pieces: each model's metrics with intervals, the per-image scores behind the paired
differences of the two models, and those differences (against scipy's standard error of a mean)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from scipy import stats

from fastai_ls.calibration import CalibrationState, calibration_metrics
from fastai_ls.calibration.best_calibrator import Calibrated, paired_differences, paired_scores
from fastai_ls.cli.demo import METRICS, model_report


def outputs(n: int = 500, sharpen: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    true_logits = 2 * torch.randn(n, 5, generator=g)
    target = torch.multinomial(true_logits.softmax(1), 1, generator=g).squeeze(1)
    return (sharpen * true_logits).softmax(1), target


def test_paired_scores_average_to_the_states_error_nll_and_brier():
    probs, target = outputs()
    probs[0] = torch.tensor([1.0, 0, 0, 0, 0])
    target[0] = 1  # a target probability of 0: the NLL term is capped, as in the state
    scores = paired_scores(probs, target)
    metrics = calibration_metrics(probs, target)
    assert float(scores["error_rate"].mean()) == pytest.approx(1 - metrics["accuracy"], abs=1e-12)
    assert float(scores["nll"].mean()) == pytest.approx(metrics["nll"], rel=1e-6)  # the state logs in float32
    assert float(scores["brier"].mean()) == pytest.approx(metrics["brier"], rel=1e-6)
    assert float(scores["nll"][0]) == pytest.approx(-math.log(torch.finfo(torch.float32).tiny))


def calibrated(before, after, target) -> Calibrated:
    return Calibrated(pd.DataFrame(), "temperature", CalibrationState(5), 1.0, [], before, after, target)


def test_paired_differences_are_mean_differences_with_normal_intervals_from_their_standard_error():
    sharp, target = outputs(sharpen=3.0)
    soft, _ = outputs(sharpen=0.5)
    true, _ = outputs(sharpen=1.0)
    table = paired_differences(calibrated(sharp, true, target), calibrated(soft, true.clone(), target))
    assert table.index.tolist() == [(s, m) for s in ("before", "after") for m in ("error_rate", "nll", "brier")]
    for metric in ("error_rate", "nll", "brier"):
        d = (paired_scores(soft, target)[metric] - paired_scores(sharp, target)[metric]).numpy()
        estimate, lower, upper = table.loc[("before", metric)]
        half = stats.norm.ppf(0.975) * stats.sem(d)
        assert estimate == pytest.approx(d.mean(), rel=1e-9)
        assert (lower, upper) == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-9)
        # the same probabilities after calibration: no difference at all
        assert tuple(table.loc[("after", metric)]) == (0.0, 0.0, 0.0)
    # pairing: the interval of the difference is narrower than the two models' own intervals would suggest
    ce, ls = (calibration_metrics(p, target, ci=0.95, n_boot=100) for p in (sharp, soft))
    assert table.loc[("before", "nll"), "upper"] - table.loc[("before", "nll"), "lower"] < (
        ce["nll_hi"] - ce["nll_lo"] + ls["nll_hi"] - ls["nll_lo"])
    with pytest.raises(ValueError, match="not scored on the same rows"):
        paired_differences(calibrated(sharp, sharp, target), calibrated(soft, soft, target.flip(0)))


def test_a_models_report_has_every_metric_with_its_interval_and_the_error_rate_turned_round():
    probs, target = outputs(400, sharpen=2.0)
    state = CalibrationState(5)
    state.update(probs, target)
    report = model_report(state, seed=3)
    assert report.index.tolist() == list(METRICS) and report.columns.tolist() == ["estimate", "lower", "upper"]
    metrics = state.metrics(ci=0.95, seed=3)
    assert report.loc["error_rate"].tolist() == pytest.approx(
        [1 - metrics["accuracy"], 1 - metrics["accuracy_hi"], 1 - metrics["accuracy_lo"]])
    for name in ("ece", "smece", "nll", "aurc"):
        assert report.loc[name].tolist() == pytest.approx([metrics[name], metrics[f"{name}_lo"],
                                                           metrics[f"{name}_hi"]])
    assert math.isnan(report.loc["classwise_ece", "lower"]) and not math.isnan(report.loc["classwise_ece",
                                                                                          "estimate"])


def old_per_row_scores(probs, target):
    """The demo's per-row scores as `fastai_ls.cli.demo.per_row_scores` computed them before they moved."""
    p = probs.double()
    p_y = p.gather(1, target[:, None]).squeeze(1)
    return {"error_rate": (p.argmax(1) != target).double(),
            "nll": -p_y.clamp_min(float(torch.finfo(torch.float32).tiny)).log(),
            "brier": (p * p).sum(1) - 2 * p_y + 1}


def test_paired_scores_give_the_demos_per_row_scores_bit_for_bit():
    probs, target = outputs()
    probs[0], target[0] = torch.tensor([1.0, 0, 0, 0, 0]), 2
    new, old = paired_scores(probs, target), old_per_row_scores(probs, target)
    assert list(new) == list(old) and all(torch.equal(new[k], old[k]) for k in old)


def test_the_old_spelling_still_works_with_a_future_warning_naming_the_new_one():
    import fastai_ls.cli.demo

    with pytest.warns(FutureWarning, match="cli.demo.per_row_scores is deprecated.*best_calibrator.paired_scores"):
        assert fastai_ls.cli.demo.per_row_scores is paired_scores
    with pytest.raises(AttributeError):
        fastai_ls.cli.demo.no_such_name  # noqa: B018
