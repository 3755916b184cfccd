"""CalibrationCallback's metrics with their uncertainty: interval columns in the history (computed when read, not in
the training loop), interval and new metrics as progress-table columns, the report, the risk-coverage curve and the
new plots of the recorded states."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from torch import nn

from fastai_ls import (
    CalibrationCallback,
    LabelSmoothingCrossEntropy,
    plot_history,
    plot_risk_coverage,
    plot_smooth_reliability,
)
from fastai_ls.calibration import intervals as intervals_module
from fastai_ls.calibration.report import REPORT_COLUMNS, format_interval, report_frame
from fastai_ls.calibration.state import INTERVAL_COLUMNS, INTERVAL_NAMES, METRIC_NAMES
from fastai_ls.integration.columns import HISTORY_COLUMNS

matplotlib.use("Agg")
N_CLASSES, N_VALID = 4, 90


def items(n: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, :N_CLASSES] + torch.randn(n, N_CLASSES, generator=g)).argmax(1)
    return list(zip(x, y))


def fitted(cb: CalibrationCallback, epochs: int = 2, **kwargs) -> Learner:
    torch.manual_seed(0)
    dls = DataLoaders.from_dsets(items(160, 1), items(N_VALID, 2), bs=32, num_workers=0, device="cpu")
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, N_CLASSES))
    learn = Learner(dls, model, loss_func=LabelSmoothingCrossEntropy(0.1), cbs=cb, **kwargs)
    learn.logger = lambda *a, **k: None  # noqa: E731
    with learn.no_bar():
        learn.fit(epochs, 1e-2)
    return learn


@pytest.fixture
def bootstraps(monkeypatch):
    """Counts the bootstraps run (every bootstrap draws its replicates through `_replicate_chunks`)."""
    calls = []
    real = intervals_module._replicate_chunks

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(intervals_module, "_replicate_chunks", counted)
    return calls


def test_history_has_interval_columns_computed_when_first_read_and_only_once(bootstraps):
    cb = CalibrationCallback(n_boot=200)
    fitted(cb, epochs=3)
    assert not bootstraps  # nothing in the training loop
    history = cb.history
    assert tuple(history.columns) == HISTORY_COLUMNS and len(bootstraps) == 3
    pd.testing.assert_frame_equal(cb.history, history)
    assert len(bootstraps) == 3  # cached
    for epoch, state in enumerate(cb.states):
        want = state.metrics(ci=0.95, n_boot=200, seed=0)
        row = history.iloc[epoch]
        for column in METRIC_NAMES + INTERVAL_COLUMNS:
            assert row[column] == pytest.approx(want[column], nan_ok=True), column
    assert (history["ece_lo"] <= history["ece"]).all() and (history["ece"] <= history["ece_hi"]).all()


def test_without_ci_the_interval_columns_are_nan_and_no_bootstrap_runs(bootstraps):
    cb = CalibrationCallback(ci=None)
    fitted(cb)
    assert tuple(cb.history.columns) == HISTORY_COLUMNS
    assert cb.history[list(INTERVAL_COLUMNS)].isna().all().all() and not bootstraps
    assert cb.history[["smece", "ks_error", "ece_debiased", "augrc", "nll_se"]].notna().all().all()


def test_new_metrics_and_interval_limits_can_be_progress_table_columns(bootstraps):
    columns = ("smece", "smece_lo", "smece_hi", "ece_debiased", "augrc")
    cb = CalibrationCallback(metrics=columns, n_boot=100)
    learn = fitted(cb)
    assert len(bootstraps) == 2  # one per epoch, at the epoch's end
    names = list(learn.recorder.metric_names)
    recorded = np.array([[row[names.index(c) - 1] for c in columns] for row in learn.recorder.values])
    np.testing.assert_allclose(recorded, cb.history[list(columns)].to_numpy())
    assert len(bootstraps) == 2  # the history reuses them


@pytest.mark.parametrize("kwargs,match", [({"metrics": ("ece_lo",), "ci": None}, "confidence level"),
                                          ({"metrics": ("classwise_ece_lo",)}, "unknown"),
                                          ({"ci": 1.5}, "ci must"), ({"n_boot": 0}, "n_boot")])
def test_bad_interval_settings_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CalibrationCallback(**kwargs)


def test_report_is_one_tidy_row_per_metric_with_estimate_lower_and_upper():
    cb = CalibrationCallback(n_boot=200)
    fitted(cb)
    report = report_frame(cb.state_of().metrics(ci=0.95, n_boot=200, seed=cb.seed), 0.95)
    assert tuple(report.columns) == REPORT_COLUMNS and report.index.name == "metric"
    assert list(report.index) == [m for m in METRIC_NAMES if not m.endswith("_se")]
    last = cb.history.iloc[-1]
    for metric in INTERVAL_NAMES:
        assert report.loc[metric, "estimate"] == pytest.approx(last[metric])
        assert (report.loc[metric, "lower"], report.loc[metric, "upper"]) == pytest.approx(
            (last[f"{metric}_lo"], last[f"{metric}_hi"]))
    assert report.loc["ece", "interval"] == "95% percentile bootstrap" and report.loc["nll", "interval"] == \
        "95% normal"
    assert math.isnan(report.loc["classwise_ece", "lower"]) and report.loc["classwise_ece", "interval"] == ""
    assert report_frame(cb.state_of(0).metrics(ci=0.5, n_boot=200), 0.5).loc["ece", "interval"] == \
        "50% percentile bootstrap"
    text = format_interval(*report.loc["ece", ["estimate", "lower", "upper"]])
    assert text == f"{last['ece']:.4f} [{last['ece_lo']:.4f}, {last['ece_hi']:.4f}]"


def test_risk_coverage_is_a_frame_of_the_rows_above_each_threshold():
    cb = CalibrationCallback(ci=None)
    learn = fitted(cb)
    curve = pd.DataFrame({k: v.numpy() for k, v in cb.state_of().risk_coverage().items()})
    assert list(curve.columns) == ["threshold", "coverage", "risk", "generalized_risk"]
    probs, target = learn.get_preds()
    conf, error = probs.max(1).values.double(), (probs.argmax(1) != target).double()
    for row in curve.itertuples():
        accepted = conf > row.threshold
        assert row.coverage == pytest.approx(float(accepted.double().mean()))
        assert row.risk == pytest.approx(float(error[accepted].mean()))
        assert row.generalized_risk == pytest.approx(float(error[accepted].sum() / len(error)))
    assert curve["coverage"].iloc[-1] == pytest.approx(1.0) and len(cb.state_of(0).risk_coverage()["coverage"]) >= 1


def test_the_new_plots_draw_from_the_callback():
    import matplotlib.pyplot as plt

    cb = CalibrationCallback(n_boot=100)
    fitted(cb)
    figures = [plot_smooth_reliability(cb.state_of(), n_boot=cb.n_boot), plot_risk_coverage(cb.state_of(0)),
               plot_history(cb.history)]
    assert all(isinstance(f, matplotlib.figure.Figure) for f in figures)
    # The history plot shades the intervals of the history.
    band = figures[2].axes[0].collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(cb.history["ece_lo"].min()) and band.max() == pytest.approx(
        cb.history["ece_hi"].max())
    plt.close("all")
