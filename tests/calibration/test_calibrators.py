"""Post-hoc calibrators (the math layer): the interface every method shares, bad input, and each method against an
independent implementation (scikit-learn, netcal, scipy) and on data whose right answer is known."""

from __future__ import annotations

import contextlib
import math
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize

from fastai_ls.calibration import calibration_metrics
from fastai_ls.calibration.calibrators import (
    CALIBRATORS,
    CalibrationWarning,
    Calibrator,
    DirichletCalibration,
    EnsembleTemperatureScaling,
    HistogramCurve,
    IsotonicCalibration,
    IsotonicCurve,
    MatrixScaling,
    TemperatureScaling,
    TopLabelHistogramBinning,
    TopLabelIsotonic,
    VectorScaling,
    get_calibrator,
)
from fastai_ls.calibration.calibrators.base import NEG_INF_GAP
from fastai_ls.calibration.calibrators.toplabel import MARGIN, lowest_confidence, spread_rest

# Matrix and Dirichlet with a fixed strength: choosing it by cross-validation is tested once, on its own.
OPTIONS = {"matrix": {"reg": 0.01}, "dirichlet": {"reg": 0.01}}
METHODS = list(CALIBRATORS)


def make(method: str) -> Calibrator:
    return get_calibrator(method, **OPTIONS.get(method, {}))


def over_confident(n: int, n_classes: int = 5, seed: int = 0, sharpen: float = 2.5) -> tuple[torch.Tensor, ...]:
    """Real-looking over-confident outputs, as a CNN gives: one class stands out in each row, labels drawn from the
    true probabilities (so some rows are wrong), and logits `sharpen` times too sharp. Returns (logits, target)."""
    g = torch.Generator().manual_seed(seed)
    favourite = torch.randint(0, n_classes, (n,), generator=g)
    true_logits = 3.0 * F.one_hot(favourite, n_classes) + torch.randn(n, n_classes, generator=g)
    target = torch.multinomial(true_logits.softmax(1), 1, generator=g).squeeze(1)
    return sharpen * true_logits, target


def known_probabilities(n: int, n_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(true logits, target drawn from their softmax)."""
    g = torch.Generator().manual_seed(seed)
    true_logits = 1.5 * torch.randn(n, n_classes, generator=g, dtype=torch.float64)
    return true_logits, torch.multinomial(true_logits.softmax(1), 1, generator=g).squeeze(1)


@pytest.fixture(scope="module")
def split():
    """Fit rows and held-out rows of the same over-confident model."""
    logits, target = over_confident(4000)
    return (logits[:2000], target[:2000]), (logits[2000:], target[2000:])


@pytest.fixture(scope="module")
def fitted(split):
    (logits, target), _ = split
    return {method: make(method).fit(logits, target) for method in METHODS}


# --- the interface ---------------------------------------------------------------------------------------------------


def test_every_method_has_a_name_a_one_line_description_a_paper_and_a_multiclass_form():
    for name, cls in CALIBRATORS.items():
        assert cls.name == name
        assert cls.description and "\n" not in cls.description
        assert cls.form in ("full", "one-vs-rest", "top-label")
        assert f"Multiclass form: {cls.form}" in " ".join(cls.__doc__.split())
        assert re.search(r"(19|20)\d\d", cls.__doc__), f"{name}'s docstring names no paper"
        assert isinstance(cls.may_change_prediction, bool)
    keeps = {name for name, cls in CALIBRATORS.items() if not cls.may_change_prediction}
    assert keeps == {"temperature", "ets", "top_label_isotonic", "histogram"}


def test_an_unknown_method_name_is_a_clear_error_that_suggests_the_close_one():
    with pytest.raises(ValueError, match=r"unknown calibration method 'dirichlett' \(did you mean 'dirichlet'\?\); "
                                         r"known: temperature, vector"):
        get_calibrator("dirichlett")
    with pytest.raises(ValueError, match="unknown calibration method 'platt'"):
        get_calibrator("platt")
    with pytest.raises(TypeError):
        get_calibrator("matrix", strength=1.0)  # an option the method does not have


@pytest.mark.parametrize("method", METHODS)
def test_output_is_a_probability_vector_per_row(method, fitted, split):
    _, (logits, _) = split
    probs = fitted[method](logits)
    assert probs.shape == logits.shape and probs.dtype == torch.float32
    assert bool(probs.isfinite().all()) and bool((probs >= 0).all())
    torch.testing.assert_close(probs.sum(1), torch.ones(len(probs)), atol=1e-5, rtol=0)
    assert fitted[method](logits.double()).dtype == torch.float64
    assert fitted[method](logits.half()).dtype == torch.float32


@pytest.mark.parametrize("method", METHODS)
def test_calibrating_held_out_over_confident_outputs_lowers_their_ece(method, fitted, split):
    _, (logits, target) = split
    before = calibration_metrics(logits.softmax(1), target)
    after = calibration_metrics(fitted[method](logits), target)
    assert before["confidence"] > before["accuracy"] + 0.05  # the data are over-confident
    assert after["ece"] < before["ece"] / 2
    if CALIBRATORS[method].form == "full":  # smooth maps: the NLL improves too
        assert after["nll"] < before["nll"]


@pytest.mark.parametrize("method", METHODS)
def test_a_pickled_calibrator_gives_the_same_probabilities(method, fitted, split):
    _, (logits, _) = split
    again = pickle.loads(pickle.dumps(fitted[method]))
    torch.testing.assert_close(again(logits), fitted[method](logits), atol=0, rtol=0)
    assert repr(again) == repr(fitted[method])


@pytest.mark.parametrize("method", METHODS)
def test_methods_that_keep_the_predicted_class_keep_it_and_the_others_can_change_it(method):
    # Biased logits: class 0 is 1.5 too low, so fixing the bias changes predictions.
    true_logits, target = known_probabilities(3000, 4, seed=1)
    logits = (true_logits - torch.tensor([1.5, 0, 0, 0], dtype=torch.float64)).float()
    probs = make(method).fit(logits[:2000], target[:2000])(logits[2000:])
    changed = (probs.argmax(1) != logits[2000:].argmax(1)).sum()
    if CALIBRATORS[method].may_change_prediction:
        assert changed > 0
    else:
        assert changed == 0


@pytest.mark.parametrize("method", METHODS)
def test_nothing_the_caller_passes_is_modified(method):
    logits, target = over_confident(300, seed=2)
    logits[0, 1] = -math.inf
    logits.requires_grad_()
    saved_logits, saved_target = logits.detach().clone(), target.clone()
    calibrator = make(method).fit(logits, target)
    probs = calibrator(logits)
    assert torch.equal(logits.detach(), saved_logits) and torch.equal(target, saved_target)
    assert not probs.requires_grad and logits.grad is None


# --- bad input -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_calling_with_another_number_of_classes_is_an_error(method, fitted):
    with pytest.raises(ValueError, match="fitted on 5 classes, got logits with 4"):
        fitted[method](torch.randn(3, 4))


@pytest.mark.parametrize("method", METHODS)
def test_nan_or_pos_inf_logits_cannot_be_fitted_on_and_come_out_as_nan_rows(method, fitted, split):
    (logits, target), (held, _) = split
    for bad in (math.nan, math.inf):
        poisoned = logits.clone()
        poisoned[3, 2] = bad
        with pytest.raises(ValueError, match=r"NaN or \+inf .* in 1 of 2000 rows \(first: row 3\)"):
            make(method).fit(poisoned, target)
        poisoned_held = held[:10].clone()
        poisoned_held[4, 0] = bad
        probs = fitted[method](poisoned_held)
        assert bool(probs[4].isnan().all())
        keep = torch.arange(10) != 4
        torch.testing.assert_close(probs[keep], fitted[method](held[:10][keep]))


@pytest.mark.parametrize("method", METHODS)
def test_a_neg_inf_logit_stands_for_the_rows_lowest_logit_minus_104(method, split):
    (logits, target), _ = split
    logits, target = logits[:500], target[:500]
    with_inf, with_floor = logits.clone(), logits.clone()
    with_inf[::7, 1] = -math.inf  # a class ruled out in every seventh row
    others = torch.cat([logits[::7, :1], logits[::7, 2:]], 1)
    with_floor[::7, 1] = others.amin(1) - NEG_INF_GAP
    a, b = make(method).fit(with_inf, target), make(method).fit(with_floor, target)
    probs = a(with_inf)
    assert bool(probs.isfinite().all())
    torch.testing.assert_close(probs, b(with_floor))
    assert bool(torch.tensor([-math.inf, 0.0, 1.0]).softmax(0)[0] == 0)


def test_fitting_the_temperature_no_longer_crashes_on_a_single_neg_inf_logit():
    # Issue 10: LBFGS raised "value cannot be converted to type float without overflow".
    logits, target = over_confident(500, seed=3)
    logits[17, 4] = -math.inf
    temperature = TemperatureScaling().fit(logits, target).temperature
    assert math.isfinite(temperature) and 1.5 < temperature < 4


@pytest.mark.parametrize("method", METHODS)
def test_fewer_rows_than_classes_is_an_error(method):
    with pytest.raises(ValueError, match="at least as many held-out rows as classes.*got 3 rows for 5 classes"):
        make(method).fit(torch.randn(3, 5), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("method", METHODS)
def test_targets_that_are_not_class_ids_in_range_are_errors(method):
    logits = torch.randn(20, 3)
    with pytest.raises(ValueError, match=r"outside \[0, 3\) \(first: 3 in row 5\)"):
        make(method).fit(logits, torch.tensor([0, 1, 2, 0, 1, 3] + [0] * 14))
    with pytest.raises(ValueError, match="target must hold 20 integer class ids"):
        make(method).fit(logits, torch.zeros(20))
    with pytest.raises(ValueError, match="target must hold 20 integer class ids"):
        make(method).fit(logits, torch.zeros(19, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits must be \(N, C\) with C >= 2"):
        make(method).fit(torch.randn(20), torch.zeros(20, dtype=torch.long))
    with pytest.raises(ValueError, match="logits must be floating point"):
        make(method).fit(torch.zeros(20, 3, dtype=torch.long), torch.zeros(20, dtype=torch.long))
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        make(method).fit(np.zeros((20, 3)), torch.zeros(20, dtype=torch.long))
    with pytest.raises(RuntimeError, match="not fitted"):
        make(method)(logits)


@pytest.mark.parametrize("method", METHODS)
def test_classes_missing_from_the_held_out_targets(method):
    """Methods with parameters per class warn and fit those classes towards 0; the others need no warning."""
    logits, target = over_confident(1000, seed=4)
    kept = target != 3
    logits, target = logits[kept], target[kept]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probs = make(method).fit(logits, target)(logits)
    ours = [w for w in caught if issubclass(w.category, CalibrationWarning)]
    if CALIBRATORS[method].per_class:
        assert len(ours) == 1 and "1 of 5 classes never occur in the held-out targets (3)" in str(ours[0].message)
        assert float(probs[:, 3].mean()) < float(logits.softmax(1)[:, 3].mean())
    else:
        assert not ours
    assert bool(probs.isfinite().all())
    torch.testing.assert_close(probs.sum(1), torch.ones(len(probs)), atol=1e-5, rtol=0)


@contextlib.contextmanager
def host_reads_forbidden():
    """Make reading a tensor's value on the host (what would wait for a GPU) raise."""
    names = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "nonzero")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def forbidden(*args, **kwargs):
        raise AssertionError("host read in a calibrator call")

    try:
        for name in names:
            setattr(torch.Tensor, name, forbidden)
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("method", ["temperature", "vector", "matrix", "dirichlet", "ets"])
def test_scaling_calibrators_read_no_value_on_the_host_when_called(method, fitted, split):
    """So that, applied to a learner, they keep CalibrationCallback's per-batch update free of device syncs."""
    _, (logits, _) = split
    with host_reads_forbidden():
        fitted[method](logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_a_calibrator_fitted_on_the_cpu_runs_on_the_gpu(method, fitted, split):
    _, (logits, _) = split
    on_cpu = fitted[method](logits)
    torch.testing.assert_close(fitted[method](logits.cuda()).cpu(), on_cpu, atol=1e-5, rtol=1e-5)
    moved = pickle.loads(pickle.dumps(fitted[method])).to("cuda")
    torch.testing.assert_close(moved(logits.cuda()).cpu(), on_cpu, atol=1e-5, rtol=1e-5)


# --- temperature scaling ------------------------------------------------------------------------------------------


def grid_temperature(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Brute force: the NLL at 4001 log-spaced temperatures in [0.1, 10], all at once."""
    logits = logits.double()
    grid = torch.exp(torch.linspace(math.log(0.1), math.log(10), 4001, dtype=torch.float64))
    log_probs = (logits / grid[:, None, None]).log_softmax(-1)
    nll = -log_probs.gather(2, target.expand(len(grid), -1)[..., None]).mean((1, 2))
    return float(grid[nll.argmin()])


@pytest.mark.parametrize("known", [3.0, 0.5])
def test_temperature_scaling_finds_the_nll_minimum_and_recovers_a_known_temperature(known):
    true_logits, target = known_probabilities(2000, 5, seed=5)
    logits = (known * true_logits).float()
    temperature = TemperatureScaling().fit(logits, target).temperature
    assert temperature == pytest.approx(grid_temperature(logits, target), rel=2e-3)
    assert temperature == pytest.approx(known, rel=0.1)


def test_a_degenerate_temperature_fit_is_bounded_and_says_what_it_means():
    g = torch.Generator().manual_seed(6)
    # Always right with a margin (two classes): the NLL keeps falling as T -> 0.
    target = torch.randint(0, 2, (200,), generator=g)
    logits = 5.0 * F.one_hot(target, 2).float() + 0.1 * torch.randn(200, 2, generator=g)
    with pytest.warns(CalibrationWarning, match=r"lowest at T <= 0.01.*right with a margin on \(almost\) every"):
        low = TemperatureScaling().fit(logits, target)
    assert low.temperature == 0.01 and low.at_bound
    # Logits that say nothing about the targets: the NLL keeps falling as T grows (unbounded: ~10^5-10^6).
    noise = 20.0 * torch.randn(200, 10, generator=g)
    noise_target = noise.argmin(1)  # worse than no information
    with pytest.warns(CalibrationWarning, match="lowest at T >= 100.*nearly uniform.*almost no information"):
        high = TemperatureScaling().fit(noise, noise_target)
    assert high.temperature == 100.0 and high.at_bound
    # One wrong row among the right ones: a finite minimum (about T = 0.95), no warning.
    target[0] = 1 - target[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        finite = TemperatureScaling().fit(logits, target)
    assert not finite.at_bound and 0.5 < finite.temperature < 1.5
    assert finite.temperature == pytest.approx(grid_temperature(logits, target), rel=2e-3)


def test_a_given_temperature_needs_no_fit_and_takes_any_number_of_classes():
    calibrator = TemperatureScaling(2.0)
    logits = torch.randn(4, 7)
    torch.testing.assert_close(calibrator(logits), (logits / 2).softmax(1))
    torch.testing.assert_close(calibrator(logits[:, :3]), (logits[:, :3] / 2).softmax(1))
    for bad in (0.0, -1.0, math.inf, math.nan, True):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            TemperatureScaling(bad)


@pytest.mark.parametrize("method", ["isotonic", "top_label_isotonic", "histogram"])
def test_curve_calibrators_give_float32_logits_the_probabilities_of_float64_ones(method):
    # The curves are fitted on float64 scores but were evaluated on float32 ones: a confident model's confidences
    # near 1, distinct knots in float64, all rounded to 1.0 and took the last knot's value. The same calibrator
    # then differed by up to 0.21 in probability between a model's float32 logits and the same logits in float64.
    g = torch.Generator().manual_seed(3)
    favourite = torch.randint(0, 5, (2000,), generator=g)
    true_logits = 3.0 * F.one_hot(favourite, 5) + torch.randn(2000, 5, generator=g)
    target = torch.multinomial(true_logits.softmax(1), 1, generator=g).squeeze(1)
    logits = 7.5 * true_logits  # logit gaps of 20 and more: confidences within 1e-8 of 1
    assert float((logits.softmax(1).amax(1) == 1).float().mean()) > 0.2  # in float32, many round to 1.0
    calibrator = get_calibrator(method).fit(logits, target)
    single, double = calibrator(logits), calibrator(logits.double())
    assert single.dtype == torch.float32 and double.dtype == torch.float64
    torch.testing.assert_close(single.double(), double, rtol=0, atol=1e-6)


def test_numeric_options_take_numpy_scalars_and_refuse_booleans_and_strings():
    # np.float32(2.0) was refused with "temperature must be a finite number > 0, got np.float32(2.0)", and
    # np.int64 counts likewise: a T or a bin count computed with numpy could not be passed on.
    assert TemperatureScaling(np.float32(2.0)).temperature == 2.0
    assert MatrixScaling(reg=np.float32(0.5), reg_grid=(np.float64(0.1), 1)).reg == 0.5
    assert TopLabelHistogramBinning(n_bins=np.int64(5), min_rows=np.int32(10)).min_rows == 10
    assert VectorScaling(max_iter=np.int64(20)).max_iter == 20
    assert type(HistogramCurve(n_bins=np.int64(5)).n_bins) is int
    for make, match in [(lambda: MatrixScaling(reg=True), "reg must be a finite number >= 0"),
                        (lambda: MatrixScaling(reg_grid=(0.1, -1.0)), "reg_grid must be a finite number >= 0"),
                        (lambda: TopLabelHistogramBinning(n_bins=2.0), "n_bins must be an int >= 1, got 2.0"),
                        (lambda: TopLabelIsotonic(min_rows=False), "min_rows must be an int >= 1"),
                        (lambda: EnsembleTemperatureScaling(max_iter="9"), "max_iter must be an int >= 1")]:
        with pytest.raises(ValueError, match=match):
            make()


# --- vector, matrix and Dirichlet scaling: against scipy and scikit-learn ---------------------------------------------


def scipy_fit(features: np.ndarray, target: np.ndarray, model: str, reg: float = 0.0) -> np.ndarray:
    """An independent fit with scipy's L-BFGS-B and a hand-written gradient: 'vector' is softmax(w * x + b) with the
    penalty reg * (sum (w - mean w)^2 + sum b^2) / C, 'matrix' softmax(W x + b) with the ODIR penalty
    reg * (sum off-diagonal W^2 / (C (C - 1)) + sum b^2 / C).
    Returns the fitted probabilities of `features`."""
    n, c = features.shape
    onehot = np.eye(c)[target]

    def unpack(theta):
        if model == "vector":
            return np.diag(theta[:c]), theta[c:]
        return theta[:c * c].reshape(c, c), theta[c * c:]

    def objective(theta):
        weight, bias = unpack(theta)
        scores = features @ weight.T + bias
        scores -= scores.max(1, keepdims=True)
        log_p = scores - np.log(np.exp(scores).sum(1, keepdims=True))
        residual = (np.exp(log_p) - onehot) / n  # d(mean NLL)/d(scores)
        grad_w, grad_b = residual.T @ features, residual.sum(0)
        loss = -(onehot * log_p).sum() / n
        off = weight * (1 - np.eye(c))
        loss += reg * ((off ** 2).sum() / (c * (c - 1)) + (bias ** 2).sum() / c)
        grad_w = grad_w + reg * 2 * off / (c * (c - 1))
        grad_b = grad_b + reg * 2 * bias / c
        if model == "vector":
            spread = np.diag(weight) - np.diag(weight).mean()
            loss += reg * (spread ** 2).sum() / c
            grad_w = grad_w + np.diag(reg * 2 * spread / c)
        grad = np.concatenate([np.diag(grad_w), grad_b]) if model == "vector" else np.concatenate(
            [grad_w.ravel(), grad_b])
        return loss, grad

    start = np.concatenate([np.ones(c), np.zeros(c)]) if model == "vector" else np.concatenate(
        [np.eye(c).ravel(), np.zeros(c)])
    theta = minimize(objective, start, jac=True, method="L-BFGS-B", options={"maxiter": 10000, "gtol": 1e-12,
                                                                             "ftol": 1e-15}).x
    weight, bias = unpack(theta)
    scores = features @ weight.T + bias
    return torch.tensor(scores).softmax(1).numpy()


@pytest.mark.parametrize("reg", [0.0, 0.5])
def test_vector_scaling_reaches_the_optimum_of_its_objective_found_by_scipy(split, reg):
    (logits, target), _ = split
    expected = scipy_fit(logits.double().numpy(), target.numpy(), "vector", reg=reg)
    ours = VectorScaling(reg=reg).fit(logits, target)(logits.double()).numpy()
    np.testing.assert_allclose(ours, expected, atol=2e-4)


def test_vector_scaling_at_infinite_strength_is_temperature_scaling(split):
    (logits, target), _ = split
    vector, temperature = VectorScaling(reg=math.inf).fit(logits, target), TemperatureScaling().fit(logits, target)
    torch.testing.assert_close(vector(logits), temperature(logits))


def test_regularised_vector_scaling_is_no_worse_out_of_sample_at_100_classes():
    # Realistic outputs of a 100-class model: over-confident, a bias per class; 3,000 rows for 200 parameters,
    # where the unregularised fit (Guo et al.'s) overfits and falls behind temperature scaling.
    logits, target = over_confident(6000, n_classes=100, seed=21, sharpen=2.0)
    logits = logits + 0.5 * torch.randn(100, generator=torch.Generator().manual_seed(22))
    fit, held = slice(0, 3000), slice(3000, None)

    def held_out_nll(calibrator):
        probs = calibrator.fit(logits[fit], target[fit])(logits[held]).double()
        return float(F.nll_loss(probs.clamp_min(1e-300).log(), target[held]))

    regularised = held_out_nll(VectorScaling())
    assert regularised <= held_out_nll(TemperatureScaling())
    assert regularised <= held_out_nll(VectorScaling(reg=0.0))


def test_vector_scaling_recovers_a_known_per_class_bias():
    true_logits, target = known_probabilities(20000, 4, seed=7)
    bias = torch.tensor([1.0, -0.5, 0.0, 0.5], dtype=torch.float64)
    calibrator = VectorScaling().fit((true_logits - bias).float(), target)
    assert (calibrator.weight - 1).abs().max() < 0.06
    fitted_bias = calibrator.bias - calibrator.bias.mean()  # softmax ignores a common shift
    torch.testing.assert_close(fitted_bias, bias - bias.mean(), atol=0.06, rtol=0)


def test_unregularised_matrix_scaling_is_multinomial_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    logits, target = over_confident(1500, n_classes=4, seed=8)
    x = logits.double().numpy() / 2.5
    sklearn_probs = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10000).fit(x, target.numpy()).predict_proba(x)
    ours = MatrixScaling(reg=0.0).fit(torch.from_numpy(x), target)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, sklearn_probs, atol=2e-4)


@pytest.mark.parametrize("cls", [MatrixScaling, DirichletCalibration])
def test_odir_scaling_matches_an_independent_scipy_fit_of_the_same_objective(cls):
    logits, target = over_confident(1500, n_classes=4, seed=9)
    features = logits.double() if cls is MatrixScaling else logits.double().log_softmax(1)
    expected = scipy_fit(features.numpy(), target.numpy(), "matrix", reg=0.5)
    ours = cls(reg=0.5).fit(logits, target)(logits.double()).numpy()
    np.testing.assert_allclose(ours, expected, atol=2e-4)


def test_odir_shrinks_the_off_diagonal_weights_and_the_biases_but_not_the_diagonal():
    logits, target = over_confident(600, n_classes=6, seed=10)
    loose, tight = MatrixScaling(reg=0.0).fit(logits, target), MatrixScaling(reg=100.0).fit(logits, target)
    off = 1 - torch.eye(6, dtype=torch.float64)
    # Softmax ignores a constant added to every row of W: compare the off-diagonal against the diagonal's spread.
    assert (tight.weight * off).abs().max() < 0.2 * (loose.weight * off).abs().max()
    assert tight.bias.abs().max() < 0.2 * (loose.bias - loose.bias.mean()).abs().max()
    assert 0.2 < float(tight.weight.diagonal().mean()) < 0.8  # still undoes the over-confidence (1 / 2.5)


def test_the_odir_strength_is_chosen_on_held_out_rows_deterministically():
    # Few rows for 8 classes: the unregularised end of the grid overfits, so a positive strength wins.
    logits, target = over_confident(400, n_classes=8, seed=11)
    grid = (0.0, 1e-2, 1.0)
    first, again = MatrixScaling(reg_grid=grid).fit(logits, target), MatrixScaling(reg_grid=grid).fit(logits, target)
    assert first.reg_ == again.reg_ and first.reg_ > 0.0
    chosen = MatrixScaling(reg=first.reg_).fit(logits, target)
    torch.testing.assert_close(first(logits), chosen(logits))


def test_dirichlet_calibration_depends_only_on_the_probabilities():
    logits, target = over_confident(800, n_classes=4, seed=12)
    shifted = logits + 10 * torch.randn(800, 1)  # the same softmax, other logits
    a = DirichletCalibration(reg=0.01).fit(logits, target)
    b = DirichletCalibration(reg=0.01).fit(shifted, target)
    # within the fits' optimisation tolerance (the shifted float32 logits round differently)
    torch.testing.assert_close(a(logits), b(shifted), atol=5e-5, rtol=0)


def test_dirichlet_calibration_recovers_probabilities_of_its_own_family():
    true_logits, target = known_probabilities(20000, 3, seed=13)
    # The model reports q with log q = A^-1 (log p - b): Dirichlet calibration can map it back exactly.
    mixing = torch.tensor([[1.5, 0.3, 0.0], [0.0, 0.8, 0.2], [0.1, 0.0, 1.2]], dtype=torch.float64)
    reported = (true_logits.log_softmax(1) @ mixing.T).log_softmax(1).float()
    calibrator = DirichletCalibration(reg=0.0).fit(reported, target)
    gap = (calibrator(reported.double()) - true_logits.softmax(1)).abs().mean()
    assert gap < 0.01 < (reported.softmax(1).double() - true_logits.softmax(1)).abs().mean()


# --- isotonic regression: against scikit-learn and netcal -------------------------------------------------------------


class FixedProbabilities:
    """A scikit-learn classifier whose `predict_proba` of row index i is row i of a fixed matrix."""

    def __init__(self, probs: np.ndarray):
        self.probs, self.classes_ = probs, np.arange(probs.shape[1])

    def fit(self, x, y):
        return self

    def predict_proba(self, x):
        return self.probs[np.asarray(x).ravel().astype(int)]

    def predict(self, x):
        return self.predict_proba(x).argmax(1)

    def get_params(self, deep=True):
        return {"probs": self.probs}


@pytest.mark.parametrize("n_classes", [5, 2])
def test_one_vs_rest_isotonic_matches_scikit_learns_calibrated_classifier(n_classes):
    from sklearn.base import BaseEstimator, ClassifierMixin
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.frozen import FrozenEstimator

    class Model(FixedProbabilities, ClassifierMixin, BaseEstimator):
        pass

    logits, target = over_confident(3000, n_classes=n_classes, seed=14)
    probs = logits.double().softmax(1).numpy()
    rows = np.arange(3000)[:, None]
    reference = CalibratedClassifierCV(FrozenEstimator(Model(probs)), method="isotonic")
    reference.fit(rows[:2000], target[:2000].numpy())
    ours = IsotonicCalibration().fit(logits[:2000].double(), target[:2000])
    np.testing.assert_allclose(ours(logits[2000:].double()).numpy(), reference.predict_proba(rows[2000:]),
                               atol=1e-9, rtol=0)


def test_one_vs_rest_isotonic_matches_netcal():
    NetcalIsotonic = pytest.importorskip("netcal.binning").IsotonicRegression

    logits, target = over_confident(3000, seed=15)
    probs = logits.double().softmax(1)
    reference = NetcalIsotonic().fit(probs[:2000].numpy(), target[:2000].numpy())
    expected = reference.transform(probs[2000:].numpy())
    assert not np.isnan(expected).any()  # netcal divides by zero for a row whose curves all give 0
    ours = IsotonicCalibration().fit(logits[:2000].double(), target[:2000])(logits[2000:].double())
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-9, rtol=0)


def test_isotonic_curve_matches_scikit_learn_with_tied_scores():
    from sklearn.isotonic import IsotonicRegression

    g = torch.Generator().manual_seed(16)
    score = (torch.rand(2000, generator=g, dtype=torch.float64) * 40).round() / 40  # many ties
    outcome = (torch.rand(2000, generator=g, dtype=torch.float64) < score ** 2).double()
    new = torch.rand(500, generator=g, dtype=torch.float64) * 1.2 - 0.1  # some outside the fitted range
    expected = IsotonicRegression(out_of_bounds="clip").fit(score.numpy(), outcome.numpy()).predict(new.numpy())
    np.testing.assert_allclose(IsotonicCurve().fit(score, outcome)(new).numpy(), expected, atol=1e-12, rtol=0)


def binary_known_distortion(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two classes: true P(y = 1) = p, and the model reports q = p^3 / (p^3 + (1 - p)^3), a monotone distortion.
    Returns (logits of q, target, p)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(n, generator=g, dtype=torch.float64)
    target = (torch.rand(n, generator=g, dtype=torch.float64) < p).long()
    logit_q = 3 * (p.log() - (1 - p).log())
    return torch.stack([torch.zeros(n, dtype=torch.float64), logit_q], 1), target, p


def test_isotonic_regression_undoes_a_known_monotone_distortion():
    logits, target, p = binary_known_distortion(20000, seed=17)
    calibrated = IsotonicCalibration().fit(logits[:10000], target[:10000])(logits[10000:])[:, 1]
    assert (calibrated - p[10000:]).abs().mean() < 0.02
    assert (logits[10000:].softmax(1)[:, 1] - p[10000:]).abs().mean() > 0.05


# --- top-label isotonic and histogram binning -----------------------------------------------------------------------


def top_label_known_distortion(n: int, seed: int, n_classes: int = 4) -> tuple[torch.Tensor, ...]:
    """Rows whose top confidence c ~ U(0.4, 1) is right with probability c^2 (a known monotone distortion), the
    other classes sharing 1 - c. Returns (logits, target, true accuracy of each row)."""
    g = torch.Generator().manual_seed(seed)
    predicted = torch.randint(0, n_classes, (n,), generator=g)
    confidence = 0.4 + 0.6 * torch.rand(n, generator=g, dtype=torch.float64)
    rest = torch.rand(n, n_classes, generator=g, dtype=torch.float64).masked_fill(
        F.one_hot(predicted, n_classes).bool(), 0)
    probs = rest / rest.sum(1, keepdim=True) * (1 - confidence)[:, None]
    probs[torch.arange(n), predicted] = confidence
    accuracy = confidence ** 2
    right = torch.rand(n, generator=g, dtype=torch.float64) < accuracy
    wrong = (predicted + torch.randint(1, n_classes, (n,), generator=g)) % n_classes
    return probs.log(), torch.where(right, predicted, wrong), accuracy


@pytest.mark.parametrize("cls, tolerance", [(TopLabelIsotonic, 0.03), (TopLabelHistogramBinning, 0.06)])
def test_top_label_calibrators_undo_a_known_monotone_distortion_of_the_confidence(cls, tolerance):
    """(Bins of 50 rows hold the noise of a 50-row mean, about 0.05: binning recovers the curve less closely.)"""
    logits, target, accuracy = top_label_known_distortion(24000, seed=18)
    calibrated = cls().fit(logits[:12000], target[:12000])(logits[12000:])
    confidence = calibrated.amax(1)
    assert (confidence - accuracy[12000:]).abs().mean() < tolerance
    assert (logits[12000:].softmax(1).amax(1) - accuracy[12000:]).abs().mean() > 0.1


def test_top_label_isotonic_matches_scikit_learn_per_predicted_class(split):
    from sklearn.isotonic import IsotonicRegression

    (logits, target), (held, _) = split
    probs, held_probs = logits.double().softmax(1), held.double().softmax(1)
    calibrated = TopLabelIsotonic(min_rows=1).fit(logits, target)(held.double())
    floor = lowest_confidence(5)
    for k in range(5):
        fit_rows, rows = probs.argmax(1) == k, held_probs.argmax(1) == k
        reference = IsotonicRegression(out_of_bounds="clip").fit(
            probs[fit_rows].amax(1).numpy(), (target[fit_rows] == k).double().numpy())
        expected = np.clip(reference.predict(held_probs[rows].amax(1).numpy()), floor, 1)
        np.testing.assert_allclose(calibrated[rows, k].numpy(), expected, atol=1e-12, rtol=0)


def test_rare_predicted_classes_share_one_curve_fitted_on_all_rows(split):
    from sklearn.isotonic import IsotonicRegression

    (logits, target), (held, _) = split
    probs, held_probs = logits.double().softmax(1), held.double().softmax(1)
    calibrated = TopLabelIsotonic(min_rows=10**6).fit(logits, target)(held.double())
    pooled = IsotonicRegression(out_of_bounds="clip").fit(probs.amax(1).numpy(),
                                                          (probs.argmax(1) == target).double().numpy())
    expected = np.clip(pooled.predict(held_probs.amax(1).numpy()), lowest_confidence(5), 1)
    np.testing.assert_allclose(calibrated.amax(1).numpy(), expected, atol=1e-12, rtol=0)


def test_equal_width_top_label_binning_matches_netcals_histogram_binning_per_predicted_class(split):
    HistogramBinning = pytest.importorskip("netcal.binning").HistogramBinning

    (logits, target), (held, _) = split
    probs, held_probs = logits.double().softmax(1), held.double().softmax(1)
    ours = TopLabelHistogramBinning(n_bins=10, equal_mass=False, min_rows=1).fit(logits, target)(held.double())
    for k in range(5):
        fit_rows, rows = probs.argmax(1) == k, held_probs.argmax(1) == k
        # netcal's binary mode: scores (n,) and 0/1 outcomes. It fills an empty bin with the bin's midpoint and
        # leaves the other side of a bin edge at fit and at transform time: the data avoid both cases.
        reference = HistogramBinning(bins=10).fit(probs[fit_rows].amax(1).numpy(),
                                                  (target[fit_rows] == k).long().numpy())
        counts = np.histogram(probs[fit_rows].amax(1).numpy(), bins=10, range=(0, 1))[0]
        expected = reference.transform(held_probs[rows].amax(1).numpy())
        filled = counts[np.clip(np.ceil(held_probs[rows].amax(1).numpy() * 10).astype(int) - 1, 0, 9)] > 0
        assert filled.mean() > 0.95
        np.testing.assert_allclose(ours[rows, k].numpy()[filled], np.clip(expected[filled], lowest_confidence(5), 1),
                                   atol=1e-12, rtol=0)


def test_equal_mass_bins_hold_equal_shares_of_the_rows_and_give_their_accuracy():
    g = torch.Generator().manual_seed(19)
    score = torch.rand(1000, generator=g, dtype=torch.float64)
    outcome = (torch.rand(1000, generator=g, dtype=torch.float64) < score).double()
    curve = HistogramCurve(points_per_bin=100).fit(score, outcome)
    order = np.argsort(score.numpy())
    expected_means = [chunk.mean() for chunk in np.array_split(outcome.numpy()[order], 10)]
    np.testing.assert_allclose(curve.values.numpy(), expected_means, atol=1e-12, rtol=0)
    np.testing.assert_allclose(curve(score).numpy()[order], np.repeat(expected_means, 100), atol=1e-12, rtol=0)


def test_spreading_the_rest_keeps_the_top_class_strictly_first_and_sums_to_one():
    g = torch.Generator().manual_seed(20)
    probs = torch.randn(500, 6, generator=g, dtype=torch.float64).mul(2).softmax(1)
    top = probs.argmax(1)
    confidence = lowest_confidence(6) + (1 - lowest_confidence(6)) * torch.rand(500, generator=g, dtype=torch.float64)
    out = spread_rest(probs, top, confidence)
    torch.testing.assert_close(out.sum(1), torch.ones(500, dtype=torch.float64))
    torch.testing.assert_close(out.gather(1, top[:, None]).squeeze(1), confidence)
    others = out.masked_fill(F.one_hot(top, 6).bool(), 0)
    assert bool((others <= confidence[:, None] * (1 - MARGIN) + 1e-15).all())
    assert bool((out.argmax(1) == top).all())
    # Where no cap binds, the others keep their proportions.
    roomy = (probs.masked_fill(F.one_hot(top, 6).bool(), 0) / (1 - probs.amax(1, keepdim=True))
             * (1 - confidence[:, None])).amax(1) < confidence * (1 - MARGIN)
    ratio = others[roomy] / probs[roomy].masked_fill(F.one_hot(top[roomy], 6).bool(), 0)
    spread = ratio.nan_to_num(0).amax(1) - ratio.nan_to_num(math.inf).amin(1)
    assert bool((spread < 1e-12).all())


# --- ensemble temperature scaling --------------------------------------------------------------------------------


def test_ensemble_temperature_scaling_weights_match_an_independent_slsqp_fit(split):
    (logits, target), _ = split
    calibrator = EnsembleTemperatureScaling().fit(logits, target)
    z = logits.double()
    terms = torch.stack([(z / calibrator.temperature).softmax(1), z.softmax(1), torch.full_like(z, 1 / 5)], 2)
    of_target = terms[torch.arange(len(z)), target].numpy()
    # As Zhang et al.'s code: SLSQP on the simplex, from (1, 0, 0).
    result = minimize(lambda w: -np.log(np.clip(of_target @ w, 1e-300, None)).mean(), np.array([1.0, 0.0, 0.0]),
                      method="SLSQP", bounds=[(0, 1)] * 3, constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
                      options={"ftol": 1e-14, "maxiter": 1000})
    np.testing.assert_allclose(calibrator.weights.numpy(), result.x, atol=2e-3)
    scaling = TemperatureScaling().fit(logits, target)
    assert calibrator.temperature == scaling.temperature
    nll = F.nll_loss(calibrator(z).log(), target)
    assert float(nll) <= float(F.cross_entropy(z / scaling.temperature, target)) + 1e-9


def test_a_small_cpu_fit_runs_on_one_thread_and_restores_the_thread_count(monkeypatch):
    seen = []

    class Spy(TemperatureScaling):
        def _fit(self, z, y):
            seen.append(torch.get_num_threads())
            super()._fit(z, y)

    logits, target = over_confident(200, seed=21)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        Spy().fit(logits, target)
        monkeypatch.setattr("fastai_ls.calibration.calibrators.base.ONE_THREAD_WORK", 100)  # now a "large" fit
        Spy().fit(logits, target)
        assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


# --- issue 17: solvers at scale, and issue 20's defects in the calibrators -----------------------------------------


def bisection_temperature(logits: torch.Tensor, target: torch.Tensor) -> float:
    """The previous solver: 100 bisection steps on log(1 / T) for the zero of the NLL's derivative."""
    z = logits.double()
    z_target = z.gather(1, target[:, None]).squeeze(1)
    left, right = -math.log(100.0), -math.log(0.01)
    for _ in range(100):
        middle = (left + right) / 2
        p = (z * math.exp(middle)).softmax(1)
        left, right = (middle, right) if float(((p * z).sum(1) - z_target).mean()) < 0 else (left, middle)
    return math.exp(-(left + right) / 2)


@pytest.mark.parametrize("known", [3.0, 0.4])
def test_temperature_newton_steps_reach_the_bisection_optimum(known):
    true_logits, target = known_probabilities(3000, 20, seed=30)
    logits = (known * true_logits).float()
    temperature = TemperatureScaling().fit(logits, target).temperature
    assert temperature == pytest.approx(bisection_temperature(logits, target), rel=1e-8)


def test_a_large_problem_solved_in_float32_first_reaches_the_float64_optimum(monkeypatch):
    import fastai_ls.calibration.calibrators.scaling as scaling

    logits, target = over_confident(3000, n_classes=10, seed=31)
    double = {name: make(name).fit(logits, target) for name in ("vector", "matrix", "dirichlet")}
    monkeypatch.setattr(scaling, "FLOAT32_FIRST", 0)  # every problem counts as large
    for name, reference in double.items():
        single = make(name).fit(logits, target)
        nll = float(F.cross_entropy(single(logits).log(), target))
        assert nll == pytest.approx(float(F.cross_entropy(reference(logits).log(), target)), abs=1e-5), name


@pytest.mark.parametrize("method", ["temperature", "vector", "matrix", "dirichlet", "ets"])
def test_finite_logits_near_the_float32_limit_give_finite_probabilities(method, fitted, split):
    """Issue 20.18: temperature with T < 1 and Dirichlet gave NaN rows for finite logits near +-3e38."""
    (fit_logits, fit_target), (logits, _) = split
    huge = logits[:6].clone()
    huge[:3, 0], huge[3:, 1] = 3e38, -3e38
    calibrator = make(method).fit(fit_logits / 10, fit_target) if method == "temperature" else fitted[method]
    assert method != "temperature" or calibrator.temperature < 1
    for dtype in (torch.float32, torch.float64):
        probs = calibrator(huge.to(dtype))
        assert probs.isfinite().all() and torch.allclose(probs.sum(1), torch.ones(6, dtype=dtype))
    # the scaling is exact: ordinary logits give the plain formula's probabilities
    if method == "temperature":
        torch.testing.assert_close(calibrator(logits / 10), (logits / 10 / calibrator.temperature).softmax(1))


def test_matrix_scaling_on_too_few_rows_to_choose_reg_does_not_blame_an_option_never_set():
    """Issue 20.19: on 2 rows it said "folds=3 is more than the 2 rows", an inner choice the user never made."""
    logits, target = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    with pytest.warns(CalibrationWarning, match=r"2 rows are too few to hold out a third and choose reg") as caught:
        calibrator = MatrixScaling().fit(logits, target)
    assert not any("folds" in str(w.message) for w in caught)
    assert calibrator.reg_ == 1e4 and calibrator(logits).isfinite().all()


def test_histogram_binning_with_more_bins_than_rows_cuts_at_every_score():
    """Issue 20.23: n_bins=10**7 ran a 29 s Python loop over the cuts."""
    g = torch.Generator().manual_seed(32)
    score = torch.rand(1000, generator=g, dtype=torch.float64)
    outcome = (torch.rand(1000, generator=g, dtype=torch.float64) < score).double()
    curve = HistogramCurve(n_bins=10**7).fit(score, outcome)
    torch.testing.assert_close(curve.edges, score.sort().values)
    torch.testing.assert_close(curve(score), outcome)  # each row alone in its bin
    for n_bins in (3, 999, 1000, 1001, 2000, 2001):  # the vectorised cuts are the previous loop's
        cuts = [round(j * 1000 / n_bins) - 1 for j in range(1, n_bins)]
        expected = torch.unique(score.sort().values[[c for c in cuts if c >= 0]])
        torch.testing.assert_close(HistogramCurve(n_bins=n_bins).fit(score, outcome).edges, expected)


def test_isotonic_curve_matches_scikit_learn_on_fractional_outcomes_and_rare_positives():
    """The runs of non-increasing outcomes pooled before the stack loop give the same fit."""
    from sklearn.isotonic import IsotonicRegression

    g = torch.Generator().manual_seed(33)
    for outcome_of in (lambda s: torch.rand(3000, generator=g, dtype=torch.float64),
                       lambda s: (torch.rand(3000, generator=g, dtype=torch.float64) < s ** 8).double()):
        score = (torch.rand(3000, generator=g, dtype=torch.float64) * 300).round() / 300
        outcome = outcome_of(score)
        new = torch.rand(700, generator=g, dtype=torch.float64)
        expected = IsotonicRegression(out_of_bounds="clip").fit(score.numpy(), outcome.numpy()).predict(new.numpy())
        np.testing.assert_allclose(IsotonicCurve().fit(score, outcome)(new).numpy(), expected, atol=1e-12, rtol=0)


def test_matrix_scaling_refuses_more_classes_than_max_classes_before_fitting():
    logits, target = torch.randn(40, 30), torch.arange(40) % 30
    with pytest.raises(ValueError, match=r"matrix: 30 classes are more than max_classes=20: W has 900 weights"):
        MatrixScaling(max_classes=20).fit(logits, target)
    assert MatrixScaling().skip_reason(40_000, 1000) is not None and MatrixScaling().skip_reason(8000, 100) is None


def many_class_outputs(n: int, n_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Over-confident outputs of a many-class model: a favourite class per row (right about 70% of the time),
    labels drawn from the true probabilities, logits twice too sharp with a per-class bias and some noise."""
    g = torch.Generator().manual_seed(seed)
    true_logits = torch.randn(n, n_classes, generator=g)
    true_logits[torch.arange(n), torch.randint(0, n_classes, (n,), generator=g)] += 6.0
    target = torch.multinomial(true_logits.softmax(1), 1, generator=g).squeeze(1)
    logits = 2 * true_logits + 0.3 * torch.randn(n, n_classes, generator=g) + 0.5 * torch.randn(n_classes, generator=g)
    return logits, target


def test_matrix_and_dirichlet_are_never_worse_than_uncalibrated_out_of_fold_at_100_classes():
    """Issue 17: cross-fitted on CIFAR-100 outputs, matrix scaling came out worse than no calibration."""
    from fastai_ls.calibration.compare import compare_on_logits

    logits, target = many_class_outputs(3000, 100, seed=34)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        table = compare_on_logits(logits, target, methods=["temperature", "matrix", "dirichlet"], folds=2,
                                    ci=None, progress=False)
    # 15 rows per class for each fit: the fits can only just match temperature scaling's one parameter
    for name in ("matrix", "dirichlet"):
        assert table.loc[name, "nll"] < table.loc["uncalibrated", "nll"] - 0.5
        assert table.loc[name, "nll"] < table.loc["temperature", "nll"] + 0.05
