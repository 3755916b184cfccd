"""The label-smoothed focal losses on the C kernel, which computes each class's factor (1 - p_c)^gamma in float32
vector lanes with its own log, exp and expm1: float32 results within a few float32 roundings of the float64 formula
where a careless 1 - p_c or a coarse log or expm1 would be off, namely true classes ahead of the others (1 - p_y from
1/2 down to subnormal and 0), probabilities below float32's range, small gammas (where (1 - p)^gamma stays large as
1 - p -> 0), one class, and 100,000 classes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastai_ls.loss.backends import c_kernel, fused_family_loss

pytestmark = pytest.mark.skipif(not c_kernel.AVAILABLE, reason="the C kernel is not built")

LEADS = [0.0, 0.5, 1.0, 3.0, 8.0, 14.0, 17.0, 25.0, 40.0, 90.0, 100.0, 200.0]  # over the largest other logit
CASES = [("focal", {"gamma": 0.0}), ("focal", {"gamma": 0.1}), ("focal", {"gamma": 0.5}), ("focal", {"gamma": 3.0}),
         ("adaptive_focal", {}), ("adaptive_focal", {"threshold": 0.5, "gamma_below": 0.05, "gamma_above": 0.2})]


def hard_rows(n_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 logits (rows of LEADS, one with half its classes 120 below the rest, one plain), ids, weights."""
    gen = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(len(LEADS) + 2, n_classes, generator=gen)
    y = torch.randint(0, n_classes, (len(x),), generator=gen)
    for row, lead in enumerate(LEADS):
        x[row, y[row]] = x[row].max() + lead
    x[len(LEADS), : n_classes // 2] -= 120.0  # p_c = 0 in float32
    return x, y, torch.rand(n_classes, generator=gen) + 0.1


def float64_rows(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, params: dict, eps: float) -> torch.Tensor:
    """-sum_c a_c (1 - p_c)^gamma_c log p_c, a = ((1 - eps) onehot(y) + eps / C) w, in float64 with log s as
    log1p(the other classes' sum) and 1 - p_c as -expm1(log p_c): exact where log_softmax's log p_y and 1 - p_y would
    round to 0 (a lead of 90 or more)."""
    z = x - x.max(1, keepdim=True).values  # the top class's z is 0, and stays 0 as x moves
    top = F.one_hot(z.detach().argmax(1), x.shape[1]).bool()
    log_p = z - torch.log1p(z.exp().masked_fill(top, 0.0).sum(1, keepdim=True))
    q = -torch.expm1(log_p)
    if "gamma" in params:
        gamma = torch.full_like(x, params["gamma"])
    else:
        a = {"threshold": 0.2, "gamma_below": 5.0, "gamma_above": 3.0, **params}  # FLSD-53 by default
        gamma = torch.where(log_p.detach().exp() < a["threshold"], a["gamma_below"], a["gamma_above"]).to(x.dtype)
    target = (1 - eps) * F.one_hot(y, x.shape[1]).to(x.dtype) + eps / x.shape[1]
    target = target if w is None else target * w.to(x.dtype)
    factor = torch.where(gamma > 0, q ** gamma.clamp_min(1e-300), 1.0)
    return -(target * factor * log_p).sum(1)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.1, 0.9])
@pytest.mark.parametrize("n_classes", [1, 2, 5, 1000, 100_000])
@pytest.mark.parametrize("kind, params", CASES)
def test_the_c_kernel_is_float32_exact_where_p_is_close_to_1_or_0(kind, params, n_classes, eps, weighted):
    x, y, w = hard_rows(n_classes, seed=n_classes)
    w = w if weighted else None
    xg = x.clone().requires_grad_()
    loss = fused_family_loss(kind, xg, y, params, w, reduction="none", eps=eps)
    grad, = torch.autograd.grad(loss.sum(), xg)
    x64 = x.double().requires_grad_()
    expected = float64_rows(x64, y, w, params, eps)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-6, atol=1e-9)
    if n_classes == 1:  # p = 1: the loss and its gradient are 0 (the limit; (1 - p)^gamma's derivative is not)
        torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-7)
        return
    expected_grad, = torch.autograd.grad(expected.sum(), x64)
    # Each row's gradient to 1e-5 of the row's target mass sum_c a_c: its entries p_j sum_c a_c h_c - a_j h_j are
    # differences of terms that size, whose float32 roundings their difference keeps (h_c is about 1 where p_c is
    # small).
    mass = (1 - eps) * (1.0 if w is None else w[y].double()) + eps / n_classes * (n_classes if w is None else w.sum())
    scale = torch.maximum(expected_grad.abs().amax(1), torch.as_tensor(mass, dtype=torch.float64))[:, None]
    error = ((grad.double() - expected_grad) / scale).abs().max().item()
    assert error < 1e-5, error


@pytest.mark.parametrize("kind, params", CASES)
def test_a_minus_inf_logit_makes_its_rows_smoothed_loss_nan_and_no_other(kind, params):
    x, y, w = hard_rows(37, seed=7)
    x[2, (y[2] + 1) % 37] = -math.inf  # the smoothed target covers it: -log p = +inf, reported as NaN
    loss = fused_family_loss(kind, x, y, params, w, reduction="none", eps=0.1)
    kept = torch.arange(len(x)) != 2
    assert math.isnan(loss[2].item())
    torch.testing.assert_close(loss[kept].double(), float64_rows(x.double()[kept], y[kept], w, params, 0.1),
                               rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("n_classes", [2, 5, 1000])
@pytest.mark.parametrize("kind, params", CASES)
def test_a_confident_row_whose_other_classes_weigh_nothing_keeps_1_minus_p_to_float32_precision(kind, params,
                                                                                                 n_classes):
    # Its loss is (1 - eps + eps / C) (1 - p_y)^gamma (-log p_y), each factor about 1 - p_y: 1 - p_y computed as
    # 1 - p in float32 would be off by up to 1% at 1 - p_y = 6e-6 (a lead of 12).
    x, y, _ = hard_rows(n_classes, seed=3)
    x, y = x[:5], torch.zeros(5, dtype=torch.long)
    x[:, 0] = x[:, 1:].amax(1) + torch.tensor([1.0, 3.0, 6.0, 9.0, 12.0])
    w = F.one_hot(torch.tensor(0), n_classes).float()
    loss = fused_family_loss(kind, x, y, params, w, reduction="none", eps=0.9)
    torch.testing.assert_close(loss.double(), float64_rows(x.double(), y, w, params, 0.9), rtol=1e-5, atol=0)
