"""Issue 16's renames: each old spelling still works for one release, warns with a FutureWarning naming the new one,
and gives what the new spelling gives."""

from __future__ import annotations

import importlib
import pickle
import warnings

import matplotlib
import pandas as pd
import pytest
import torch
from fastai.data.core import DataLoaders
from fastai.distributed import DistributedDL as FastaiDistributedDL
from fastai.learner import Learner
from torch import nn

import fastai_ls
from fastai_ls import (
    CalibrationCallback,
    LabelSmoothingCrossEntropy,
    fit_calibrator,
    plot_history,
    plot_reliability,
    plot_risk_coverage,
    plot_smooth_reliability,
)
from fastai_ls.calibration.calibrators import TemperatureScaling
from fastai_ls.calibration.compare import compare_on_logits
from fastai_ls.calibration.plots import bin_frame
from fastai_ls.calibration.report import report_frame
from fastai_ls.integration import distributed, fastai_compat, posthoc
from fastai_ls.integration.callback import Phase
from fastai_ls.integration.posthoc import applied_calibrator, holdout_logits

matplotlib.use("Agg")


def learner(cb: CalibrationCallback | None = None) -> Learner:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, 6, generator=g)
    y = (x[:, :4] + torch.randn(160, 4, generator=g)).argmax(1)
    dls = DataLoaders.from_dsets(list(zip(x, y))[:80], list(zip(x, y))[80:], bs=16, num_workers=0, device="cpu")
    torch.manual_seed(0)
    learn = Learner(dls, nn.Linear(6, 4), loss_func=LabelSmoothingCrossEntropy(0.1), cbs=[cb] if cb else [])
    learn.logger = lambda *a: None
    return learn


def warns(match: str):
    return pytest.warns(FutureWarning, match=rf"{match} is deprecated and will be removed in the next release; use")


@pytest.fixture(scope="module")
def fitted() -> tuple[Learner, CalibrationCallback]:
    cb = CalibrationCallback(n_boot=50, seed=3)
    learn = learner(cb)
    with learn.no_bar():
        learn.fit(2, 1e-2)
    return learn, cb


# --- post-hoc: the temperature names -----------------------------------------------------------------------------


def test_fit_temperature_warns_once_and_finds_the_temperature_fit_calibrator_finds(fitted):
    learn, _ = fitted
    with learn.no_bar():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit = fastai_ls.fit_temperature(learn)
        expected = fit_calibrator(learn, "temperature")
    future = [w for w in caught if issubclass(w.category, FutureWarning)]
    assert len(future) == 1 and "use fit_calibrator(learn, 'temperature', dl=dl)" in str(future[0].message)
    assert future[0].filename == __file__  # it points at the caller
    assert fit.temperature == expected.temperature and fit.at_bound == expected.at_bound


def test_temperature_fit_made_directly_warns():
    with warns("TemperatureFit"):
        fit = fastai_ls.TemperatureFit(2.0, 1.0, 0.9, 0.1, 0.05)
    assert fit.temperature == 2.0 and not fit.at_bound


def test_temperature_from_logits_warns_and_is_temperature_scalings_fit(fitted):
    learn, _ = fitted
    with learn.no_bar():
        logits, target = holdout_logits(learn)
    with warns(r"temperature_from_logits\(logits, target\)"):
        t = posthoc.temperature_from_logits(logits, target)
    assert t == TemperatureScaling().fit(logits, target).temperature


def test_apply_and_remove_temperature_warn_and_are_apply_and_remove_calibrator(fitted):
    learn = learner()
    with warns(r"apply_temperature\(learn, t\)"):
        assert fastai_ls.apply_temperature(learn, 2.0) is learn
    assert applied_calibrator(learn).temperature == 2.0
    with warns(r"remove_temperature\(learn\)"):
        fastai_ls.remove_temperature(learn)
    assert applied_calibrator(learn) is None


def test_the_temperature_names_are_found_where_they_were():
    from fastai_ls.integration import temperature

    for name in ("TemperatureFit", "fit_temperature", "temperature_from_logits", "apply_temperature",
                 "remove_temperature"):
        assert getattr(posthoc, name) is getattr(temperature, name)
    old_path = importlib.import_module("fastai_ls.posthoc")  # the module before the layout of issue 16
    with warns(r"fastai_ls\.posthoc\.fit_temperature"):
        assert old_path.fit_temperature is temperature.fit_temperature
    with pytest.raises(AttributeError):
        posthoc.fit_temperatures  # noqa: B018


# --- one compare_calibrators ---------------------------------------------------------------------------------------


def test_the_math_layers_compare_calibrators_warns_and_is_compare_on_logits():
    import fastai_ls.calibration.compare as compare

    with warns(r"fastai_ls\.calibration\.compare\.compare_calibrators"):
        assert compare.compare_calibrators is compare_on_logits
    with warns(r"fastai_ls\.calibration\.compare_calibrators"):
        from fastai_ls.calibration import compare_calibrators
    assert compare_calibrators is compare_on_logits


def test_the_one_top_level_compare_calibrators_takes_logits_or_a_learner(fitted):
    learn, _ = fitted
    assert fastai_ls.compare_calibrators is posthoc.compare_calibrators
    with learn.no_bar():
        logits, target = holdout_logits(learn)
        on_learner = fastai_ls.compare_calibrators(learn, methods=["temperature"], folds=3, ci=None)
    on_logits = fastai_ls.compare_calibrators(logits, target, methods=["temperature"], folds=3, ci=None)
    core = compare_on_logits(logits, target, methods=["temperature"], folds=3, ci=None)
    for table in (on_learner, on_logits):
        pd.testing.assert_frame_equal(table.drop(columns="fit_s"), core.drop(columns="fit_s"))


# --- CalibrationCallback: tables and plots take its states -------------------------------------------------------


def test_the_callbacks_bins_report_and_risk_coverage_warn_and_equal_the_functions_of_its_states(fitted):
    _, cb = fitted
    with warns(r"CalibrationCallback\.bins\(\)"):
        pd.testing.assert_frame_equal(cb.bins(epoch=0), bin_frame(cb.state_of(0)))
    with warns(r"CalibrationCallback\.report\(\)"):
        report = cb.report(ci=0.9)
    pd.testing.assert_frame_equal(report, report_frame(cb.state_of().metrics(ci=0.9, n_boot=50, seed=3), 0.9))
    with warns(r"CalibrationCallback\.risk_coverage\(\)"):
        curve = cb.risk_coverage()
    expected = cb.state_of().risk_coverage()
    assert list(curve.columns) == list(expected)
    for name, values in expected.items():
        assert curve[name].tolist() == values.tolist()


def test_the_callbacks_plots_warn_and_draw_what_the_plot_functions_draw_of_its_states(fitted):
    import matplotlib.pyplot as plt

    _, cb = fitted
    pairs = []
    with warns(r"CalibrationCallback\.plot_reliability\(\)"):
        pairs.append((cb.plot_reliability(epoch=0, title="LS"), plot_reliability(cb.state_of(0), title="LS")))
    with warns(r"CalibrationCallback\.plot_smooth_reliability\(\)"):
        pairs.append((cb.plot_smooth_reliability(), plot_smooth_reliability(cb.state_of(), n_boot=50, seed=3)))
    with warns(r"CalibrationCallback\.plot_risk_coverage\(\)"):
        pairs.append((cb.plot_risk_coverage(), plot_risk_coverage(cb.state_of())))
    with warns(r"CalibrationCallback\.plot_history\(\)"):
        pairs.append((cb.plot_history(), plot_history(cb.history)))
    for old, new in pairs:
        assert [ax.get_title() for ax in old.axes] == [ax.get_title() for ax in new.axes]
    plt.close("all")


def test_the_callbacks_smooth_diagram_without_intervals_draws_without_a_band():
    # Issue 20 (19): with ci=None and n_fine < n_bins the callback's smooth diagram said to pass ci=None.
    import matplotlib.pyplot as plt

    cb = CalibrationCallback(ci=None, n_bins=15, n_fine=10)
    learn = learner(cb)
    with learn.no_bar():
        learn.fit(1, 1e-2)
    with warns(r"CalibrationCallback\.plot_smooth_reliability\(\)"):
        fig = cb.plot_smooth_reliability()
    assert fig.axes[0].get_title().startswith("smECE") and "[" not in fig.axes[0].get_title()
    plt.close("all")


# --- distributed ---------------------------------------------------------------------------------------------------


def test_patch_fastai_for_gloo_warns_and_still_patches_for_the_process(monkeypatch):
    monkeypatch.setattr(FastaiDistributedDL, "_broadcast", FastaiDistributedDL.__dict__["_broadcast"])  # undone after
    with warns(r"patch_fastai_for_gloo\(\)"):
        distributed.patch_fastai_for_gloo()
    assert FastaiDistributedDL._broadcast is fastai_compat._broadcast


def test_a_callback_exported_with_the_flags_of_the_release_before_the_phase_loads_and_records():
    # `learn.export()` pickles the callback's attributes: those of a learner exported before issue 16 are flags.
    cb = CalibrationCallback(ci=None)
    learn = learner(cb)
    with learn.no_bar():
        learn.fit(1, 1e-2)
    learn.logger = print  # picklable, as fastai's default
    for name in ("phase", "_pass"):
        del cb.__dict__[name]
    cb.__dict__.update(_pass=None, _new_fit=False, _in_fit=False, _depth=0, _scored=True, _sharded=False,
                       _eager_intervals=False)
    loaded = pickle.loads(pickle.dumps(cb))
    assert loaded.phase is Phase.IDLE and not {"_new_fit", "_depth", "_scored"} & set(vars(loaded))
    other = learner()
    other.add_cb(loaded)
    with other.no_bar():
        other.fit(2, 1e-2)
        other.validate()
    assert len(loaded.history) == 2 and loaded.state is not loaded.states[-1] and other.calibration is loaded
    assert [m.name for m in other.metrics] == ["ece"] and other.recorder.values[-1][-1] == loaded.history["ece"][1]


def test_from_a_package_import_of_a_renamed_name_warns_once():
    # `from package import name` first asks the package's __getattr__ whether `name` is a submodule: that call
    # warned too, so the statement gave two FutureWarnings.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from fastai_ls.calibration import compare_calibrators
    renamed = [w for w in caught if "compare_calibrators is deprecated" in str(w.message)]
    assert len(renamed) == 1 and renamed[0].category is FutureWarning and renamed[0].filename == __file__
    assert compare_calibrators is compare_on_logits


def test_a_name_the_old_module_never_had_raises_without_a_deprecation_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImportError):
            from fastai_ls.losses import FocalLoss  # noqa: F401 (new in the family; never in fastai_ls.losses)
    assert not [w for w in caught if "deprecated and will be removed" in str(w.message)]
