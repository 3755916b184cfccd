"""The calibration core on input a fastai user or an attacker gives it (regressions from issue 20, one test or more
per reported defect): tabular (N, 1) and unsigned targets, logits given to the streaming state, one tolerance for
rows of probabilities everywhere, concurrent updates, the scale of row weights, impossible counters, and the
memory of intervals on a large fine grid."""

from __future__ import annotations

import math
import threading
import warnings

import numpy as np
import pytest
import torch

from fastai_ls import CalibrationState, calibration_error, calibration_metrics
from fastai_ls.calibration import intervals as intervals_module
from fastai_ls.calibration import metrics as metrics_module
from fastai_ls.calibration.checks import SUM_ROUNDING, SUM_TOLERANCE, checked_probabilities
from fastai_ls.cli.calibrate import read_predictions


def probs_and_target(n: int = 200, n_classes: int = 5, seed: int = 0, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, n_classes, generator=g)).softmax(1), torch.randint(0, n_classes, (n,), generator=g)


def state_of(probs, target, **kwargs) -> CalibrationState:
    state = CalibrationState(probs.shape[1])
    state.update(probs, target, **kwargs)
    return state


# --- item 1: fastai's tabular targets are (bs, 1) ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64])
def test_tabular_targets_of_shape_n_by_1_score_as_their_flat_ids(dtype):
    # Reported: calibration_metrics(*learn.get_preds()) refused the (bs, 1) int8 targets of TabularDataLoaders.
    probs, target = probs_and_target(16, 3)
    column = target[:, None].to(dtype)
    want = calibration_metrics(probs, target)
    assert calibration_metrics(probs, column) == want
    assert calibration_error(probs, column) == want["ece"]
    assert state_of(probs, column).metrics() == want


def test_calibration_metrics_of_a_tabular_learners_get_preds():
    # The reported call: `calibration_metrics(*learn.get_preds())` on fastai's (bs, 1) int8 tabular targets.
    import pandas as pd
    from fastai.data.block import CategoryBlock
    from fastai.tabular.all import TabularDataLoaders, tabular_learner

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"a": rng.normal(size=120), "b": rng.normal(size=120), "y": rng.choice(["x", "y", "z"], 120)})
    dls = TabularDataLoaders.from_df(df, cont_names=["a", "b"], y_names="y", y_block=CategoryBlock(), bs=16,
                                     valid_idx=list(range(100, 120)), num_workers=0)
    learn = tabular_learner(dls, layers=[8])
    with learn.no_bar():
        probs, target = learn.get_preds()
    assert target.shape == (20, 1) and target.dtype == torch.int8
    assert calibration_metrics(probs, target) == calibration_metrics(probs, target[:, 0].long())


@pytest.mark.parametrize("target, match", [
    (torch.eye(3, dtype=torch.long)[torch.tensor([0, 1, 2, 0])], r"one-hot targets\? pass target\.argmax\(1\)"),
    (torch.eye(3)[torch.tensor([0, 1, 2, 0])], r"for one-hot or soft targets pass target\.argmax\(1\)"),
    (torch.tensor([[0, 1, 2, 0]]), r"pass target\.reshape\(-1\)"),
    (torch.tensor([0, 1, 2]), r"shape \(4,\) or \(4, 1\), got torch\.int64 \(3,\): one per row of probs"),
    (torch.tensor([0.0, 1.0, 2.0, 0.0]), r"pass target\.long\(\) if they hold whole numbers"),
])
def test_a_target_of_a_wrong_shape_or_dtype_says_what_to_pass(target, match):
    probs = torch.full((4, 3), 1 / 3)
    with pytest.raises(ValueError, match=match):
        calibration_metrics(probs, target)
    with pytest.raises(ValueError, match=match.replace("probs", "preds")):
        CalibrationState(3).update(probs, target)


# --- item 14: unsigned targets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_unsigned_targets_of_every_width_are_class_ids(dtype):
    # Reported: NotImplementedError: "lt_cpu" not implemented for 'UInt16' (also UInt32, UInt64).
    probs, target = probs_and_target()
    want = calibration_metrics(probs, target)
    assert calibration_metrics(probs, target.to(dtype)) == want
    assert calibration_error(probs, target.to(dtype), norm="max") == calibration_error(probs, target, norm="max")
    assert state_of(probs, target.to(dtype)).metrics() == want
    out_of_range = target.clone()
    out_of_range[3] = 7
    with pytest.raises(ValueError, match=r"1 targets are not class ids in \[0, 5\) \(e\.g\. 7\)"):
        calibration_metrics(probs, out_of_range.to(dtype))


# --- item 13: the streaming state refuses logits as the functions do -----------------------------------------------


def test_the_state_refuses_logits_with_the_check_of_calibration_metrics():
    # Reported: CalibrationState.update(3 * torch.randn(50, 4), y) was counted, ECE 2.725.
    g = torch.Generator().manual_seed(0)
    logits, target = 3 * torch.randn(50, 4, generator=g), torch.randint(0, 4, (50,), generator=g)
    with pytest.raises(ValueError, match="must hold probabilities") as functional:
        calibration_metrics(logits, target)
    state = CalibrationState(4)
    with pytest.raises(ValueError, match=r"must hold probabilities.*softmax") as streamed:
        state.update(logits, target)
    # One check: the same message but for the argument's name.
    assert str(streamed.value).split(" ", 1)[1].split(";")[0] == str(functional.value).split(" ", 1)[1].split(";")[0]
    assert float(state.data.abs().sum()) == 0  # nothing was counted
    state.update(logits, target, activation=lambda z: z.softmax(1))  # the activation's output is what is checked
    with pytest.raises(ValueError, match=r"activation\(preds\) must hold probabilities"):
        state.update(logits, target, activation=lambda z: z.exp())


# --- items 20 and 24: one tolerance for rows of probabilities ------------------------------------------------------


def bfloat16_softmax(n: int = 400, n_classes: int = 10, seed: int = 0):
    """Real bfloat16 softmax outputs, stored as float32 (as a user saves them): rows miss 1 by up to about 3e-3."""
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, n_classes, generator=g)
    return logits.bfloat16().softmax(1).float(), torch.randint(0, n_classes, (n,), generator=g)


def torchmetrics_style_rows(n: int = 300, n_classes: int = 5, seed: int = 0):
    """Rows whose sums spread over 0.99 to 1.01, as in torchmetrics' own multiclass test inputs."""
    probs, target = probs_and_target(n, n_classes, seed)
    g = torch.Generator().manual_seed(seed + 1)
    return probs * (0.99 + 0.02 * torch.rand(n, 1, generator=g)), target


@pytest.mark.parametrize("rows", [bfloat16_softmax, torchmetrics_style_rows])
def test_rows_within_the_tolerance_are_renormalised_with_one_warning_that_says_by_how_much(rows):
    # Reported: refused by the command (tolerance 1e-3) and by the functions (1e-3 for float32).
    probs, target = rows()
    miss = float((probs.double().sum(1) - 1).abs().max())
    assert SUM_ROUNDING < miss <= SUM_TOLERANCE
    renormalised = probs.double() / probs.double().sum(1, keepdim=True)
    want = calibration_metrics(renormalised, target)
    before = probs.clone()
    for score in (lambda: calibration_metrics(probs, target), lambda: state_of(probs, target).metrics()):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = score()
        assert len(caught) == 1 and f"miss a sum of 1 by up to {miss:.2g}" in str(caught[0].message)
        assert caught[0].filename == __file__  # the warning points at the caller's line
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert torch.equal(probs, before)  # the caller's tensor is not changed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_softmax_outputs_within_rounding_are_taken_as_they_are_without_a_warning(dtype):
    probs, target = probs_and_target(300, 1000)
    probs = probs.to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert checked_probabilities(probs) is probs
        calibration_metrics(probs, target)


def test_rows_beyond_the_tolerance_are_refused_by_the_functions_the_state_and_the_command(tmp_path):
    probs, target = probs_and_target(10, 3)
    off = probs.clone()
    off[4] *= 1 + 1.5 * SUM_TOLERANCE
    for score in (lambda: calibration_metrics(off, target), lambda: calibration_error(off, target),
                  lambda: CalibrationState(3).update(off, target)):
        with pytest.raises(ValueError, match=r"rows summing to 1 within 0\.02, but 1 of 10 rows do not \(first: row 4"):
            score()
    np.savez(tmp_path / "p.npz", probabilities=off.numpy(), targets=target.numpy())
    with pytest.raises(ValueError, match=r"p\.npz: 'probabilities' must hold probabilities, rows summing to 1 within "
                                         r"0\.02, but 1 of 10 rows do not \(first: row 4"):
        read_predictions(tmp_path / "p.npz")


def test_the_command_reads_bfloat16_softmax_outputs_with_the_same_tolerance_and_warning(tmp_path):
    # Reported: `fastai-ls calibrate` refused rows summing to 1 +- 0.0026 that calibration_metrics accepted.
    probs, target = bfloat16_softmax()
    np.savez(tmp_path / "p.npz", probabilities=probs.numpy(), targets=target.numpy())
    with pytest.warns(UserWarning, match=r"p\.npz: 'probabilities': \d+ of 400 rows miss a sum of 1 by") as caught:
        read = read_predictions(tmp_path / "p.npz")
    assert len(caught) == 1
    np.testing.assert_allclose(np.exp(read.logits).sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(np.exp(read.logits), probs / probs.sum(1, keepdim=True), rtol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 1e5, 1e39])
def test_float128_logits_are_read_in_float64(tmp_path, scale):
    # Reported: float128 logits got "NaN or +inf": they were cast to float32, where 1e39 overflows.
    rng = np.random.default_rng(0)
    logits = (scale * rng.standard_normal((50, 3))).astype(np.longdouble)
    np.savez(tmp_path / "p.npz", logits=logits, targets=rng.integers(0, 3, 50))
    read = read_predictions(tmp_path / "p.npz")
    assert read.logits.dtype == np.float64
    np.testing.assert_array_equal(read.logits, logits.astype(np.float64))


@pytest.mark.skipif(np.finfo(np.longdouble).max <= np.finfo(np.float64).max, reason="longdouble is float64 here")
def test_float128_logits_beyond_float64_are_named_as_such(tmp_path):
    logits = np.zeros((4, 3), dtype=np.longdouble)
    logits[2, 1] = np.longdouble("1e400")
    np.savez(tmp_path / "p.npz", logits=logits, targets=np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"values beyond float64's range in 1 of 4 rows \(first: row 2\); save them as "
                                         "float64"):
        read_predictions(tmp_path / "p.npz")


# --- item 12: concurrent updates -----------------------------------------------------------------------------------


def test_updates_from_several_threads_lose_no_counts():
    # Reported: 4 threads of 40 updates of 20,000 rows gave n 3,200,000, bins 3,192,497 and class bins 3,172,624.
    # A lost update needs two threads inside one in-place addition at once, which does not happen every time:
    # several rounds make it all but certain without the lock.
    probs, target = probs_and_target(5000, 10)
    threads, updates = 4, 10
    def work(state: CalibrationState, start: threading.Barrier) -> None:
        start.wait()
        for _ in range(updates):
            state.update(probs, target)

    for _ in range(8):
        state, start = CalibrationState(10), threading.Barrier(threads)
        running = [threading.Thread(target=work, args=(state, start)) for _ in range(threads)]
        for thread in running:
            thread.start()
        for thread in running:
            thread.join()
        n = threads * updates * 5000
        counted = [float(state.scalar("n")), float(state.bins[:, 0].sum()), float(state.fine[:, 0].sum()),
                   *state.class_bins[..., 0].sum(1).tolist()]
        assert counted == [n] * (3 + 10)


def test_a_state_with_its_lock_pickles_and_copies():
    import copy
    import pickle

    state = state_of(*probs_and_target())
    for twin in (pickle.loads(pickle.dumps(state)), copy.deepcopy(state)):
        assert torch.equal(twin.data, state.data)
        twin.update(*probs_and_target(seed=1))  # with a lock of its own
        assert float(twin.scalar("n")) == 400 and float(state.scalar("n")) == 200


# --- item 21: the scale of row weights, and counters no predictions give -------------------------------------------


@pytest.mark.parametrize("scale", [1e-6, 1e6, 1e19])
def test_scaling_every_row_weight_changes_neither_the_estimates_nor_the_intervals(scale):
    # Reported: intervals NaN at x1e-6, of zero width at x1e6, OverflowError at x1e19.
    probs, target = probs_and_target(400, 5)
    weight = torch.rand(400, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    unit, scaled = state_of(probs, target, weight=weight), state_of(probs, target, weight=weight * scale)
    want, got = unit.metrics(ci=0.9, n_boot=200), scaled.metrics(ci=0.9, n_boot=200)
    want.pop("n"), got.pop("n")
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    table, scaled_table = unit.bin_table(), scaled.bin_table()
    for name in ("accuracy_lo", "accuracy_hi"):
        torch.testing.assert_close(scaled_table[name], table[name], equal_nan=True)


def test_zero_one_weights_give_the_intervals_of_the_kept_rows():
    # The effective number of rows of 0/1 weights (the callback's padding weights) is the number of rows kept.
    probs, target = probs_and_target(300, 4)
    keep = torch.arange(300) % 4 != 0
    weighted = state_of(probs, target, weight=keep.double())
    kept = state_of(probs[keep], target[keep])
    assert weighted.metrics(ci=0.9, n_boot=200) == pytest.approx(kept.metrics(ci=0.9, n_boot=200), rel=1e-12)


@pytest.mark.parametrize("where, value, match", [
    ("bins", math.nan, "1 of them are NaN or infinite"),
    ("bins", 1e300, r"the bins hold 1e\+300 rows where n is 200"),
    ("scalars", 1e300, r"the bins hold 200 rows where n is 1e\+300"),
    ("fine", math.inf, "1 of them are NaN or infinite"),
    ("class_bins", 1e300, r"the class bins hold 1e\+300 rows where n is 200"),
])
def test_counters_that_no_predictions_give_are_a_clear_error(where, value, match):
    # Reported: NaN in a state's data gave "cannot convert float NaN to integer", 1e300 an ECE of 5e297.
    state = state_of(*probs_and_target())
    data = state.data.clone()
    data[state._slices[where].start] = value
    spoiled = CalibrationState(5, data=data)
    for read in (spoiled.metrics, lambda: spoiled.metrics(ci=0.9, n_boot=20), spoiled.bin_table, spoiled.ece):
        with pytest.raises(ValueError, match=f"counters cannot come from any predictions: {match}"):
            read()


def test_weights_whose_squares_overflow_are_a_clear_error():
    probs, target = probs_and_target()
    state = state_of(probs, target, weight=torch.full((200,), 1e160, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN or infinite .*row weights above about 1e150 overflow when squared"):
        state.metrics()


# --- item 17: interval memory on a large fine grid -----------------------------------------------------------------


def test_intervals_on_a_large_fine_grid_are_computed_a_bounded_number_of_cells_at_a_time(monkeypatch):
    # Reported: 200,000 fine cells took 8.3 GB for one metrics(ci=0.95): 1000 replicates of the whole grid at once.
    n_fine = 20_000
    probs, target = probs_and_target(3000, 4, scale=1.0)
    state = CalibrationState(4, n_fine=n_fine, classwise=False)
    state.update(probs, target)
    held = []
    real = metrics_module.top_label_metrics

    def recorded(bins, fine, cells=None, n_cells=None):
        held.append(bins.shape[0] * (n_cells or fine.shape[-2]))  # replicates times the cells they span
        return real(bins, fine, cells, n_cells)

    monkeypatch.setattr(intervals_module, "top_label_metrics", recorded)
    chunked = state.metrics(ci=0.9, n_boot=200, seed=1)
    assert len(held) > 1 and max(held) <= intervals_module.CHUNK_CELLS
    monkeypatch.setattr(intervals_module, "CHUNK_CELLS", 10**12)  # all at once: the same draws, the same intervals
    at_once = state.metrics(ci=0.9, n_boot=200, seed=1)
    assert held[-1] == 200 * n_fine
    assert chunked == pytest.approx(at_once, rel=1e-12, nan_ok=True)
