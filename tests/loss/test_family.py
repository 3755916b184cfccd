"""The calibration-loss family (focal, FLSD-53, AdaFocal, MbLS, MaxSup, LogitNorm, confidence penalty): each loss
equals a direct, row-by-row implementation of its paper's formula and gradient in float64, over class weights,
ignored rows, reductions, N-D inputs and class counts; equals cross-entropy or label smoothing where its parameters
reduce it to them; its hooks work on the class axis; bad arguments raise before any arithmetic."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from fastai_ls import (
    AdaFocalLoss,
    AdaFocalLossFlat,
    AdaptiveFocalLoss,
    AdaptiveFocalLossFlat,
    ConfidencePenaltyLoss,
    ConfidencePenaltyLossFlat,
    FocalLoss,
    FocalLossFlat,
    LabelSmoothingCrossEntropy,
    LogitNormLoss,
    LogitNormLossFlat,
    MarginLabelSmoothing,
    MarginLabelSmoothingFlat,
    MaxSupLoss,
    MaxSupLossFlat,
    ada_focal_loss,
    adaptive_focal_loss,
    confidence_penalty_loss,
    focal_loss,
    logitnorm_loss,
    margin_label_smoothing,
    maxsup_loss,
)
from fastai_ls.loss import base
from fastai_ls.loss.adafocal import ada_focal_update, equal_mass_bins

# --- the papers' formulas, one row at a time ------------------------------------------------------------------------
# Each gives, for one row of logits z (C,), the per-class term f (C,) and the row penalty R (a scalar): the row's
# loss is sum_c w_c q_c f_c + (sum_c w_c q_c) R for the target q.


def focal_terms(gamma):
    def terms(z):
        p = torch.softmax(z, 0)
        return -(1 - p) ** gamma * torch.log_softmax(z, 0), 0.0
    return terms


def flsd_terms(z):
    p = torch.softmax(z, 0)
    gamma = torch.tensor([5.0 if v < 0.2 else 3.0 for v in p.tolist()], dtype=z.dtype)
    return -(1 - p) ** gamma * torch.log_softmax(z, 0), 0.0


def adafocal_terms(gammas, edges, switch):
    def terms(z):
        p = torch.softmax(z, 0)
        factors = []
        for pc in p:
            b = next(i for i in range(len(gammas)) if edges[i + 1] >= pc.item() or i == len(gammas) - 1)
            g = gammas[b]
            factors.append((1 - pc) ** g if g >= switch else (1 + pc) ** abs(g))
        return -torch.stack(factors) * torch.log_softmax(z, 0), 0.0
    return terms


def mbls_terms(margin, alpha):
    def terms(z):
        return -torch.log_softmax(z, 0), alpha * torch.clamp(z.max() - z - margin, min=0).mean()
    return terms


def maxsup_terms(alpha):
    def terms(z):
        return -torch.log_softmax(z, 0), alpha * (z.max() - z.mean())
    return terms


def logitnorm_terms(tau):
    def terms(z):
        return -torch.log_softmax(z / (tau * (torch.sqrt((z * z).sum()) + 1e-7)), 0), 0.0
    return terms


def confidence_penalty_terms(beta):
    def terms(z):
        p = torch.softmax(z, 0)
        return -torch.log_softmax(z, 0), -beta * -(p * torch.log(p)).sum()
    return terms


def reference(terms, x, target, weight=None, reduction="mean", ignore_index=-100, eps=0.0, z_loss=0.0):
    """The loss from the row formula (plus the z-loss z_loss * logsumexp(z)^2 in the row penalty), with PyTorch's
    weight / ignore_index / reduction conventions."""
    c = x.shape[1]
    rows = x.movedim(1, -1).reshape(-1, c)
    soft = target.is_floating_point()
    targets = target.movedim(1, -1).reshape(-1, c) if soft else target.reshape(-1)
    w = torch.ones(c, dtype=x.dtype) if weight is None else weight.to(x.dtype)
    losses, divisor = [], 0.0
    for z, t in zip(rows, targets):
        if not soft and t.item() == ignore_index:
            losses.append(z.sum() * 0.0)
            continue
        q = t if soft else F.one_hot(t, c).to(x.dtype)
        q = (1 - eps) * q + eps / c
        f, r = terms(z)
        r = r + z_loss * torch.logsumexp(z, 0) ** 2
        losses.append((w * q * f).sum() + (w * q).sum() * r)
        divisor += 1.0 if soft else w[t].item()
    loss = torch.stack(losses)
    if reduction == "none":
        return loss.reshape(x.shape[:1] + x.shape[2:])
    return loss.sum() if reduction == "sum" else loss.sum() / divisor


GAMMAS = torch.tensor([-1.5, 0.1, 0.5, 2.0], dtype=torch.float64)
EDGES = torch.tensor([0.0, 0.1, 0.3, 0.6, 1.0], dtype=torch.float64)

# name -> (functional form with its parameters, the row formula, the class with the same parameters)
LOSSES = {
    "focal": (lambda x, y, **kw: focal_loss(x, y, 3.0, **kw), focal_terms(3.0), FocalLoss()),
    "focal_gamma_half": (lambda x, y, **kw: focal_loss(x, y, 0.5, **kw), focal_terms(0.5), FocalLoss(0.5)),
    "flsd53": (adaptive_focal_loss, flsd_terms, AdaptiveFocalLoss()),
    "adafocal": (lambda x, y, **kw: ada_focal_loss(x, y, GAMMAS, EDGES, 0.2, **kw),
                 adafocal_terms(GAMMAS.tolist(), EDGES.tolist(), 0.2), None),
    "mbls": (lambda x, y, **kw: margin_label_smoothing(x, y, 1.0, 0.3, **kw), mbls_terms(1.0, 0.3),
             MarginLabelSmoothing(1.0, 0.3)),
    "maxsup": (lambda x, y, **kw: maxsup_loss(x, y, 0.2, **kw), maxsup_terms(0.2), MaxSupLoss(0.2)),
    "logitnorm": (lambda x, y, **kw: logitnorm_loss(x, y, 0.3, **kw), logitnorm_terms(0.3), LogitNormLoss(0.3)),
    "confidence_penalty": (lambda x, y, **kw: confidence_penalty_loss(x, y, 0.5, **kw),
                           confidence_penalty_terms(0.5), ConfidencePenaltyLoss(0.5)),
}
CLASSES = [FocalLoss, AdaptiveFocalLoss, AdaFocalLoss, MarginLabelSmoothing, MaxSupLoss, LogitNormLoss,
           ConfidencePenaltyLoss]
FLATS = [FocalLossFlat, AdaptiveFocalLossFlat, AdaFocalLossFlat, MarginLabelSmoothingFlat, MaxSupLossFlat,
         LogitNormLossFlat, ConfidencePenaltyLossFlat]


def batch(shape, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).requires_grad_()
    positions = shape[:1] + shape[2:]
    y = torch.randint(0, shape[1], positions, generator=g)
    if ignore and y.numel() > 2:
        y.view(-1)[1] = -100
    return x, y


def assert_same_value_and_gradient(loss, expected, x):
    assert loss.shape == expected.shape
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-10)
    g = torch.randn(loss.shape, dtype=torch.float64) if loss.dim() else torch.tensor(1.0, dtype=torch.float64)
    (grad,) = torch.autograd.grad(loss, x, g, retain_graph=True)
    (expected_grad,) = torch.autograd.grad(expected, x, g)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 2, 3), (5, 1), (4, 2)])
def test_each_loss_equals_its_formula_and_gradient(name, reduction, weighted, shape):
    func, terms, _ = LOSSES[name]
    if shape[1] == 1 and name == "focal_gamma_half":
        pytest.skip("(1 - p)^0.5 has no derivative at p = 1: see test_one_class_gives_zero_loss_and_gradient")
    x, y = batch(shape)
    weight = torch.rand(shape[1], dtype=torch.float64) + 0.2 if weighted else None
    loss = func(x, y, weight=weight, reduction=reduction)
    expected = reference(terms, x, y, weight, reduction)
    assert_same_value_and_gradient(loss, expected, x)


FUSED = [(FocalLoss, dict(gamma=2.0)), (AdaptiveFocalLoss, {}), (MarginLabelSmoothing, dict(margin=1.0, alpha=0.2)),
         (MaxSupLoss, dict(alpha=0.3)), (LogitNormLoss, dict(tau=0.5)), (ConfidencePenaltyLoss, dict(beta=0.4)),
         (FocalLoss, dict(gamma=2.0, eps=0.1)), (AdaptiveFocalLoss, dict(threshold=0.3, gamma_above=1.0, eps=0.1)),
         (AdaptiveFocalLoss, dict(gamma_below=4.0)), (FocalLoss, dict(z_loss=1e-2)),
         (MaxSupLoss, dict(alpha=0.3, z_loss=1e-2)), (LogitNormLoss, dict(tau=0.5, z_loss=1e-2)),
         (ConfidencePenaltyLoss, dict(beta=0.4, z_loss=1e-2)), (AdaFocalLoss, {}),
         (AdaFocalLoss, dict(n_bins=3, gamma_init=-1.0, z_loss=1e-2))]
FUSED_IDS = [cls.__name__ + "".join(f"-{k}{v}" for k, v in params.items()) for cls, params in FUSED]


def count_fused_calls(monkeypatch):
    """A list that grows by one at every call of `fused_family_loss` from the family's functional forms."""
    calls = []
    fused = base.fused_family_loss
    monkeypatch.setattr(base, "fused_family_loss", lambda *args, **kw: calls.append(args[0]) or fused(*args, **kw))
    return calls


@pytest.mark.parametrize("cls, params", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 2, 3)])
def test_class_id_targets_run_the_fused_loss_with_the_torch_paths_value_and_gradient(cls, params, reduction, shape,
                                                                                      monkeypatch):
    x, y = batch(shape)
    module = cls(**params, weight=torch.rand(shape[1], dtype=torch.float64) + 0.2)
    calls = count_fused_calls(monkeypatch)
    fused = module(x, y, reduction=reduction)
    assert len(calls) == 1
    if reduction != "none":
        assert fused.grad_fn.name() == "FusedLossBackward"
    monkeypatch.setattr(base, "runs_fused", lambda *args: False)
    expected = module(x, y, reduction=reduction)
    assert len(calls) == 1
    assert_same_value_and_gradient(fused, expected, x)


@pytest.mark.parametrize("cls, params", FUSED, ids=FUSED_IDS)
def test_float32_class_id_targets_give_the_torch_paths_value_and_gradient_on_the_fused_path(cls, params,
                                                                                              monkeypatch):
    x, y = batch((16, 7))
    x = x.detach().float().requires_grad_()
    module = cls(**params)
    fused = module(x, y)
    assert fused.grad_fn.name() == "FusedLossBackward"
    monkeypatch.setattr(base, "runs_fused", lambda *args: False)
    expected = module(x, y)
    torch.testing.assert_close(fused, expected)
    torch.testing.assert_close(*(torch.autograd.grad(loss, x)[0] for loss in (fused, expected)))


def test_probability_targets_run_the_torch_path(monkeypatch):
    x, _ = batch((6, 5))
    calls = count_fused_calls(monkeypatch)
    MaxSupLoss()(x, torch.softmax(torch.randn(6, 5, dtype=torch.float64), 1))
    assert calls == []


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_each_loss_with_a_z_loss_equals_its_formula(name, reduction):
    func, terms, _ = LOSSES[name]
    x, y = batch((3, 5, 2), seed=15)
    weight = torch.rand(5, dtype=torch.float64) + 0.2
    loss = func(x, y, weight=weight, reduction=reduction, z_loss=0.01)
    assert_same_value_and_gradient(loss, reference(terms, x, y, weight, reduction, z_loss=0.01), x)


@pytest.mark.parametrize("cls", CLASSES)
def test_the_class_passes_its_z_loss_on(cls):
    x, y = batch((6, 4), seed=16)
    plain, with_z = cls()(x, y, reduction="none"), cls(z_loss=0.1)(x, y, reduction="none")
    kept = y != -100
    torch.testing.assert_close((with_z - plain)[kept], 0.1 * torch.logsumexp(x, 1)[kept].detach() ** 2)
    assert "z_loss=0.1" in repr(cls(z_loss=0.1))


@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_passes_gradcheck(name):
    func = LOSSES[name][0]
    x, y = batch((4, 5), seed=1)
    weight = torch.rand(5, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda x: func(x, y, weight=weight, reduction="none"), (x,))


@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_equals_its_formula_on_probability_targets(name):
    func, terms, _ = LOSSES[name]
    x, _ = batch((5, 4), seed=2)
    q = torch.softmax(torch.randn(5, 4, dtype=torch.float64), 1)
    weight = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64)
    for reduction in ("mean", "none"):
        assert_same_value_and_gradient(func(x, q, weight=weight, reduction=reduction),
                                       reference(terms, x, q, weight, reduction), x)


@pytest.mark.parametrize("name", ["focal", "mbls", "maxsup", "logitnorm", "confidence_penalty"])
def test_large_class_counts(name):
    func, terms, _ = LOSSES[name]
    x, y = batch((2, 100_000), seed=3, ignore=False)
    assert_same_value_and_gradient(func(x, y, reduction="sum"), reference(terms, x, y, reduction="sum"), x)


def test_focal_with_label_smoothing_equals_its_formula():
    x, y = batch((6, 5), seed=4)
    weight = torch.rand(5, dtype=torch.float64) + 0.2
    for eps, func, terms in [(0.1, focal_loss, focal_terms(3.0)), (0.2, adaptive_focal_loss, flsd_terms)]:
        loss = func(x, y, eps=eps, weight=weight)
        assert_same_value_and_gradient(loss, reference(terms, x, y, weight, eps=eps), x)


# --- where each loss reduces to cross-entropy or label smoothing ----------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_losses_at_their_neutral_parameters_equal_cross_entropy(reduction):
    x, y = batch((3, 6, 4), seed=5)
    weight = torch.rand(6, dtype=torch.float64) + 0.1
    for loss in [focal_loss(x, y, gamma=0.0, weight=weight, reduction=reduction),
                 adaptive_focal_loss(x, y, gamma_below=0.0, gamma_above=0.0, weight=weight, reduction=reduction),
                 ada_focal_loss(x, y, torch.zeros(3), switch=0.0, weight=weight, reduction=reduction),
                 margin_label_smoothing(x, y, alpha=0.0, weight=weight, reduction=reduction),
                 maxsup_loss(x, y, alpha=0.0, weight=weight, reduction=reduction),
                 confidence_penalty_loss(x, y, beta=0.0, weight=weight, reduction=reduction)]:
        assert_same_value_and_gradient(loss, F.cross_entropy(x, y, weight=weight, reduction=reduction), x)


def test_focal_at_gamma_zero_equals_label_smoothing():
    x, y = batch((8, 5), seed=6)
    weight = torch.rand(5, dtype=torch.float64) + 0.1
    ls = LabelSmoothingCrossEntropy(eps=0.1, weight=weight, fused=False)
    assert_same_value_and_gradient(FocalLoss(gamma=0.0, eps=0.1, weight=weight)(x, y), ls(x, y), x)
    torch.testing.assert_close(focal_loss(x, y, 0.0, 0.1), F.cross_entropy(x, y, label_smoothing=0.1), rtol=0,
                               atol=1e-12)


def test_adaptive_and_ada_focal_with_one_gamma_equal_focal():
    x, y = batch((8, 5), seed=7)
    expected = focal_loss(x, y, gamma=2.0)
    torch.testing.assert_close(adaptive_focal_loss(x, y, gamma_below=2.0, gamma_above=2.0), expected, rtol=0,
                               atol=1e-12)
    torch.testing.assert_close(ada_focal_loss(x, y, torch.full((15,), 2.0)), expected, rtol=0, atol=1e-12)


def test_ada_focal_below_the_switch_is_inverse_focal():
    x, y = batch((8, 5), seed=8, ignore=False)
    p_y = torch.softmax(x, 1).gather(1, y[:, None]).squeeze(1)
    expected = (-(1 + p_y) ** 1.5 * torch.log_softmax(x, 1).gather(1, y[:, None]).squeeze(1)).mean()
    torch.testing.assert_close(ada_focal_loss(x, y, torch.full((4,), -1.5)), expected, rtol=0, atol=1e-12)


def test_logitnorm_ignores_the_logits_scale():
    x, y = batch((8, 5), seed=9)
    torch.testing.assert_close(logitnorm_loss(x, y, 0.1), logitnorm_loss(x * 50, y, 0.1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("cls", CLASSES)
def test_one_class_gives_zero_loss_and_gradient(cls):
    x = torch.randn(4, 1, dtype=torch.float64, requires_grad=True)
    module = cls(gamma=0.5) if cls is FocalLoss else cls()
    loss = module(x, torch.zeros(4, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("cls", [FocalLoss, AdaptiveFocalLoss, AdaFocalLoss, ConfidencePenaltyLoss])
def test_a_minus_inf_logit_on_a_wrong_class_gives_a_finite_loss_and_gradient(cls):
    # A masked class (logit -inf) has p = 0: the focal terms read only p_y, and the entropy's 0 log 0 is 0.
    x = torch.tensor([[1.0, 2.0, -math.inf], [0.0, 3.0, 1.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1])
    loss = cls()(x, y)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    far = torch.tensor([[1.0, 2.0, -1e4], [0.0, 3.0, 1.0]], dtype=torch.float64)  # p = 0 in float64 as well
    torch.testing.assert_close(loss, cls()(far, y), rtol=0, atol=1e-12)


def test_focal_is_finite_for_a_certain_prediction():
    x = torch.tensor([[0.0, 800.0, 0.0]], dtype=torch.float64, requires_grad=True)
    loss = focal_loss(x, torch.tensor([1]))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(x.grad).all()


# --- layouts, dtypes, ignored rows, the caller's tensors ------------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES)
def test_ignored_rows_contribute_no_loss_and_no_gradient(cls):
    x, y = batch((6, 4), seed=10)
    y[:] = torch.tensor([0, -100, 2, -100, 3, 1])
    x_kept = x.detach()[[0, 2, 4, 5]].clone().requires_grad_()
    loss = cls()(x, y)
    loss.backward()
    assert (x.grad[[1, 3]] == 0).all()
    torch.testing.assert_close(loss, cls()(x_kept, y[[0, 2, 4, 5]]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", CLASSES)
def test_only_ignored_rows_give_nan_mean_like_pytorch(cls):
    x = torch.randn(3, 4, dtype=torch.float64)
    y = torch.full((3,), -100)
    assert math.isnan(cls()(x, y).item()) and math.isnan(F.cross_entropy(x, y).item())
    assert cls()(x, y, reduction="sum").item() == 0.0


@pytest.mark.parametrize("cls", CLASSES)
def test_half_precision_logits_give_a_float32_loss(cls):
    x, y = torch.randn(6, 5).half(), torch.randint(0, 5, (6,))
    loss = cls()(x, y)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, cls()(x.float(), y))


@pytest.mark.parametrize("cls", CLASSES)
def test_the_callers_tensors_are_not_changed(cls):
    x, y = batch((6, 4), seed=11)
    weight = torch.rand(4, dtype=torch.float64)
    copies = [t.detach().clone() for t in (x, y, weight)]
    module = cls(weight=weight)
    module(x, y).backward()
    module.weight.mul_(2)
    for t, c in zip((x, y, weight), copies):
        assert torch.equal(t.detach(), c)


@pytest.mark.parametrize("flat, cls", list(zip(FLATS, CLASSES)))
def test_flat_twin_takes_the_class_axis_last_and_flattens(flat, cls):
    x, _ = batch((2, 3, 5), seed=12)  # (N, T, C) with C = 5 last
    y = torch.tensor([[0, -100, 4], [3, 2, 1]])
    x_first = x.detach().movedim(-1, 1)
    torch.testing.assert_close(flat()(x, y, reduction="none"), cls()(x_first, y, reduction="none").reshape(-1))
    torch.testing.assert_close(flat()(x, y), cls()(x_first, y))
    x4, y4 = batch((2, 5, 3, 3), seed=13)
    torch.testing.assert_close(flat(axis=1)(x4, y4), cls()(x4, y4))
    x2, y2 = batch((6, 4), seed=14)
    torch.testing.assert_close(flat()(x2, y2[:, None]), cls()(x2, y2))  # fastai tabular's (bs, 1) targets


@pytest.mark.parametrize("flat, cls", list(zip(FLATS, CLASSES)))
def test_hooks_work_on_the_class_axis(flat, cls):
    out = torch.randn(2, 5, 3, 4)
    torch.testing.assert_close(cls().activation(out), torch.softmax(out, 1))
    assert torch.equal(cls().decodes(out), out.argmax(1))
    torch.testing.assert_close(flat().activation(out), torch.softmax(out, -1))
    assert torch.equal(flat(axis=1).decodes(out), out.argmax(1))
    assert cls.y_int is True


@pytest.mark.parametrize("cls", CLASSES + FLATS)
def test_reduction_is_a_plain_attribute_and_the_module_pickles(cls):
    module = cls(weight=torch.ones(4))
    x, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    module.reduction = "none"
    assert module(x, y).shape == (6,)
    module.reduction = "mean"
    loaded = pickle.loads(pickle.dumps(module))
    torch.testing.assert_close(loaded(x, y), module(x, y))
    assert "reduction='mean'" in repr(module)


def test_weight_is_a_buffer_that_moves_with_the_module():
    module = FocalLoss(weight=torch.ones(3))
    assert "weight" in dict(module.named_buffers())
    assert module.double().weight.dtype == torch.float64


# --- bad arguments ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, message", [
    (lambda: FocalLoss(gamma=-1.0), "gamma must be >= 0"),
    (lambda: FocalLoss(gamma=float("nan")), "gamma must be finite"),
    (lambda: FocalLoss(gamma="2"), "gamma must be a real number"),
    (lambda: FocalLoss(eps=1.0), "eps must be in"),
    (lambda: AdaptiveFocalLoss(threshold=1.5), "threshold must be >= 0 and <= 1"),
    (lambda: AdaptiveFocalLoss(gamma_below=-2), "gamma_below must be >= 0"),
    (lambda: MarginLabelSmoothing(margin=-1.0), "margin must be >= 0"),
    (lambda: MarginLabelSmoothing(alpha=-0.1), "alpha must be >= 0"),
    (lambda: MaxSupLoss(alpha=-0.1), "alpha must be >= 0"),
    (lambda: LogitNormLoss(tau=0.0), "tau must be > 0"),
    (lambda: LogitNormLoss(tau=-1.0), "tau must be > 0"),
    (lambda: ConfidencePenaltyLoss(beta=-0.5), "beta must be >= 0"),
    (lambda: AdaFocalLoss(n_bins=0), "n_bins must be a positive int"),
    (lambda: AdaFocalLoss(lam=0.0), "lam must be > 0"),
    (lambda: AdaFocalLoss(gamma_init=30.0), "gamma_init must be >= -2 and <= 20"),
    (lambda: MaxSupLoss(reduction="avg"), "reduction must be one of"),
    (lambda: MaxSupLoss(ignore_index=1.5), "ignore_index must be an int"),
    (lambda: FocalLoss(weight=torch.tensor([1.0, -1.0])), "weight must be finite and non-negative"),
    (lambda: MaxSupLossFlat(axis=1.0), "axis must be an int"),
    (lambda: MarginLabelSmoothing(z_loss=-1e-4), "z_loss must be >= 0"),
])
def test_bad_arguments_raise_a_clear_error(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


@pytest.mark.parametrize("name", LOSSES)
def test_bad_inputs_raise_before_any_arithmetic(name):
    func = LOSSES[name][0]
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="target ids must be in"):
        func(x, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(ValueError, match="weight has 2 entries"):
        func(x, torch.tensor([0, 1, 2, 2]), weight=torch.ones(2))
    with pytest.raises(ValueError, match="integer target must have shape"):
        func(x, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="floating-point logits"):
        func(torch.ones(4, 3, dtype=torch.long), torch.tensor([0, 1, 2, 2]))


def test_a_parameter_set_to_a_bad_value_after_construction_raises_at_the_call():
    module = FocalLoss()
    module.gamma = -1.0
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        module(torch.randn(2, 3), torch.tensor([0, 1]))


# --- AdaFocal's bins and update -------------------------------------------------------------------------------------


def test_equal_mass_bins_merge_fine_cells_into_bins_of_about_equal_count():
    fine = torch.zeros(10, 3, dtype=torch.float64)
    fine[:, 0] = torch.tensor([0, 0, 5, 0, 0, 0, 0, 1, 1, 3.0])
    fine[:, 1] = fine[:, 0] * (torch.arange(10) + 0.5) / 10
    fine[:, 2] = torch.tensor([0, 0, 1, 0, 0, 0, 0, 1, 0, 3.0])
    edges, bins = equal_mass_bins(fine, 3)
    torch.testing.assert_close(edges, torch.tensor([0.0, 0.3, 0.9, 1.0], dtype=torch.float64))
    torch.testing.assert_close(bins, torch.tensor([[5, 1.25, 1], [2, 1.6, 1], [3, 2.85, 3]], dtype=torch.float64))


def test_ada_focal_update_steps_each_bin_from_its_calibration_error():
    gammas = torch.tensor([1.0, 0.1, 4.0, 19.0], dtype=torch.float64)
    bins = torch.tensor([[10, 9, 7], [10, 3, 5], [0, 0, 0], [10, 10, 0]], dtype=torch.float64)
    new = ada_focal_update(gammas, bins)
    expected = [1.0 * math.exp(0.2), 0.1 - 0.2, 4.0, 20.0]  # multiplicative, additive, empty, clipped
    torch.testing.assert_close(new, torch.tensor(expected, dtype=torch.float64))
    assert gammas[0] == 1.0  # a new tensor


def test_ada_focal_loss_update_reads_fine_counters_into_its_buffers():
    loss = AdaFocalLoss(n_bins=2)
    fine = torch.zeros(4, 3, dtype=torch.float64)
    fine[:, 0] = torch.tensor([2, 2, 2, 2.0])
    fine[:, 1] = fine[:, 0] * torch.tensor([0.1, 0.4, 0.6, 0.9])
    fine[:, 2] = torch.tensor([0, 0, 2, 2.0])
    loss.update(fine)
    torch.testing.assert_close(loss.edges, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(loss.gammas, torch.tensor([math.exp(0.25), math.exp(-0.25)], dtype=torch.float64))
    before = loss.gammas.clone()
    loss.update(torch.zeros(4, 3, dtype=torch.float64))  # an empty pass changes nothing
    assert torch.equal(loss.gammas, before)
