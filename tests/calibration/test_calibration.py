"""The functional core: calibration metrics against torchmetrics and hand computations from the definitions."""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import multiclass_calibration_error

from fastai_ls import CalibrationState, calibration_error
from fastai_ls.calibration.state import METRIC_NAMES


def random_probs(n: int, n_classes: int, seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(n, n_classes, generator=g) * scale).softmax(1)
    return probs, torch.randint(0, n_classes, (n,), generator=g)


def on_an_edge(conf: torch.Tensor, n_bins: int) -> bool:
    edges = torch.linspace(0, 1, n_bins + 1)
    return bool((conf[:, None] == edges).any())


def state_of(probs, target, **kwargs) -> CalibrationState:
    state = CalibrationState(probs.shape[1], **kwargs)
    state.update(probs, target)
    return state


# --- reference implementations, one sample at a time, from the definitions (Guo et al. 2017, §2) --------------------


def guo_bin(c: float, n_bins: int) -> int:
    """Bin ((m-1)/M, m/M] of confidence c, 0 in the first."""
    return min(max(math.ceil(c * n_bins) - 1, 0), n_bins - 1)


def reference_metrics(probs: torch.Tensor, target: torch.Tensor, n_bins: int) -> dict[str, float]:
    p, y = probs.double().numpy(), target.numpy()
    n, n_classes = p.shape
    conf, hit = p.max(1), (p.argmax(1) == y).astype(float)
    bins = [[] for _ in range(n_bins)]
    for i in range(n):
        bins[guo_bin(conf[i], n_bins)].append(i)
    gaps = [(len(b) / n, np.mean(conf[b]) - np.mean(hit[b])) for b in bins if b]
    classwise = []
    for k in range(n_classes):
        cells = [[] for _ in range(n_bins)]
        for i in range(n):
            cells[guo_bin(p[i, k], n_bins)].append(i)
        classwise.append(sum(len(c) / n * abs(np.mean(p[c, k]) - np.mean(y[c] == k)) for c in cells if c))
    onehot = np.eye(n_classes)[y]
    return {
        "n": n, "accuracy": hit.mean(), "confidence": conf.mean(),
        "ece": sum(w * abs(g) for w, g in gaps), "mce": max(abs(g) for _, g in gaps),
        "rmsce": math.sqrt(sum(w * g * g for w, g in gaps)),
        "overconfidence": sum(w * max(g, 0) for w, g in gaps), "underconfidence": sum(w * max(-g, 0) for w, g in gaps),
        "classwise_ece": np.mean(classwise), "nll": -np.mean(np.log(p[np.arange(n), y])),
        "brier": np.mean(((p - onehot) ** 2).sum(1)),
    }


def sorted_aurc(conf: np.ndarray, error: np.ndarray) -> float:
    """Mean over k of the error rate among the k most confident rows, in the given order for ties."""
    order = np.argsort(-conf, kind="stable")
    errors = np.cumsum(error[order])
    return float(np.mean(errors / np.arange(1, len(conf) + 1)))


# --- agreement with torchmetrics -----------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
@pytest.mark.parametrize("n_classes,n_bins", [(2, 10), (3, 15), (10, 15), (7, 4)])
def test_calibration_error_equals_torchmetrics_off_the_bin_edges(norm, n_classes, n_bins):
    probs, target = random_probs(400, n_classes, seed=n_classes * 100 + n_bins)
    assert not on_an_edge(probs.max(1).values, n_bins)
    want = multiclass_calibration_error(probs, target, n_classes, n_bins=n_bins, norm=norm)
    assert calibration_error(probs, target, n_bins=n_bins, norm=norm) == pytest.approx(float(want), abs=1e-6)


def test_calibration_error_reproduces_the_torchmetrics_docstring_example():
    probs = torch.tensor([[.25, .20, .55], [.55, .05, .40], [.10, .30, .60], [.90, .05, .05]])
    target = torch.tensor([0, 1, 2, 0])
    got = [calibration_error(probs, target, n_bins=3, norm=norm) for norm in ("l1", "l2", "max")]
    assert got == pytest.approx([0.2000, 0.2082, 0.2333], abs=5e-5)


def test_confidence_on_an_edge_goes_to_the_bin_it_closes_and_one_to_the_last():
    # n_bins=2: bins (0, .5] and (.5, 1]; torchmetrics would put .5 up and 1.0 in a hidden third bin.
    probs = torch.tensor([[.5, .5], [1., 0.], [.75, .25]])
    state = state_of(probs, torch.tensor([0, 0, 1]), n_bins=2)
    assert state.bins[:, 0].tolist() == [1.0, 2.0]


def test_a_row_of_zeros_has_confidence_zero_and_lands_in_the_first_bin():
    # Not probabilities (the check refuses them); unchecked, as the callback's per-batch path counts them.
    state = CalibrationState(3, n_bins=4)
    state.update(torch.zeros(1, 3), torch.tensor([1]), check=False)
    assert state.bins[:, 0].tolist() == [1.0, 0.0, 0.0, 0.0]


# --- every metric against its definition ---------------------------------------------------------------------------


@pytest.mark.parametrize("n_classes,n_bins,scale", [(2, 5, 1.0), (4, 15, 3.0), (10, 7, 6.0)])
def test_metrics_match_their_definitions(n_classes, n_bins, scale):
    probs, target = random_probs(300, n_classes, seed=n_classes, scale=scale)
    got = state_of(probs, target, n_bins=n_bins).metrics()
    want = reference_metrics(probs, target, n_bins)
    assert set(got) == set(METRIC_NAMES)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    assert got["ece"] == pytest.approx(got["overconfidence"] + got["underconfidence"])


def distinct_fine_bin_probs(n: int, n_fine: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary probabilities whose confidences all fall in different fine bins, with random correctness."""
    rng = np.random.default_rng(seed)
    cells = rng.choice(np.arange(n_fine // 2, n_fine), size=n, replace=False)
    conf = torch.tensor((cells + 0.5) / n_fine, dtype=torch.float64)
    probs = torch.stack([conf, 1 - conf], 1)
    return probs, torch.tensor(rng.integers(0, 2, n))


def test_adaptive_ece_uses_bins_of_equal_mass():
    n_bins, per_bin = 5, 12
    probs, target = distinct_fine_bin_probs(n_bins * per_bin, 1000, seed=3)
    conf, hit = probs.max(1).values.numpy(), (probs.argmax(1) == target).double().numpy()
    order = np.argsort(conf)
    want = sum(abs(conf[b].mean() - hit[b].mean()) * len(b) for b in np.array_split(order, n_bins)) / len(conf)
    assert state_of(probs, target, n_bins=n_bins).metrics()["adaptive_ece"] == pytest.approx(want, abs=1e-12)


def test_aurc_equals_the_sorted_risk_coverage_area():
    probs, target = distinct_fine_bin_probs(80, 1000, seed=4)
    conf, error = probs.max(1).values.numpy(), (probs.argmax(1) != target).double().numpy()
    assert state_of(probs, target).metrics()["aurc"] == pytest.approx(sorted_aurc(conf, error), abs=1e-12)


def test_aurc_of_tied_confidences_is_the_mean_over_their_orders():
    # Two tie groups (same fine bin each): the value is the average AURC over every order within the groups.
    conf = np.array([.95, .95, .95, .95, .70, .70, .70])
    error = np.array([1., 0., 1., 0., 0., 1., 0.])
    orders = [np.r_[list(a), list(b)] for a in itertools.permutations(range(4))
              for b in itertools.permutations(range(4, 7))]
    want = np.mean([sorted_aurc(-np.arange(7.0), error[o]) for o in orders])  # rank order = the given order
    probs = torch.tensor(np.stack([conf, 1 - conf], 1))
    target = torch.tensor(error.astype(int))  # class 0 is predicted, so an error means target 1
    assert state_of(probs, target).metrics()["aurc"] == pytest.approx(want, abs=1e-12)


def test_logits_with_an_activation_give_the_state_of_their_probabilities():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(50, 4, generator=g), torch.randint(0, 4, (50,), generator=g)
    a, b = CalibrationState(4), CalibrationState(4)
    a.update(logits, target, activation=lambda z: z.softmax(1))
    b.update(logits.softmax(1), target)
    assert torch.equal(a.data, b.data)


def test_without_classwise_bins_the_state_keeps_no_class_counters_and_the_rest_is_unchanged():
    probs, target = random_probs(80, 6, seed=13)
    full, lean = state_of(probs, target), state_of(probs, target, classwise=False)
    n_counters = 10 + 3 * 15 + 3 * 1000  # scalars, coarse bins, fine bins
    assert lean.data.numel() == n_counters and full.data.numel() == n_counters + 3 * 6 * 15
    assert lean.class_bins.numel() == 0
    lean_metrics, full_metrics = lean.metrics(), full.metrics()
    assert math.isnan(lean_metrics.pop("classwise_ece")) and not math.isnan(full_metrics.pop("classwise_ece"))
    assert lean_metrics == full_metrics
    assert not lean.same_layout(full)
    with pytest.raises(ValueError, match="different counters: classwise False and True"):
        lean + full


def test_creating_and_updating_a_state_copies_no_python_data_to_the_device(monkeypatch):
    """On a GPU a tensor made from Python data is a host-to-device copy, which synchronises; the callback creates
    its state inside the first validation batch, so neither creation nor update may make one."""
    probs, target = random_probs(30, 4, seed=14)

    def forbidden(*args, **kwargs):
        raise AssertionError("a tensor made from Python data")

    for name in ("tensor", "as_tensor", "from_numpy"):
        monkeypatch.setattr(torch, name, forbidden)
    monkeypatch.setattr(torch.Tensor, "new_tensor", forbidden)
    for classwise in (True, False):
        state = CalibrationState(4, classwise=classwise)
        state.update(probs, target, weight=torch.ones(30, dtype=torch.float64), ignore_index=-100)
        state.update(probs, target)
    monkeypatch.undo()
    assert float(state.scalar("n")) == 60


# --- streaming: merging, weights, dtypes ---------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 60), split=st.floats(0.0, 1.0), n_classes=st.integers(2, 6), seed=st.integers(0, 10**6))
def test_two_halves_merged_equal_the_whole(n, split, n_classes, seed):
    probs, target = random_probs(n, n_classes, seed)
    k = int(split * n)
    halves = state_of(probs[:k], target[:k]) + state_of(probs[k:], target[k:])
    whole = state_of(probs, target)
    counts = (slice(None), 0)
    for view in ("bins", "fine"):
        assert torch.equal(getattr(halves, view)[counts], getattr(whole, view)[counts])
    torch.testing.assert_close(halves.data, whole.data, rtol=0, atol=1e-12)


def test_batches_streamed_equal_one_update():
    probs, target = random_probs(100, 5, seed=7)
    streamed = CalibrationState(5)
    for p, t in zip(probs.split(13), target.split(13)):
        streamed.update(p, t)
    torch.testing.assert_close(streamed.data, state_of(probs, target).data, rtol=0, atol=1e-12)


def test_rows_of_weight_zero_are_not_counted():
    probs, target = random_probs(40, 3, seed=8)
    keep = torch.arange(40) % 3 != 0
    weighted = CalibrationState(3)
    weighted.update(probs, target, weight=keep.double())
    torch.testing.assert_close(weighted.data, state_of(probs[keep], target[keep]).data, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_probabilities_count_like_their_float32_values(dtype):
    probs, target = random_probs(64, 6, seed=9)
    half = probs.to(dtype)
    torch.testing.assert_close(state_of(half, target).data, state_of(half.float(), target).data, rtol=0, atol=0)


# --- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_bins", [0, -3, 2.5, "15", True])
def test_n_bins_must_be_a_positive_int(n_bins):
    with pytest.raises(ValueError, match="n_bins"):
        CalibrationState(3, n_bins=n_bins)


def test_nan_rows_are_counted_as_invalid_and_left_out():
    probs, target = random_probs(30, 3, seed=10)
    spoiled = probs.clone()
    spoiled[[2, 11]] = float("nan")
    spoiled[20, 1] = float("inf")
    state = state_of(spoiled, target)
    kept = torch.ones(30, dtype=torch.bool)
    kept[[2, 11, 20]] = False
    clean = state_of(probs[kept], target[kept])
    assert float(state.scalar("n_invalid")) == 3
    assert state.metrics() | {"n_invalid": 0.0} == pytest.approx(clean.metrics())


def test_out_of_range_targets_are_counted_not_scored():
    probs, target = random_probs(20, 4, seed=11)
    bad = target.clone()
    bad[[0, 5]] = torch.tensor([4, -1])
    state = state_of(probs, bad)
    assert float(state.scalar("n_bad_target")) == 2 and float(state.scalar("n")) == 18


def test_ignored_targets_are_skipped_silently():
    probs, target = random_probs(20, 4, seed=12)
    marked = target.clone()
    marked[3] = -100
    state = CalibrationState(4)
    state.update(probs, marked, ignore_index=-100)
    assert float(state.scalar("n_bad_target")) == 0 and float(state.scalar("n")) == 19


def test_calibration_error_rejects_unknown_norms():
    with pytest.raises(ValueError, match="norm"):
        calibration_error(*random_probs(4, 2, seed=0), norm="l3")


# --- reading a state while other threads update it -------------------------------------------------------------------


@pytest.mark.parametrize("read", [lambda s: s.metrics(), lambda s: s.intervals(n_boot=20),
                                  lambda s: (s + CalibrationState(s.n_classes)).metrics(), lambda s: s.bin_table(),
                                  lambda s: pickle.loads(pickle.dumps(s)).metrics(),
                                  lambda s: copy.deepcopy(s).metrics()])
def test_a_state_read_while_another_thread_updates_it_sees_whole_updates_only(monkeypatch, read):
    # Reviewed: `metrics()` during an update from another thread read the scalars of a batch whose class bins were
    # not added yet and raised "these calibration counters cannot come from any predictions".
    import threading

    probs, target = random_probs(500, 4, seed=0)
    state = CalibrationState(4)
    inside, release = threading.Event(), threading.Event()
    add_class_bins = CalibrationState._add_class_bins

    def paused(self, *args):  # the update stops half-way: its scalars and top-label bins are in, its class bins not
        inside.set()
        release.wait(10)
        add_class_bins(self, *args)

    monkeypatch.setattr(CalibrationState, "_add_class_bins", paused)
    writer = threading.Thread(target=state.update, args=(probs, target))
    writer.start()
    assert inside.wait(10)
    result = {}

    def reader():
        try:
            result["value"] = read(state)
        except Exception as e:  # noqa: BLE001  (the test reports it)
            result["error"] = e

    thread = threading.Thread(target=reader)
    thread.start()
    thread.join(0.3)
    release.set()
    writer.join(10)
    thread.join(10)
    assert "error" not in result, result.get("error")
    monkeypatch.undo()
    if isinstance(result["value"], dict) and "n" in result["value"]:
        assert result["value"] == read(state_of(probs, target))


def test_moving_a_state_to_its_own_device_gives_the_state_itself_not_a_second_lock_over_its_counters():
    state = state_of(*random_probs(50, 3, seed=0))
    assert state.to("cpu") is state


@pytest.mark.parametrize("scores", [lambda z: 3 * z, lambda z: (3 * z).exp()])
def test_scores_counted_without_checks_that_are_not_probabilities_are_named_when_read(scores):
    # Reviewed: a learner whose loss's `activation` returned logits stopped CalibrationCallback (which updates with
    # check=False) with "a count is negative; a `data` vector must be a state's own", naming neither.
    g = torch.Generator().manual_seed(0)
    state = CalibrationState(4)
    state.update(scores(torch.randn(200, 4, generator=g)), torch.randint(0, 4, (200,), generator=g), check=False)
    with pytest.raises(ValueError, match=r"what `update\(check=False\)` counts .* must be probabilities.* not logits"):
        state.metrics()


def test_a_state_pickled_before_squared_weights_were_counted_loads_with_its_counters():
    # Reviewed: a state saved with the layout of nine running sums (a learner exported with the callback before
    # `weight_sq` was added) failed after loading: metrics() with "data must be a float64 vector of length 3190",
    # update() with a RuntimeError.
    from fastai_ls.calibration.counting import SCALAR_NAMES

    state = state_of(*random_probs(60, 3, seed=0))
    saved = state.__getstate__()
    i = SCALAR_NAMES.index("weight_sq")
    assert i == len(SCALAR_NAMES) - 1
    saved["data"] = torch.cat([saved["data"][:i], saved["data"][i + 1:]])
    saved["_slices"] = {name: slice(part.start - (part.start > i), part.stop - 1) for name, part in
                        saved["_slices"].items()}
    loaded = CalibrationState.__new__(CalibrationState)
    loaded.__setstate__(saved)
    assert torch.equal(loaded.data, state.data) and loaded.metrics() == state.metrics()
    loaded.update(*random_probs(10, 3, seed=1))
    assert loaded.metrics()["n"] == 70


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unchecked_half_precision_rows_count_as_the_checked_renormalised_ones(dtype):
    # Reviewed: with check=False (the callback's per-batch path) bfloat16 softmax outputs, whose rows miss 1 by up to
    # 3e-3, were counted as they were, while the functions and a checked update divide them by their sums.
    g = torch.Generator().manual_seed(0)
    probs = (3 * torch.randn(400, 10, generator=g)).to(dtype).softmax(1)
    target = torch.randint(0, 10, (400,), generator=g)
    checked, unchecked = CalibrationState(10), CalibrationState(10)
    with pytest.warns(UserWarning, match="divided by its sum") if dtype == torch.bfloat16 else \
            contextlib.nullcontext():
        checked.update(probs, target)
    unchecked.update(probs, target, check=False)
    assert unchecked.metrics() == pytest.approx(checked.metrics(), rel=1e-6, abs=1e-9)


def test_a_state_pickled_before_state_py_was_split_loads_with_its_counters_and_metrics():
    # Made at commit b7d7912, before the state's storage, per-batch sums and estimates moved to counters.py,
    # counting.py and estimates.py: a 3-class state of 300 rows (5 bins, 20 fine cells) and its metrics().
    path = Path(__file__).parent / "data" / "pre_split_b7d7912.pkl"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the calibrators in the same file name scaling.py
        saved = pickle.loads(path.read_bytes())
    state = saved["state"]
    assert type(state) is CalibrationState
    assert state.metrics() == saved["metrics"]
    state.update(torch.tensor([[0.2, 0.3, 0.5]]), torch.tensor([2]))  # and it still counts
    assert state.metrics()["n"] == saved["metrics"]["n"] + 1
