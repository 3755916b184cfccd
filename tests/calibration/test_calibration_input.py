"""The functional API and `CalibrationState.update` on the input a new user gives them (regressions from issue 9:
each test reproduces the reported example)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from oracles import multiclass_calibration_error

from fastai_ls import CalibrationState, calibration_error, calibration_metrics
from fastai_ls.calibration.checks import SUM_TOLERANCE
from fastai_ls.calibration.state import CLASSWISE_MAX_CLASSES


def probs_and_target(n: int = 50, n_classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(n, n_classes, generator=g)).softmax(1), torch.randint(0, n_classes, (n,), generator=g)


@pytest.mark.parametrize("function", [calibration_error, calibration_metrics])
def test_logits_are_refused_with_a_message_naming_the_problem(function):
    # Reported: an "ECE" of 2.72 for 3 * randn(50, 4).
    logits = 3 * torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"must hold probabilities.*softmax"):
        function(logits, torch.randint(0, 4, (50,)))


@pytest.mark.parametrize("bad", ["do not sum to 1", "negative", "above one"])
def test_rows_that_are_not_probability_distributions_are_refused(bad):
    probs, target = probs_and_target()
    probs = {"do not sum to 1": probs * 0.5, "negative": probs + torch.tensor([0.2, -0.2, 0, 0]),
             "above one": probs + torch.tensor([1.0, -1.0, 0, 0])}[bad]
    with pytest.raises(ValueError, match="must hold probabilities"):
        calibration_metrics(probs, target)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_softmax_output_passes_the_check_in_every_float_dtype(dtype):
    probs, target = probs_and_target(200, 10)
    assert calibration_metrics(probs.to(dtype), target)["n"] == 200


def test_nan_rows_are_left_out_with_a_warning_and_counted_as_the_callback_does():
    probs, target = probs_and_target()
    spoiled = probs.clone()
    spoiled[[3, 7]] = math.nan
    with pytest.warns(UserWarning, match="2 of 50 predictions were not finite"):
        metrics = calibration_metrics(spoiled, target)
    kept = torch.ones(50, dtype=torch.bool)
    kept[[3, 7]] = False
    assert metrics["n"] == 48 and metrics["n_invalid"] == 2
    assert metrics["ece"] == pytest.approx(calibration_metrics(probs[kept], target[kept])["ece"])
    with pytest.warns(UserWarning, match="not finite"):
        assert calibration_error(spoiled, target) == pytest.approx(metrics["ece"])


@pytest.mark.parametrize("function", [calibration_error, calibration_metrics])
def test_targets_out_of_range_are_an_error_as_in_the_callback(function):
    probs, target = probs_and_target()
    bad = target.clone()
    bad[[0, 9]] = torch.tensor([4, -1])
    with pytest.raises(ValueError, match=r"2 targets are not class ids in \[0, 4\)"):
        function(probs, bad)


def test_ignore_index_rows_are_skipped_not_refused():
    probs, target = probs_and_target()
    marked = target.clone()
    marked[:5] = -100
    metrics = calibration_metrics(probs, marked, ignore_index=-100)
    assert metrics["n"] == 45
    assert metrics["ece"] == pytest.approx(calibration_metrics(probs[5:], target[5:])["ece"])


@pytest.mark.parametrize("shape", [(50,), ()])
@pytest.mark.parametrize("function", [calibration_error, calibration_metrics])
def test_one_and_zero_dimensional_probabilities_get_a_clear_error(shape, function):
    # Reported: IndexError: tuple index out of range.
    with pytest.raises(ValueError, match=r"must be \(N, C\) class probabilities"):
        function(torch.rand(shape), torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8, torch.int32, torch.int64])
def test_every_integer_target_dtype_is_accepted(dtype):
    # Reported: gather's error for int8/int16/uint8 targets.
    probs, target = probs_and_target()
    want = calibration_metrics(probs, target)
    assert calibration_metrics(probs, target.to(dtype)) == want
    state = CalibrationState(4)
    state.update(probs, target.to(dtype))
    assert state.metrics() == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.complex64])
def test_non_integer_targets_are_refused(dtype):
    probs, target = probs_and_target()
    with pytest.raises(ValueError, match="integer class ids"):
        calibration_metrics(probs, target.to(dtype))


@pytest.mark.parametrize("weight,match", [(-torch.ones(50), "non-negative: 50 of 50"),
                                          (torch.full((50,), math.nan), "finite: 50 of 50"),
                                          (torch.ones(49), "50 row weights")])
def test_bad_row_weights_are_an_error_at_the_call(weight, match):
    # Reported: negative weights gave n = -50, NaN weights failed later in metrics().
    probs, target = probs_and_target()
    state = CalibrationState(4)
    with pytest.raises(ValueError, match=match):
        state.update(probs, target, weight=weight)
    assert float(state.scalar("n")) == 0  # nothing was counted


def test_classwise_counters_follow_the_callbacks_class_limit():
    # Reported: 3 * C * n_bins counters whatever C (2 rows over 10 million classes: 7 GB).
    wide = torch.zeros(2, CLASSWISE_MAX_CLASSES + 1)
    wide[:, 0] = 1.0
    metrics = calibration_metrics(wide, torch.tensor([0, 1]))
    assert math.isnan(metrics["classwise_ece"]) and metrics["accuracy"] == 0.5
    narrow, target = probs_and_target(n_classes=CLASSWISE_MAX_CLASSES)
    assert not math.isnan(calibration_metrics(narrow, target)["classwise_ece"])
    assert not math.isnan(calibration_metrics(wide, torch.tensor([0, 1]), classwise=True)["classwise_ece"])


def test_predictions_that_require_grad_never_pull_the_counters_into_the_graph():
    # Reported (torchmetrics' differentiability test, ported): state.data.requires_grad became True and 20 updates
    # of 1024 x 1000 predictions held 614 MiB: each update's graph, chained through the counters.
    layer = torch.nn.Linear(8, 100)
    state = CalibrationState(100)
    for _ in range(20):
        state.update(layer(torch.randn(64, 8)).softmax(1), torch.randint(0, 100, (64,)),
                     weight=torch.ones(64, requires_grad=True))
        assert not state.data.requires_grad and state.data.grad_fn is None
    state.update(layer(torch.randn(4, 8)), torch.zeros(4, dtype=torch.long), activation=lambda z: z.softmax(1))
    assert not state.data.requires_grad and state.data.grad_fn is None
    assert float(state.scalar("n")) == 20 * 64 + 4


def test_a_confidence_of_exactly_one_goes_to_the_last_bin_where_torchmetrics_makes_a_bin_of_its_own():
    # 5 rows at confidence 1.0 (one wrong) beside 15 rows at 0.95 (all right): torchmetrics' extra bin for 1.0 has
    # a gap of 0.2 and sets its MCE; our last bin (14/15, 1] averages both groups.
    probs = torch.tensor([[1.0, 0.0]] * 5 + [[0.95, 0.05]] * 15)
    target = torch.tensor([0, 0, 0, 0, 1] + [0] * 15)
    ours = calibration_error(probs, target, norm="max")
    theirs = float(multiclass_calibration_error(probs, target, 2, n_bins=15, norm="max"))
    assert theirs == pytest.approx(0.2) and ours == pytest.approx(abs(0.9625 - 0.95), abs=1e-6)


# --- found by review (review-cal) ------------------------------------------------------------------------------------


def test_transposed_and_column_major_probabilities_give_the_metrics_of_contiguous_ones():
    # The classwise counters flattened their input with `view`: a transposed tensor (or a column-major array from
    # numpy) was a RuntimeError "view size is not compatible with input tensor's size and stride".
    probs, target = probs_and_target(60, 5)
    transposed = probs.T.contiguous().T
    column_major = torch.from_numpy(np.asfortranarray(probs.numpy()))
    assert not transposed.is_contiguous() and not column_major.is_contiguous()
    want = calibration_metrics(probs, target)
    assert not math.isnan(want["classwise_ece"])
    assert calibration_metrics(transposed, target) == pytest.approx(want, rel=1e-6)  # sums in another order
    assert calibration_metrics(column_major.double(), target) == pytest.approx(want, rel=1e-6)
    state = CalibrationState(5)
    state.update(transposed, target)
    assert state.metrics() == pytest.approx(want, rel=1e-6)


def test_probabilities_without_classes_get_a_clear_error():
    # (N, 0) was a RuntimeError from `min()` on an empty tensor.
    with pytest.raises(ValueError, match=r"\(N, C\) class probabilities with C >= 1, got shape \(2, 0\)"):
        calibration_metrics(torch.zeros(2, 0), torch.zeros(2, dtype=torch.long))


def test_a_refused_row_sum_is_shown_with_the_digits_that_miss_one():
    # The message said the row sums ranged over "[1, 1]" for a row summing to 1.002 (3 significant digits).
    with pytest.raises(ValueError, match=r"summing to 1 within 0\.02, but 1 of 1 rows do not \(first: row 0 sums to "
                                         r"1\.0205\)"):
        calibration_metrics(torch.tensor([[0.5, 0.5205]], dtype=torch.float64), torch.tensor([0]))


def test_states_with_different_counters_cannot_be_added_and_the_error_says_which_differ():
    # Was Python's "unsupported operand type(s) for +: 'CalibrationState' and 'CalibrationState'".
    with pytest.raises(ValueError, match="n_classes 3 and 4, classwise True and False"):
        CalibrationState(3) + CalibrationState(4, classwise=False)
    with pytest.raises(ValueError, match="n_fine 1000 and 500"):
        CalibrationState(3) + CalibrationState(3, n_fine=500)
    with pytest.raises(TypeError):
        CalibrationState(3) + 1


@pytest.mark.parametrize("seed", [-1, 1.5, "0", 2**64, True])
def test_a_seed_that_cannot_seed_the_bootstrap_is_named_in_the_error(seed):
    # numpy's own messages ("expected non-negative integer", "SeedSequence expects int...") named no parameter.
    probs, target = probs_and_target()
    with pytest.raises(ValueError, match="seed must be an int from 0 to 2\\*\\*64 - 1 or None"):
        calibration_metrics(probs, target, ci=0.95, n_boot=10, seed=seed)
    with pytest.raises(ValueError, match="seed must be an int"):
        CalibrationState(4).intervals(n_boot=10, seed=seed)  # no rows, no bootstrap: still checked
    assert calibration_metrics(probs, target, ci=0.95, n_boot=10, seed=np.int64(3))["ece_lo"] >= 0


def test_interval_options_are_checked_before_anything_is_counted(monkeypatch):
    # n_bins above the fine grid's 1000 cells failed only in metrics(), after the counting.
    probs, target = probs_and_target()
    monkeypatch.setattr(CalibrationState, "update", lambda *a, **k: pytest.fail("counted before the check"))
    with pytest.raises(ValueError, match="n_fine=1000 < n_bins=2000"):
        calibration_metrics(probs, target, n_bins=2000, ci=0.95)
    with pytest.raises(ValueError, match="n_boot must be an int >= 2"):
        calibration_metrics(probs, target, ci=0.95, n_boot=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_a_true_class_probability_of_zero_costs_the_same_capped_nll_in_every_dtype(dtype):
    # Was -log(tiny) of the dtype: 87.3 nats in float32, 708.4 in float64 (float16/bfloat16 are upcast to float32).
    probs, target = torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([1, 0])
    nll = calibration_metrics(probs.to(dtype), target)["nll"]
    assert nll == pytest.approx((-math.log(torch.finfo(torch.float32).tiny) + math.log(2)) / 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("row", [[0.34, 0.34, 0.34], [0.33, 0.33, 0.32], [0.52, 0.5, 0.0], [0.48, 0.5, 0.0]])
def test_rows_summing_to_one_plus_or_minus_the_tolerance_exactly_are_accepted_in_every_dtype(dtype, row):
    # Reviewed: a row written as summing to exactly 1.02 or 0.98 was accepted or refused depending on how the dtype
    # rounded its values (three 0.34s: accepted in float32, refused in float64 and float16).
    assert abs(abs(sum(row) - 1) - SUM_TOLERANCE) < 1e-12
    probs = torch.tensor([row, [0.2, 0.3, 0.5]], dtype=dtype)
    with pytest.warns(UserWarning, match="divided by its sum"):
        got = calibration_metrics(probs, torch.tensor([0, 2]))
    assert got["n"] == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_rows_beyond_the_tolerance_by_more_than_the_dtypes_rounding_are_refused(dtype):
    step = max(torch.finfo(dtype).eps, 1e-9) * 2
    for total in (1 + SUM_TOLERANCE + step, 1 - SUM_TOLERANCE - step):
        probs = torch.tensor([[total - 0.5, 0.5]], dtype=torch.float64).to(dtype)
        assert abs(float(probs.double().sum()) - 1) > SUM_TOLERANCE + step / 4
        with pytest.raises(ValueError, match="rows summing to 1 within 0.02"):
            calibration_metrics(probs, torch.tensor([0]))


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.int8,
                                   torch.int64, torch.float16, torch.bfloat16])
def test_row_weights_of_every_real_dtype_count_like_their_float_values(dtype):
    # Reviewed: uint16/32/64 weights failed with NotImplementedError "lt_cpu" (the negative-weight check).
    probs, target = probs_and_target()
    weight = (torch.arange(50) % 3 > 0).to(dtype)
    want = CalibrationState(4)
    want.update(probs, target, weight=weight.double())
    for check in (True, False):
        state = CalibrationState(4)
        state.update(probs, target, weight=weight, check=check)
        assert torch.equal(state.data, want.data)


def test_uint64_targets_beyond_int64_are_out_of_range_never_an_ignored_or_negative_id():
    # Reviewed: uint64 class ids from 2**63 on wrapped around to negative int64s: 2**64 - 100 was skipped silently
    # as ignore_index=-100, and 2**63 was reported as the target -9223372036854775808.
    probs, _ = probs_and_target(3)
    for value in (2**64 - 100, 2**63):
        target = torch.tensor([0, 1, value], dtype=torch.uint64)
        with pytest.raises(ValueError, match=r"1 targets are not class ids in \[0, 4\) \(e.g. one >= 2\*\*63 - 1\)"):
            calibration_metrics(probs, target, ignore_index=-100)
        state = CalibrationState(4)
        state.update(probs, target, ignore_index=-100)
        assert float(state.scalar("n_bad_target")) == 1 and float(state.scalar("n")) == 2


@pytest.mark.parametrize("ignore_index,match", [(True, "must be an int "), (1.5, "must be an int "),
                                                (2**70, "must be an int64 value"),
                                                (-2**63 - 1, "must be an int64 value")])
def test_an_ignore_index_no_class_id_can_equal_as_meant_is_a_clear_error(ignore_index, match):
    # Reviewed: 2**70 was an OverflowError "int too big to convert"; True skipped class 1 silently.
    probs, target = probs_and_target()
    with pytest.raises(ValueError, match=f"ignore_index {match}"):
        calibration_metrics(probs, target, ignore_index=ignore_index)
    with pytest.raises(ValueError, match=f"ignore_index {match}"):
        CalibrationState(4).update(probs, target, ignore_index=ignore_index)


def test_an_integer_ignore_index_may_be_a_zero_dimensional_tensor():
    probs, target = probs_and_target()
    assert calibration_metrics(probs, target, ignore_index=torch.tensor(1)) == \
        calibration_metrics(probs, target, ignore_index=1)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64])
@pytest.mark.parametrize("check", [True, False])
def test_predictions_that_are_not_floating_point_are_refused_also_without_the_value_checks(dtype, check):
    # Reviewed: with check=False, integer and bool predictions were counted as probabilities and complex ones failed
    # with NotImplementedError "max_values_cpu"; the dtype costs no look at the values.
    probs, target = probs_and_target()
    state = CalibrationState(4)
    with pytest.raises(ValueError, match=f"preds must be floating point probabilities, got {dtype}"):
        state.update(probs.round().to(dtype), target, check=check)
    assert float(state.scalar("n")) == 0


def test_predictions_that_are_not_a_tensor_are_a_type_error_naming_them():
    # Reviewed: CalibrationState.update of a numpy array or a list failed with "'list' object has no attribute 'dim'".
    probs, target = probs_and_target()
    for preds in (probs.numpy(), probs.tolist()):
        with pytest.raises(TypeError, match="preds must be a tensor, got"):
            CalibrationState(4).update(preds, target)


@pytest.mark.parametrize("activation,got", [(lambda z: z[:, 0], r"\(50,\)"), (lambda z: z[:10], r"\(10, 4\)"),
                                            (lambda z: torch.cat([z, z], 1) / 2, r"\(50, 8\)"),
                                            (lambda z: z.numpy(), "ndarray")])
@pytest.mark.parametrize("check", [True, False])
def test_an_activation_that_does_not_give_one_row_per_row_of_preds_is_named(activation, got, check):
    # Reviewed: such activations failed inside the counting with RuntimeError/IndexError about tensors "a" and "b".
    probs, target = probs_and_target()
    state = CalibrationState(4)
    with pytest.raises(ValueError, match=rf"activation\(preds\) must be a tensor of preds' shape \(50, 4\).*got {got}"):
        state.update(probs, target, activation=activation, check=check)
    assert float(state.scalar("n")) == 0
