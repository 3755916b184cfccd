"""The loss, specified against PyTorch's `F.cross_entropy`, fastai's losses and the seed article's numbers."""

from __future__ import annotations

import inspect
import pickle
import pydoc
import re

import pytest
import torch
import torch.nn.functional as F
from fastai.layers import NoneReduce
from fastai.losses import CrossEntropyLossFlat
from fastai.losses import LabelSmoothingCrossEntropy as FastaiLabelSmoothingCrossEntropy
from hypothesis import given, settings
from hypothesis import strategies as st

import fastai_ls
from fastai_ls import LabelSmoothingCrossEntropy, LabelSmoothingCrossEntropyFlat, label_smoothing_cross_entropy

REDUCTIONS = ["mean", "sum", "none"]
SHAPES = [(6, 5), (3, 4, 5), (2, 3, 4, 5)]  # (N, C) and (N, C, d1, ...): class axis 1


def logits_and_target(shape, ignore: bool, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(shape, generator=g)).to(dtype)
    y = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=g)
    if ignore:
        y.view(-1)[::3] = -100
    return x, y


def assert_close_rel(actual, expected, rtol=1e-6):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-6 if actual.dtype == torch.float32 else 1e-12)


# --- parity with PyTorch ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform_smoothing_equals_torch_cross_entropy(reduction, shape, weighted, ignore, dtype):
    x, y = logits_and_target(shape, ignore, dtype=dtype)
    w = torch.rand(shape[1], dtype=dtype) + 0.1 if weighted else None
    expected = F.cross_entropy(x, y, weight=w, reduction=reduction, label_smoothing=0.1)
    actual = label_smoothing_cross_entropy(x, y, eps=0.1, weight=w, reduction=reduction)
    assert actual.shape == expected.shape
    assert_close_rel(actual, expected)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore", [False, True])
def test_gradient_equals_torch_cross_entropy(weighted, ignore):
    x, y = logits_and_target((5, 4, 3), ignore, dtype=torch.float64)
    w = torch.rand(4, dtype=torch.float64) + 0.1 if weighted else None
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    F.cross_entropy(x1, y, weight=w, label_smoothing=0.2).backward()
    label_smoothing_cross_entropy(x2, y, eps=0.2, weight=w).backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-6, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 6), c=st.integers(1, 7), extra=st.lists(st.integers(1, 3), max_size=2),
    eps=st.floats(0, 0.99), weighted=st.booleans(), reduction=st.sampled_from(REDUCTIONS),
    ignore_frac=st.floats(0, 1), seed=st.integers(0, 2**16),
)
def test_property_matches_torch_over_random_shapes(n, c, extra, eps, weighted, reduction, ignore_frac, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (n, c, *extra)
    x = 4 * torch.randn(shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n, *extra), generator=g)
    y[torch.rand(y.shape, generator=g) < ignore_frac] = -100
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.05 if weighted else None
    expected = F.cross_entropy(x, y, weight=w, reduction=reduction, label_smoothing=eps)
    actual = label_smoothing_cross_entropy(x, y, eps=eps, weight=w, reduction=reduction)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_without_weight_equals_fastai_label_smoothing(reduction):
    x, y = logits_and_target((8, 6), ignore=False)
    expected = FastaiLabelSmoothingCrossEntropy(eps=0.1, reduction=reduction)(x, y)
    assert_close_rel(LabelSmoothingCrossEntropy(eps=0.1, reduction=reduction)(x, y), expected)


def test_weighted_follows_torch_not_fastai():
    # fastai applies the weight to the NLL term only (REFERENCE 1.3): we follow PyTorch in both terms.
    x, y = logits_and_target((8, 6), ignore=False)
    w = torch.linspace(0.2, 2.0, 6)
    ours = LabelSmoothingCrossEntropy(eps=0.1, weight=w)(x, y)
    assert_close_rel(ours, F.cross_entropy(x, y, weight=w, label_smoothing=0.1))
    assert not torch.allclose(ours, FastaiLabelSmoothingCrossEntropy(eps=0.1, weight=w)(x, y))


def test_ignored_targets_leave_the_smoothing_term_unlike_fastai():
    x, y = logits_and_target((8, 6), ignore=True)
    ours = LabelSmoothingCrossEntropy(eps=0.1)(x, y)
    assert_close_rel(ours, F.cross_entropy(x, y, label_smoothing=0.1))
    assert_close_rel(ours, LabelSmoothingCrossEntropy(eps=0.1)(x[y != -100], y[y != -100]))


# --- the two conventions and the seed article ------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_others_smoothing_puts_eps_over_c_minus_1_on_wrong_classes(reduction):
    x, y = logits_and_target((7, 5), ignore=False, dtype=torch.float64)
    eps, c = 0.2, 5
    q = torch.full((7, c), eps / (c - 1), dtype=torch.float64).scatter(1, y[:, None], 1 - eps)
    expected = -(q * x.log_softmax(1)).sum(1)
    expected = {"none": expected, "sum": expected.sum(), "mean": expected.mean()}[reduction]
    assert_close_rel(label_smoothing_cross_entropy(x, y, eps=eps, reduction=reduction, smoothing="others"), expected)


def article_clamp_loss(pred, target, label_smooth, class_num):
    """The first article's second implementation ("实现 2"), verbatim but for the names."""
    logprobs = F.log_softmax(pred, dim=1)
    target = F.one_hot(target, class_num)
    target = torch.clamp(target.float(), min=label_smooth / (class_num - 1), max=1.0 - label_smooth)
    return (-1 * torch.sum(target * logprobs, 1)).mean()


ARTICLE_X = [torch.tensor([[1.0, 8, 1], [1, 1, 8]]), torch.tensor([[0.1, 8, 0.1], [0.1, 0.1, 8]])]
ARTICLE_Y = torch.tensor([1, 2])


@pytest.mark.parametrize(
    "eps, smoothing, expected",
    [(0.0, "uniform", (0.0018, 0.0007)), (0.05, "uniform", (0.2352, 0.2641)), (0.05, "others", (0.3518, 0.3957))],
)
def test_seed_article_numbers(eps, smoothing, expected):
    for x, value in zip(ARTICLE_X, expected):
        assert round(label_smoothing_cross_entropy(x, ARTICLE_Y, eps=eps, smoothing=smoothing).item(), 4) == value


def test_eps_zero_is_plain_cross_entropy():
    for x in ARTICLE_X:
        expected = torch.nn.CrossEntropyLoss()(x, ARTICLE_Y)
        assert_close_rel(label_smoothing_cross_entropy(x, ARTICLE_Y, eps=0.0), expected)


def test_article_clamp_code_computes_the_others_convention_not_its_printed_numbers():
    for x in ARTICLE_X:
        clamp = article_clamp_loss(x, ARTICLE_Y, 0.05, 3)
        assert_close_rel(label_smoothing_cross_entropy(x, ARTICLE_Y, eps=0.05, smoothing="others"), clamp)
    # The article prints 0.2352 / 0.2641 under the clamp code: those are the uniform values.
    assert round(article_clamp_loss(ARTICLE_X[0], ARTICLE_Y, 0.05, 3).item(), 4) == 0.3518


def test_others_equals_uniform_with_eps_times_c_over_c_minus_1():
    x, y = logits_and_target((9, 37), ignore=True, dtype=torch.float64)
    w = torch.rand(37, dtype=torch.float64)
    others = label_smoothing_cross_entropy(x, y, eps=0.1, weight=w, smoothing="others")
    assert_close_rel(others, F.cross_entropy(x, y, weight=w, label_smoothing=0.1 * 37 / 36))


# --- probability targets ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(6, 5), (2, 5, 3, 2)])
@pytest.mark.parametrize("weighted", [False, True])
def test_probability_targets_equal_torch(reduction, shape, weighted):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    q = torch.randn(shape, generator=g, dtype=torch.float64).softmax(1)
    w = torch.rand(shape[1], generator=g, dtype=torch.float64) if weighted else None
    expected = F.cross_entropy(x, q, weight=w, reduction=reduction, label_smoothing=0.15)
    assert_close_rel(label_smoothing_cross_entropy(x, q, eps=0.15, weight=w, reduction=reduction), expected)


def test_one_hot_probability_target_equals_integer_target():
    x, y = logits_and_target((6, 4), ignore=False, dtype=torch.float64)
    for smoothing in ["uniform", "others"]:
        soft = label_smoothing_cross_entropy(x, F.one_hot(y, 4).double(), eps=0.1, smoothing=smoothing)
        assert_close_rel(soft, label_smoothing_cross_entropy(x, y, eps=0.1, smoothing=smoothing))


def test_mixed_probability_target_is_smoothed_on_top():
    x = torch.randn(4, 3, dtype=torch.float64)
    q = torch.tensor([[0.7, 0.3, 0.0]] * 4, dtype=torch.float64)  # MixUp in target space, lam = 0.7
    smoothed = 0.9 * q + 0.1 / 3
    expected = -(smoothed * x.log_softmax(1)).sum(1).mean()
    assert_close_rel(label_smoothing_cross_entropy(x, q, eps=0.1), expected)


# --- precision ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_computed_in_float32(dtype):
    g = torch.Generator().manual_seed(0)
    x = (20 * torch.randn(8, 50_000, generator=g)).to(dtype)
    y = torch.randint(0, 50_000, (8,), generator=g)
    loss = label_smoothing_cross_entropy(x, y, eps=0.1)
    assert loss.dtype == torch.float32 and loss.isfinite()
    assert_close_rel(loss, F.cross_entropy(x.float(), y, label_smoothing=0.1))
    # what the upcast prevents: PyTorch in half precision overflows the smoothing term's class sum
    assert not F.cross_entropy(x.float().half(), y, label_smoothing=0.1).isfinite() or dtype == torch.bfloat16


def test_half_precision_none_reduction_is_float32():
    x, y = logits_and_target((4, 5, 6), ignore=True, dtype=torch.float16)
    assert LabelSmoothingCrossEntropy(reduction="none")(x, y).dtype == torch.float32


# --- fastai conventions --------------------------------------------------------------------------------------------


def test_y_int_tells_mixup_to_mix_losses():
    assert LabelSmoothingCrossEntropy.y_int is True and LabelSmoothingCrossEntropyFlat.y_int is True


def test_reduction_is_an_attribute_read_at_call_time():
    x, y = logits_and_target((5, 3, 2), ignore=True)
    loss_func = LabelSmoothingCrossEntropy()
    loss_func.reduction = "none"
    assert loss_func(x, y).shape == (5, 2)
    with NoneReduce(LabelSmoothingCrossEntropy()) as none_loss:
        assert_close_rel(none_loss(x, y), F.cross_entropy(x, y, reduction="none", label_smoothing=0.1))
    assert loss_func(x, y, reduction="sum").shape == ()


def test_invalid_reduction_set_as_attribute_is_rejected_at_call_time():
    loss_func = LabelSmoothingCrossEntropy()
    loss_func.reduction = "average"
    with pytest.raises(ValueError, match="reduction"):
        loss_func(*logits_and_target((4, 3), ignore=False))


def test_activation_and_decodes_use_the_class_axis():
    x = torch.randn(2, 4, 3, 3)
    loss_func = LabelSmoothingCrossEntropy()
    torch.testing.assert_close(loss_func.activation(x), x.softmax(1))
    assert torch.equal(loss_func.decodes(x), x.argmax(1))
    x16 = x.half()
    assert loss_func.activation(x16).dtype == torch.float32


@pytest.mark.parametrize("axis, shape", [(-1, (2, 5, 7)), (1, (2, 7, 3, 4))])
def test_flat_activation_and_decodes_honour_axis(axis, shape):
    x = torch.randn(shape)
    loss_func = LabelSmoothingCrossEntropyFlat(axis=axis)
    torch.testing.assert_close(loss_func.activation(x), x.softmax(axis))
    assert torch.equal(loss_func.decodes(x), x.argmax(axis))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("axis, shape", [(-1, (3, 5, 7)), (1, (2, 7, 3, 4)), (-1, (6, 7))])
def test_flat_equals_fastai_cross_entropy_loss_flat(reduction, axis, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    target_shape = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    y = torch.randint(0, shape[axis], target_shape, generator=g)
    w = torch.rand(shape[axis], generator=g)
    expected = CrossEntropyLossFlat(axis=axis, weight=w, label_smoothing=0.1, reduction=reduction)(x, y)
    actual = LabelSmoothingCrossEntropyFlat(axis=axis, eps=0.1, weight=w, reduction=reduction)(x, y)
    assert actual.shape == expected.shape
    if reduction == "none":
        # fastai transposes axis and -1 (so (N, C, H, W) rows come out as (N, W, H)); we keep the target's order.
        torch_order = F.cross_entropy(x.movedim(axis, 1), y, weight=w, label_smoothing=0.1, reduction="none")
        assert_close_rel(actual, torch_order.reshape(-1))
        expected = expected.sort().values
        actual = actual.sort().values
    assert_close_rel(actual, expected)


def test_flat_without_flatten_keeps_positions():
    x, y = torch.randn(3, 5, 7), torch.randint(0, 7, (3, 5))
    loss = LabelSmoothingCrossEntropyFlat(flatten=False, reduction="none")(x, y)
    assert_close_rel(loss, F.cross_entropy(x.transpose(1, 2), y, reduction="none", label_smoothing=0.1))


def test_flat_probability_target_on_class_axis():
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    q = torch.randn(2, 4, 3, 3, dtype=torch.float64).softmax(1)
    actual = LabelSmoothingCrossEntropyFlat(axis=1, eps=0.1)(x, q)
    assert_close_rel(actual, F.cross_entropy(x, q, label_smoothing=0.1))


def test_flat_rejects_a_target_laid_out_for_another_axis():
    with pytest.raises(ValueError, match="target must have shape .*: pass one class id per position"):
        LabelSmoothingCrossEntropyFlat(axis=1)(torch.randn(2, 4, 3, 5), torch.randint(0, 4, (2, 5, 3)))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int8])
def test_flat_takes_the_bs_by_1_targets_of_tabular_loaders_as_fastai_cross_entropy_loss_flat_does(reduction, dtype):
    # Issue 20: fastai's TabularDataLoaders give (bs, 1) class ids; the loss refused them at the first batch.
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, generator=g, requires_grad=True), torch.randint(0, 3, (16, 1), generator=g).to(dtype)
    y_before = y.clone()
    actual = LabelSmoothingCrossEntropyFlat(eps=0.1, reduction=reduction)(x, y)
    expected = CrossEntropyLossFlat(label_smoothing=0.1, reduction=reduction)(x, y.long())
    assert_close_rel(actual, expected)
    grad, = torch.autograd.grad(actual.sum(), x)
    expected_grad, = torch.autograd.grad(expected.sum(), x)
    assert_close_rel(grad, expected_grad)
    assert torch.equal(y, y_before)


def test_a_bs_by_1_target_for_the_unflattened_loss_says_what_to_pass():
    with pytest.raises(ValueError, match=r"got \(16, 1\): pass target.reshape\(16\), or use "
                                         r"LabelSmoothingCrossEntropyFlat"):
        LabelSmoothingCrossEntropy()(torch.randn(16, 3), torch.randint(0, 3, (16, 1)))
    with pytest.raises(ValueError, match=r"got \(16, 2\): pass one class id per position"):
        LabelSmoothingCrossEntropyFlat()(torch.randn(16, 3), torch.randint(0, 3, (16, 2)))


@pytest.mark.parametrize("input, target, error, match", [
    ([[0.1, 0.9]], torch.tensor([1]), TypeError, "input must be a torch.Tensor, got list"),
    (torch.randn(1, 2), [1], TypeError, "target must be a torch.Tensor, got list"),
    (torch.randn(2, 3), torch.tensor([0, 1]), ValueError, r"axis=2 is not an axis of the input \(shape \(2, 3\)\)"),
], ids=["list input", "list target", "axis out of range"])
@pytest.mark.parametrize("floatify", [False, True])
def test_flat_rejects_what_it_cannot_read_with_a_clear_error(input, target, error, match, floatify):
    # Found in review: a list target gave AttributeError ('list' object has no attribute 'is_floating_point'), a
    # numpy input "input must have a batch and a class axis, got (4, 3)", an axis beyond the input's an IndexError.
    axis = 2 if error is ValueError else -1
    with pytest.raises(error, match=match):
        LabelSmoothingCrossEntropyFlat(axis=axis, floatify=floatify)(input, target)


@pytest.mark.parametrize("kwargs, match", [(dict(axis="1"), "axis must be an int"),
                                           (dict(axis=1.0), "axis must be an int"),
                                           (dict(flatten="no"), "flatten must be True or False"),
                                           (dict(floatify=None), "floatify must be True or False")])
def test_flat_rejects_bad_layout_options_at_construction(kwargs, match):
    with pytest.raises(TypeError, match=match):
        LabelSmoothingCrossEntropyFlat(**kwargs)


def test_weight_is_a_buffer_that_moves_and_is_a_copy():
    w = torch.tensor([1.0, 2.0, 3.0])
    loss_func = LabelSmoothingCrossEntropy(weight=w)
    assert "weight" in dict(loss_func.named_buffers())
    assert loss_func.to(torch.float64).weight.dtype == torch.float64
    assert loss_func.to("meta").weight.device.type == "meta"
    LabelSmoothingCrossEntropy(weight=w).load_state_dict({"weight": torch.zeros(3)})
    assert torch.equal(w, torch.tensor([1.0, 2.0, 3.0]))


def test_weight_follows_the_input_device_and_dtype():
    x, y = logits_and_target((4, 3), ignore=False, dtype=torch.float64)
    loss_func = LabelSmoothingCrossEntropy(weight=torch.tensor([1.0, 2.0, 3.0]))
    assert_close_rel(loss_func(x, y), F.cross_entropy(x, y, weight=torch.tensor([1.0, 2.0, 3.0]).double(),
                                                      label_smoothing=0.1))


@pytest.mark.parametrize("cls, kwargs", [(LabelSmoothingCrossEntropy, {}),
                                         (LabelSmoothingCrossEntropyFlat, {"axis": 1})])
def test_both_classes_pickle(cls, kwargs):
    loss_func = cls(eps=0.2, weight=torch.tensor([1.0, 2.0, 3.0]), smoothing="others", **kwargs)
    clone = pickle.loads(pickle.dumps(loss_func))
    x, y = torch.randn(4, 3, 2), torch.randint(0, 3, (4, 2))
    assert type(clone) is cls and clone.eps == 0.2 and clone.smoothing == "others"
    assert torch.equal(clone(x, y), loss_func(x, y))


@pytest.mark.parametrize("soft", [False, True])
def test_loss_never_writes_into_its_inputs(soft):
    x, y = logits_and_target((6, 5, 2), ignore=True)
    target = F.one_hot(y.clamp(min=0), 5).movedim(-1, 1).float() if soft else y
    w = torch.rand(5)
    x.requires_grad_()
    saved = [t.detach().clone() for t in (x, target, w)]
    versions = [t._version for t in (x, target, w)]
    LabelSmoothingCrossEntropy(weight=w)(x, target).backward()
    label_smoothing_cross_entropy(x.detach(), target, weight=w, reduction="none")
    for t, before, version in zip((x, target, w), saved, versions):
        assert torch.equal(t.detach(), before) and t._version == version


# --- edge cases and bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch_behaves_like_torch(reduction):
    x, y = torch.randn(0, 4), torch.zeros(0, dtype=torch.long)
    expected = F.cross_entropy(x, y, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(label_smoothing_cross_entropy(x, y, reduction=reduction), expected, equal_nan=True)


def test_all_targets_ignored_behaves_like_torch():
    x, y = torch.randn(3, 4), torch.full((3,), -100)
    assert label_smoothing_cross_entropy(x, y).isnan() and F.cross_entropy(x, y, label_smoothing=0.1).isnan()
    assert label_smoothing_cross_entropy(x, y, reduction="sum") == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("on_target", [True, False], ids=["on the target", "on another class"])
def test_non_finite_logits_give_nan(bad, eps, on_target):
    x, y = logits_and_target((4, 5), ignore=False)
    x[1, y[1] if on_target else (y[1] + 1) % 5] = bad
    per_row = label_smoothing_cross_entropy(x, y, eps=eps, reduction="none")
    if bad == -float("inf") and eps == 0 and not on_target:  # a class the target does not cover: PyTorch's number
        torch.testing.assert_close(per_row, F.cross_entropy(x, y, reduction="none"))
        return
    assert per_row[1].isnan() and per_row[[0, 2, 3]].isfinite().all()
    assert label_smoothing_cross_entropy(x, y, eps=eps).isnan()


BAD_INPUTS = [
    (dict(eps=1.0), ValueError, "eps must be in"),
    (dict(eps=-0.1), ValueError, "eps must be in"),
    (dict(eps="0.1"), TypeError, "eps must be a real number"),
    (dict(smoothing="label"), ValueError, "smoothing must be one of"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(weight=torch.ones(4)), ValueError, "weight has 4 entries"),
    (dict(weight=torch.ones(3, 1)), ValueError, "weight must be 1-D"),
    (dict(weight=torch.tensor([1.0, -1.0, 1.0])), ValueError, "non-negative"),
    (dict(weight=torch.tensor([1, 1, 1])), TypeError, "floating-point"),
    (dict(target=torch.tensor([0, 3, 1, 2])), ValueError, r"\[0, 3\).*found \[3\]"),
    (dict(target=torch.tensor([0, -1, 1, 2])), ValueError, "found \\[-1\\]"),
    (dict(target=torch.tensor([0, 1, 2])), ValueError, "integer target must have shape"),
    (dict(target=torch.rand(4, 2)), ValueError, "probability target must have the input's shape"),
    (dict(target=torch.ones(4, dtype=torch.bool)), TypeError, "target must hold integer"),
    (dict(input=torch.randn(3)), ValueError, r"input must be \(N, C\)"),
    (dict(input=torch.randint(0, 3, (4, 3))), TypeError, "floating-point logits"),
    (dict(input=torch.randn(4, 1), target=torch.zeros(4, dtype=torch.long), smoothing="others"), ValueError,
     "at least 2 classes"),
    (dict(target=torch.rand(4, 3), ignore_index=0), ValueError, "ignore_index is not supported"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_INPUTS)
@pytest.mark.parametrize("route", ["reference", "fused, C kernel", "fused, torch"])
def test_bad_input_raises_a_clear_error(kwargs, error, match, route):
    args = dict(input=torch.randn(4, 3), target=torch.tensor([0, 1, 2, 0]))
    args.update(kwargs)
    if route != "reference" and args["input"].is_floating_point():  # float32 takes the C kernel, float64 not
        args["input"] = args["input"].to(torch.float64 if route == "fused, torch" else torch.float32)
        args["input"].requires_grad_()
    with pytest.raises(error, match=match):
        label_smoothing_cross_entropy(**args)


@pytest.mark.parametrize("kwargs, match", [(dict(eps=1.5), "eps"), (dict(smoothing="x"), "smoothing"),
                                           (dict(weight=torch.tensor([-1.0])), "non-negative"),
                                           (dict(reduction="x"), "reduction")])
def test_modules_reject_bad_options_at_construction(kwargs, match):
    for cls in (LabelSmoothingCrossEntropy, LabelSmoothingCrossEntropyFlat):
        with pytest.raises(ValueError, match=match):
            cls(**kwargs)


def test_ignore_index_out_of_class_range_is_accepted():
    x, y = torch.randn(4, 3), torch.tensor([0, 255, 2, 255])
    actual = label_smoothing_cross_entropy(x, y, ignore_index=255)
    assert_close_rel(actual, F.cross_entropy(x, y, ignore_index=255, label_smoothing=0.1))


# --- documentation ------------------------------------------------------------------------------------------------


def documented_parameters(doc: str) -> dict[str, str]:
    """name -> description, from a numpy-style docstring's Parameters section."""
    lines = inspect.cleandoc(doc).splitlines()
    start = lines.index("Parameters") + 2
    assert lines[start - 1].startswith("---"), "no Parameters section"
    found, name = {}, None
    for line, following in zip(lines[start:], lines[start + 1:] + [""]):
        if following.startswith("---"):  # the next section's title
            break
        header = re.fullmatch(r"(\*{0,2}\w+) : .+", line)
        if header:
            name = header.group(1).lstrip("*")
            found[name] = ""
        elif name and line.startswith("    "):
            found[name] += line.strip() + " "
    return found


@pytest.mark.parametrize("documented", [LabelSmoothingCrossEntropy, LabelSmoothingCrossEntropyFlat,
                                        label_smoothing_cross_entropy], ids=lambda f: f.__name__)
def test_help_explains_every_parameter(documented):
    func = documented.__init__ if inspect.isclass(documented) else documented
    names = [p for p in inspect.signature(func).parameters if p != "self"]
    described = documented_parameters(documented.__doc__)
    assert list(described) == names  # every parameter, in the signature's order, and nothing else
    assert all(len(text.split()) >= 4 for text in described.values()), described
    text = pydoc.render_doc(documented, renderer=pydoc.plaintext)
    assert "Initialize internal Module state" not in text  # torch's generic __init__ docstring
    assert all(f"{name} : " in text for name in names)


@pytest.mark.parametrize("make", [lambda w: LabelSmoothingCrossEntropy(0.1, weight=w),
                                  lambda w: LabelSmoothingCrossEntropyFlat(0.1, weight=w),
                                  lambda w: fastai_ls.FocalLoss(weight=w),
                                  lambda w: fastai_ls.MaxSupLossFlat(weight=w)])
def test_a_loss_class_given_a_weight_that_requires_grad_raises_instead_of_detaching_it(make):
    # The class kept a detached copy, so a gradient the user asked for through the weights was silently dropped.
    weight = torch.ones(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="weight requires grad"):
        make(weight)
    assert make(weight.detach()).weight.requires_grad is False
