"""The z-loss term of the label-smoothing loss (`z_loss=`, lambda * lse^2 per row, PaLM's auxiliary loss): on every
backend equal to PyTorch's cross-entropy plus the term written out, with its gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastai_ls import LabelSmoothingCrossEntropy, LabelSmoothingCrossEntropyFlat, label_smoothing_cross_entropy
from fastai_ls.loss.backends import c_kernel

Z = 1e-2


def with_z_loss(x, y, eps, w, reduction, z_loss=Z, ignore_index=-100):
    """PyTorch's label-smoothed cross-entropy plus z_loss * w_y * logsumexp(x)^2 on each kept row, with 'mean'
    dividing by the kept rows' w_y."""
    rows, t = x.movedim(1, -1).reshape(-1, x.shape[1]), y.reshape(-1)
    kept = t != ignore_index
    ids = t.clamp_min(0)
    w_y = torch.ones_like(rows[:, 0]) if w is None else w[ids]
    ce = F.cross_entropy(rows, t, w, reduction="none", label_smoothing=eps, ignore_index=ignore_index)
    loss = ce + torch.where(kept, z_loss * w_y * torch.logsumexp(rows, 1) ** 2, 0.0)
    if reduction == "none":
        return loss.reshape(y.shape)
    return loss.sum() if reduction == "sum" else loss.sum() / w_y[kept].sum()


def loss_and_grad(func, x):
    x = x.detach().clone().requires_grad_()
    loss = func(x)
    return loss.detach(), torch.autograd.grad(loss.sum(), x)[0]


def make_case(shape, weighted, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = 4 * torch.randn(shape, generator=gen, dtype=torch.float64) + 2  # lse far from 0: the term matters
    y = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=gen)
    y.view(-1)[0] = -100
    w = torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.1 if weighted else None
    return x, y, w


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(7, 1), (7, 5), (3, 4, 2)])
def test_z_loss_equals_cross_entropy_plus_the_term_in_float64(shape, eps, weighted, reduction, fused):
    x, y, w = make_case(shape, weighted)
    got = loss_and_grad(lambda x: label_smoothing_cross_entropy(x, y, eps, w, reduction, fused=fused, z_loss=Z), x)
    expected = loss_and_grad(lambda x: with_z_loss(x, y, eps, w, reduction), x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not c_kernel.AVAILABLE, reason="the C kernel is not built")
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_the_c_kernel_computes_the_z_loss(eps, weighted, monkeypatch):
    x, y, w = make_case((16, 37), weighted, seed=1)
    passed, run = [], c_kernel._kernel
    monkeypatch.setattr(c_kernel, "_kernel", lambda *args: passed.append(args[-1]) or run(*args))
    w32 = None if w is None else w.float()
    got = loss_and_grad(lambda x: label_smoothing_cross_entropy(x, y, eps, w32, z_loss=Z), x.float())
    with torch.no_grad():
        alone = label_smoothing_cross_entropy(x.float(), y, eps, w32, "none", z_loss=Z)
    expected = loss_and_grad(lambda x: with_z_loss(x, y, eps, w, "mean"), x.float().double())
    assert passed == [Z, Z]
    torch.testing.assert_close(got[0].double(), expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1].double(), expected[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(alone.double(), with_z_loss(x.float().double(), y, eps, w, "none"), rtol=1e-5,
                               atol=1e-5)


def test_z_loss_with_probability_targets_weighs_rows_like_class_ids():
    x, y, w = make_case((6, 5), weighted=True, seed=2)
    y[0] = 3
    onehot = F.one_hot(y, 5).double()
    got = label_smoothing_cross_entropy(x, onehot, 0.1, w, "sum", z_loss=Z)
    torch.testing.assert_close(got, label_smoothing_cross_entropy(x, y, 0.1, w, "sum", z_loss=Z), rtol=1e-12,
                               atol=1e-12)


def test_the_loss_classes_take_z_loss_and_zero_changes_nothing():
    x, y, _ = make_case((2, 5, 3), weighted=False, seed=3)
    flat = LabelSmoothingCrossEntropyFlat(axis=1, z_loss=Z)
    torch.testing.assert_close(flat(x, y), with_z_loss(x, y, 0.1, None, "mean"), rtol=1e-10, atol=1e-10)
    assert "z_loss=0.01" in repr(LabelSmoothingCrossEntropy(z_loss=Z)) and "z_loss" not in repr(flat.__class__())
    torch.testing.assert_close(LabelSmoothingCrossEntropy(z_loss=0.0)(x, y), F.cross_entropy(x, y, label_smoothing=0.1))


@pytest.mark.parametrize("z_loss, error, message", [(-1e-4, ValueError, "z_loss must be finite and non-negative"),
                                                    (float("inf"), ValueError, "z_loss must be finite"),
                                                    ("0.1", TypeError, "z_loss must be a real number")])
def test_a_bad_z_loss_raises(z_loss, error, message):
    x, y, _ = make_case((3, 4), weighted=False)
    with pytest.raises(error, match=message):
        label_smoothing_cross_entropy(x, y, z_loss=z_loss)
    with pytest.raises(error, match=message):
        LabelSmoothingCrossEntropy(z_loss=z_loss)
