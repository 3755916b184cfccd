"""The calibration-loss family under hostile input: every path of a loss (fused on class ids, torch operations for
probability targets, z-losses, smoothing and AdaFocal) reports the same thing for the same input, including where
the input has no finite answer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastai_ls import (
    AdaFocalLoss,
    AdaptiveFocalLoss,
    ConfidencePenaltyLoss,
    FocalLoss,
    LabelSmoothingCrossEntropy,
    LogitNormLoss,
    MarginLabelSmoothing,
    MaxSupLoss,
)
from fastai_ls.calibration import CalibrationState
from fastai_ls.loss.adafocal import ada_focal_loss, ada_focal_update

CLASSES = [FocalLoss, AdaptiveFocalLoss, AdaFocalLoss, MarginLabelSmoothing, MaxSupLoss, LogitNormLoss,
           ConfidencePenaltyLoss]


def minus_inf_on_the_true_class(dtype=torch.float64):
    x = torch.randn(3, 4, dtype=dtype, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2])
    x[0, 0] = -math.inf
    return x, y


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_infinite_row_loss_is_nan_on_every_path_as_for_label_smoothing(cls, dtype):
    # p_y = 0: the row's loss is +inf, which the label-smoothing loss and the fused kernels report as NaN. The torch
    # path (probability targets, z-losses, smoothing, AdaFocal) reported +inf for the same row.
    x, y = minus_inf_on_the_true_class(dtype)
    assert math.isnan(LabelSmoothingCrossEntropy(eps=0.0, reduction="none")(x, y)[0].item())
    for target in (y, F.one_hot(y, 4).to(dtype)):
        for module in (cls(reduction="none"), cls(reduction="none", z_loss=1e-3)):
            loss = module(x, target)
            assert math.isnan(loss[0].item()), (module, target.dtype, loss)
            assert loss[1:].isfinite().all()
    assert math.isnan(FocalLoss(eps=0.1)(x, y).item())


@pytest.mark.parametrize("gammas, edges", [
    (torch.full((3,), math.nan), None),
    (torch.full((3,), math.inf), None),  # (1 - p)^inf: every row's loss was 0
    (torch.ones(3), torch.tensor([0.0, 0.9, 0.1, 1.0])),  # out of order: bucketize's answer is undefined
    (torch.ones(3), torch.tensor([0.0, math.nan, 0.5, 1.0])),
    (torch.ones(3), torch.tensor([0.2, 0.4, 0.6, 0.8])),  # not from 0 to 1
])
def test_ada_focal_loss_rejects_non_finite_gammas_and_bad_edges(gammas, edges):
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 1])
    with pytest.raises(ValueError, match="gammas must be finite|edges must be non-decreasing from 0 to 1"):
        ada_focal_loss(x, y, gammas, edges)


def test_ada_focal_loss_module_rejects_gammas_set_to_nan_after_construction():
    loss = AdaFocalLoss(n_bins=3)
    loss.gammas = torch.full((3,), math.nan, dtype=torch.float64)
    with pytest.raises(ValueError, match="gammas must be finite"):
        loss(torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 1]))


@pytest.mark.parametrize("fine, message", [
    (torch.tensor([[math.nan, 5.0, 4.0], [10.0, 9.0, 9.0]]), "finite counters"),  # edges became [0, 1, 1, 1]
    (torch.tensor([[10.0, math.inf, 4.0], [10.0, 9.0, 9.0]]), "finite counters"),  # a NaN gamma
    (torch.tensor([[-10.0, 5.0, 4.0], [10.0, 9.0, 9.0]]), "finite counters"),
    (torch.tensor([[10.0, 5.0, 40.0], [10.0, 9.0, 9.0]]), "number correct <= count"),
    (torch.tensor([[10.0, 5.0], [10.0, 9.0]]), r"\(K, 3\)"),
    (torch.tensor([10.0, 5.0, 4.0]), r"\(K, 3\)"),
])
def test_ada_focal_update_rejects_counters_that_are_not_counts_and_changes_nothing(fine, message):
    loss = AdaFocalLoss(n_bins=2)
    before = [loss.gammas.clone(), loss.edges.clone()]
    with pytest.raises(ValueError, match=message):
        loss.update(fine)
    assert torch.equal(loss.gammas, before[0]) and torch.equal(loss.edges, before[1])
    with pytest.raises(ValueError, match=message):
        ada_focal_update(torch.ones(fine.shape[0] if fine.dim() == 2 else 1), fine)


@pytest.mark.parametrize("name, value, message", [
    ("lam", -1.0, "lam must be > 0"),  # stepped every gamma the wrong way
    ("lam", math.nan, "lam must be finite"),  # made every gamma NaN
    ("gamma_max", math.nan, "gamma_max must be finite"),
    ("gamma_min", math.inf, "gamma_min must be finite"),
    ("switch", math.nan, "switch must be finite"),
])
def test_ada_focal_update_checks_an_option_set_after_construction_and_changes_nothing(name, value, message):
    loss = AdaFocalLoss(n_bins=2)
    setattr(loss, name, value)
    before = loss.gammas.clone()
    with pytest.raises(ValueError, match=message):
        loss.update(torch.tensor([[10.0, 5.0, 4.0], [10.0, 9.0, 9.0], [5.0, 4.5, 1.0]]))
    assert torch.equal(loss.gammas, before)


def test_ada_focal_update_needs_one_row_of_counters_per_gamma():
    # One gamma broadcast against four bins gave four gammas.
    with pytest.raises(ValueError, match="bins has 4 rows for 1 gammas"):
        ada_focal_update(torch.ones(1), torch.tensor([[10.0, 5.0, 4.0]] * 4))


@pytest.mark.parametrize("cls, options", [(MaxSupLoss, {"alpha": 0.3}),
                                          (MarginLabelSmoothing, {"margin": 1.0, "alpha": 0.5})])
def test_tied_largest_logits_get_the_same_gradient_on_the_fused_and_the_torch_path(cls, options):
    # All-equal logits (a zero-initialized head's first step) or a tie for the largest: z_max's gradient goes to the
    # first largest logit in the kernels (and the papers' max(dim)); the torch path's amax shared it among the tied.
    x = torch.zeros(4, 10, dtype=torch.float64)
    x[2:, :3] = 5.0
    y = torch.tensor([0, 4, 1, 5])
    grads = []
    for target in (y, F.one_hot(y, 10).to(x.dtype)):
        a = x.clone().requires_grad_()
        cls(**options)(a, target).backward()
        grads.append(a.grad)
    grads.append(torch.func.grad(lambda a: cls(**options)(a, y))(x))
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[2], grads[0], rtol=0, atol=1e-12)


def test_ada_focal_update_takes_the_counters_of_a_probability_row_that_misses_one_by_a_little():
    # CalibrationState keeps rows within 1e-3 of summing to 1 as they are: a cell's confidence sum may pass its count.
    state = CalibrationState(2)
    state.update(torch.tensor([[1.0005, 0.0], [0.3, 0.7]]), torch.tensor([0, 1]))
    loss = AdaFocalLoss(n_bins=2)
    loss.update(state.fine)
    assert loss.gammas.isfinite().all() and not torch.equal(loss.gammas, torch.ones(2, dtype=torch.float64))


def test_ada_focal_loss_checks_gammas_batched_by_vmap_and_computes_each_sample():
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 1])
    gammas = torch.tensor([[0.5, 1.0, 3.0], [0.0, 2.0, 5.0]])
    batched = torch.func.vmap(lambda g: ada_focal_loss(x, y, g))(gammas)
    torch.testing.assert_close(batched, torch.stack([ada_focal_loss(x, y, g) for g in gammas]))
    gammas[1, 0] = math.nan
    with pytest.raises(ValueError, match="gammas must be finite"):
        torch.func.vmap(lambda g: ada_focal_loss(x, y, g))(gammas)


@pytest.mark.parametrize("kind", [FocalLoss, AdaptiveFocalLoss])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_smoothed_focal_gradient_at_huge_logits_is_the_formulas_on_the_blockwise_backend(kind, dtype):
    # log p was x - (max + log s): at |x| ~ 1e30, max + log s rounds to max, so log p of the two largest classes
    # read 0 (p = 1) and their focal factors 0; the gradient of the true class lost its focal part.
    x = torch.tensor([[1e30, -1e30, 0.0, 1e30], [3e8, 0.0, -3e8, 3e8]], dtype=dtype)
    y = torch.tensor([0, 3])
    module = kind(eps=0.1, reduction="sum")
    fused, formula = x.clone().requires_grad_(), x.clone().requires_grad_()
    module(fused, y).backward()
    module(formula, F.one_hot(y, 4).to(dtype)).backward()  # probability targets: the papers' formula, autograd
    torch.testing.assert_close(fused.grad, formula.grad)
    assert fused.grad[0, 0] < -0.1  # -0.148 at gamma = 3: (0.5 sum_c a_c h_c - a_0 h_0)


@pytest.mark.parametrize("cls, eps", [(cls, 0.0) for cls in CLASSES + [LabelSmoothingCrossEntropy]]
                         + [(cls, 0.1) for cls in (FocalLoss, AdaptiveFocalLoss, LabelSmoothingCrossEntropy)])
def test_a_z_loss_past_float32s_range_is_nan_on_the_c_kernel_as_on_the_torch_path(cls, eps):
    # lse^2 = 1e60 is finite in the kernel's double but +inf in float32: the kernel returned +inf, the torch path
    # (probability targets) NaN for the same row.
    x = torch.tensor([[1e30, -1e30, 0.0, 1e30], [1.0, 2.0, 0.0, -1.0]])
    y = torch.tensor([0, 1])
    module = cls(eps=eps, reduction="none", z_loss=1e-3) if eps else cls(reduction="none", z_loss=1e-3)
    fused, formula = module(x, y), module(x, F.one_hot(y, 4).float())
    assert math.isnan(fused[0].item()) and math.isnan(formula[0].item()), (fused, formula)
    torch.testing.assert_close(fused[1:], formula[1:])


@pytest.mark.parametrize("module", [FocalLoss(gamma=0.0, eps=0.1, reduction="sum"),
                                    AdaptiveFocalLoss(0.2, 0.0, 0.0, eps=0.1, reduction="sum")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_smoothed_focal_gradient_at_gamma_zero_is_pytorchs_with_a_minus_inf_logit_on_another_class(module, dtype):
    # gamma = 0 is label smoothing: a masked class (p = 0, log p = -inf) has h = 1, and PyTorch's gradient is finite.
    # The blockwise backend (float64) computed 0 * (1 - p)^-1 * 0 * -inf = NaN for it; the C kernel did not.
    x = torch.tensor([[1.0, -math.inf, 0.0, 2.0], [0.5, 1.0, -1.0, 0.0]], dtype=dtype)
    y = torch.tensor([0, 2])
    ours, torchs = x.clone().requires_grad_(), x.clone().requires_grad_()
    module(ours, y).backward()
    F.cross_entropy(torchs, y, label_smoothing=0.1, reduction="sum").backward()
    torch.testing.assert_close(ours.grad, torchs.grad)


@pytest.mark.parametrize("n_classes", [5, 10, 100])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adaptive_focal_picks_the_same_gamma_on_every_path_where_p_equals_the_threshold(n_classes, eps, dtype):
    # All-equal logits (a zero-initialized head) put every p_c at 1/C: with threshold 1/C (FLSD-53's 0.2 on five
    # classes), the C kernel compared p with the threshold in float lanes or in double, the blockwise backend exp(log p)
    # with it, the formula log p with log(threshold): each path rounded differently and picked its own gamma.
    module = AdaptiveFocalLoss(threshold=1 / n_classes, gamma_below=5.0, gamma_above=0.0, eps=eps)
    x, y = torch.zeros(3, n_classes, dtype=dtype), torch.tensor([0, 1, n_classes - 1])
    torch.testing.assert_close(module(x, y), module(x, F.one_hot(y, n_classes).to(dtype)))


@pytest.mark.parametrize("n_classes, n_bins, equal_width", [(7, 7, True), (20, 20, True), (20, 100, True),
                                                            (5, 100, False), (10, 100, False), (100, 100, False)])
def test_ada_focal_picks_the_same_bin_on_every_path_where_p_is_on_an_edge(n_classes, n_bins, equal_width):
    # All-equal logits put p_y at 1/C, on a bin edge: the C kernel placed p_y in double, the formula in float32,
    # and they took neighbouring bins' gammas.
    gammas = torch.arange(n_bins, dtype=torch.float32) * 0.7 - 1.0
    edges = None if equal_width else torch.linspace(0, 1, n_bins + 1)
    x, y = torch.zeros(2, n_classes), torch.tensor([0, n_classes - 1])
    torch.testing.assert_close(ada_focal_loss(x, y, gammas, edges),
                               ada_focal_loss(x, F.one_hot(y, n_classes).float(), gammas, edges))
