"""The calibration-loss family on the fused backends (`fastai_ls/loss/backends/family.py`): each loss and its gradient
equal the paper's formula written with torch operations (float64 to 1e-10 on the blockwise backend, float32 on the C
kernel to float32's precision), over weights, ignored rows, reductions, N-D inputs and C from 1 up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from fastai_ls.loss.backends import c_kernel, fused_family_loss
from fastai_ls.loss.backends import triton as triton_backend
from fastai_ls.loss.backends.family import KINDS

PARAMS = {
    "focal": {"gamma": 3.0},
    "adaptive_focal": {},
    "margin": {"margin": 1.0, "alpha": 0.1},
    "maxsup": {"alpha": 0.1},
    "logitnorm": {"tau": 0.5},
    "confidence_penalty": {"beta": 0.3},
}
CASES = [(kind, PARAMS[kind]) for kind in KINDS] + [("focal", {"gamma": 2.0})]


def paper_rows(kind: str, x: Tensor, y: Tensor, params: dict, w: Tensor | None) -> Tensor:
    """Each loss per row (weighted by its class weight), as its paper writes it: x (M, C) logits, y valid ids."""
    w_y = torch.ones_like(x[:, 0]) if w is None else w[y]
    if kind == "logitnorm":  # Wei et al. 2022: CE of x / (tau (||x|| + 1e-7))
        x = x / (params["tau"] * (x.norm(dim=1, keepdim=True) + 1e-7))
    log_p = F.log_softmax(x, 1)
    ce = -log_p[torch.arange(len(y)), y]
    if kind in ("focal", "adaptive_focal"):  # Mukhoti et al. 2020: -(1 - p_y)^gamma log p_y
        p_y = (-ce).exp()
        gamma = params["gamma"] if kind == "focal" else torch.where(p_y.detach() < 0.2, 5.0, 3.0).double()
        return w_y * (1 - p_y) ** gamma * ce
    if kind == "margin":  # Liu et al. 2022: CE + alpha / C sum_k relu(max z - z_k - m)
        gaps = x.max(1, keepdim=True).values - x - params["margin"]
        return w_y * (ce + params["alpha"] * gaps.clamp_min(0).mean(1))
    if kind == "maxsup":  # Zhou et al. 2025: CE + alpha (max z - mean z)
        return w_y * (ce + params["alpha"] * (x.max(1).values - x.mean(1)))
    if kind == "logitnorm":
        return w_y * ce
    entropy = -(log_p.exp() * log_p).sum(1)  # Pereyra et al. 2017: CE - beta H(p)
    return w_y * (ce - params["beta"] * entropy)


def paper_loss(kind, x, y, params, w, reduction, ignore_index=-100):
    """`paper_rows` with PyTorch's reductions over an (N, C, d...) input: 'mean' divides by the kept rows' w_y."""
    rows = x.movedim(1, -1).reshape(-1, x.shape[1])
    t = y.reshape(-1)
    kept = t != ignore_index
    loss = torch.zeros(len(t), dtype=rows.dtype)
    loss = loss.masked_scatter(kept, paper_rows(kind, rows[kept], t[kept], params, w))
    if reduction == "none":
        return loss.reshape(y.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (kept.sum() if w is None else w[t[kept]].sum())


def make_case(shape, weighted, ignored, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    n_classes = shape[1]
    x = (3 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    y = torch.randint(0, n_classes, shape[:1] + shape[2:], generator=gen)
    if ignored:
        y[1] = -100
        x[1] = float("nan")  # an ignored row's logits are never read
    w = torch.rand(n_classes, generator=gen, dtype=torch.float64) + 0.1 if weighted else None
    return x, y, w


def loss_and_grad(func, x, *args):
    x = x.detach().clone().requires_grad_()
    loss = func(x, *args)
    grad, = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(9, 1), (9, 2), (9, 7), (4, 37), (3, 5, 2)])
@pytest.mark.parametrize("kind, params", CASES, ids=[f"{k}-{p.get('gamma', '')}" for k, p in CASES])
def test_fused_loss_and_gradient_equal_the_papers_formula_in_float64(kind, params, shape, weighted, reduction):
    x, y, w = make_case(shape, weighted, ignored=len(shape) == 2)
    got = loss_and_grad(lambda x: fused_family_loss(kind, x, y, params, w, reduction=reduction), x)
    clean = x.nan_to_num(0.0)  # the reference reads every row; the ignored row's gradient must be 0 all the same
    expected = loss_and_grad(lambda x: paper_loss(kind, x, y, params, w, reduction), clean)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not c_kernel.AVAILABLE, reason="the C kernel is not built")
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(9, 1), (16, 37), (8, 1000)])
@pytest.mark.parametrize("kind, params", CASES, ids=[f"{k}-{p.get('gamma', '')}" for k, p in CASES])
def test_the_c_kernel_equals_the_papers_formula_to_float32_precision(kind, params, shape, weighted, monkeypatch):
    x, y, w = make_case(shape, weighted, ignored=True, seed=1)
    calls = []
    run = c_kernel._kernel.family
    monkeypatch.setattr(c_kernel._kernel, "family", lambda *args: calls.append(args[7]) or run(*args))
    x32, w32 = x.float(), None if w is None else w.float()
    got = loss_and_grad(lambda x: fused_family_loss(kind, x, y, params, w32), x32)
    expected = loss_and_grad(lambda x: paper_loss(kind, x, y, params, w, "mean"), x32.double().nan_to_num(0.0))
    assert calls, "the C kernel did not run"
    torch.testing.assert_close(got[0].double(), expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1].double(), expected[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind, params", CASES, ids=[f"{k}-{p.get('gamma', '')}" for k, p in CASES])
def test_gradcheck_and_second_derivatives(kind, params):
    x, y, w = make_case((5, 4), weighted=True, ignored=False, seed=2)
    x.requires_grad_()
    torch.autograd.gradcheck(lambda x: fused_family_loss(kind, x, y, params, w), (x,))
    torch.autograd.gradgradcheck(lambda x: fused_family_loss(kind, x, y, params, w), (x,))


@pytest.mark.parametrize("kind, params", CASES, ids=[f"{k}-{p.get('gamma', '')}" for k, p in CASES])
def test_under_torch_func_and_forward_mode_the_reference_backend_gives_the_papers_derivatives(kind, params):
    x, y, w = make_case((6, 5), weighted=True, ignored=True, seed=3)
    x = x.nan_to_num(0.0)
    fused = lambda x: fused_family_loss(kind, x, y, params, w)  # noqa: E731
    paper = lambda x: paper_loss(kind, x, y, params, w, "mean")  # noqa: E731
    torch.testing.assert_close(torch.func.grad(fused)(x), torch.func.grad(paper)(x), rtol=1e-10, atol=1e-10)
    tangent = torch.randn_like(x)
    torch.testing.assert_close(torch.func.jvp(fused, (x,), (tangent,)), torch.func.jvp(paper, (x,), (tangent,)),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("kind, params", CASES, ids=[f"{k}-{p.get('gamma', '')}" for k, p in CASES])
def test_without_a_gradient_the_loss_is_the_same(kind, params, reduction, dtype):
    x, y, w = make_case((6, 5), weighted=True, ignored=True, seed=3, dtype=dtype)
    w = w.to(dtype)
    with torch.no_grad():
        alone = fused_family_loss(kind, x, y, params, w, reduction=reduction)
    trained = fused_family_loss(kind, x.clone().requires_grad_(), y, params, w, reduction=reduction)
    assert alone.grad_fn is None and trained.grad_fn.name() == "FusedLossBackward"
    torch.testing.assert_close(alone, trained.detach())


@pytest.mark.parametrize("kind, params", [("focal", {"gamma": 0.0}), ("margin", {"margin": 1.0,
                                                                                          "alpha": 0.0}),
                                          ("maxsup", {"alpha": 0.0}), ("confidence_penalty", {"beta": 0.0})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_at_their_neutral_parameters_the_losses_are_pytorchs_cross_entropy(kind, params, dtype):
    x, y, w = make_case((8, 6), weighted=True, ignored=True, seed=4, dtype=dtype)
    w = w.to(dtype)
    got = loss_and_grad(lambda x: fused_family_loss(kind, x, y, params, w), x)
    expected = loss_and_grad(lambda x: F.cross_entropy(x, y, w),
                             x.nan_to_num(0.0))
    tolerance = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else {}
    torch.testing.assert_close(got[0], expected[0], **tolerance)
    torch.testing.assert_close(got[1], expected[1], **tolerance)


def test_logitnorm_is_the_cross_entropy_of_the_normalized_logits():
    x, y, _ = make_case((8, 6), weighted=False, ignored=False, seed=5)
    normalized = lambda x: x / (0.04 * (x.norm(dim=1, keepdim=True) + 1e-7))  # noqa: E731
    got = loss_and_grad(lambda x: fused_family_loss("logitnorm", x, y, {"tau": 0.04}), x)
    expected = loss_and_grad(lambda x: F.cross_entropy(normalized(x), y), x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind, params", CASES, ids=[f"{k}-{p.get('gamma', '')}" for k, p in CASES])
def test_a_hundred_thousand_classes(kind, params):
    x, y, w = make_case((3, 100_000), weighted=True, ignored=False, seed=6)
    got = loss_and_grad(lambda x: fused_family_loss(kind, x, y, params, w), x)
    expected = loss_and_grad(lambda x: paper_loss(kind, x, y, params, w, "mean"), x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind, params, error, message", [
    ("focal", {"gamma": -1.0}, ValueError, "gamma must be non-negative"),
    ("focal", {"gamma": 1.0, "eps": 0.1}, ValueError, r"the focal loss takes the parameters \('gamma',\)"),
    ("margin", {"margin": -1.0, "alpha": 0.1}, ValueError, "margin must be non-negative"),
    ("logitnorm", {"tau": 0.0}, ValueError, "tau must be positive"),
    ("maxsup", {"alpha": float("nan")}, ValueError, "alpha must be finite"),
    ("maxsup", {"alpha": True}, TypeError, "alpha must be a real number"),
    ("maxsup", {}, ValueError, r"the maxsup loss takes the parameters \('alpha',\)"),
    ("dual_focal", {}, ValueError, "kind must be one of"),
])
def test_bad_parameters_raise_naming_them(kind, params, error, message):
    x, y, _ = make_case((4, 3), weighted=False, ignored=False)
    with pytest.raises(error, match=message):
        fused_family_loss(kind, x, y, params)


def test_probability_targets_and_bad_ids_raise():
    x, y, _ = make_case((4, 3), weighted=False, ignored=False)
    with pytest.raises(ValueError, match="needs integer class-id targets"):
        fused_family_loss("maxsup", x, torch.softmax(x, 1), {"alpha": 0.1})
    for dtype in (torch.float32, torch.float64):
        with pytest.raises(ValueError, match="target ids must be in"):
            fused_family_loss("maxsup", x.to(dtype), torch.tensor([0, 1, 3, 0]), {"alpha": 0.1})


@pytest.mark.parametrize("kind, params", CASES, ids=[f"{k}-{p.get('gamma', '')}" for k, p in CASES])
def test_the_logits_and_weights_are_never_written(kind, params):
    x, y, w = make_case((6, 5), weighted=True, ignored=True, dtype=torch.float32)
    w = w.float()
    x_before, w_before = x.clone(), w.clone()
    fused_family_loss(kind, x.requires_grad_(), y, params, w).backward()
    torch.testing.assert_close(x.detach(), x_before, equal_nan=True)
    torch.testing.assert_close(w, w_before)


# Triton's interpreter runs the kernels on CPU tensors; it must be switched on before triton is imported, hence a
# fresh interpreter: every loss of the family, and label smoothing with z-loss, through the Triton kernels equals
# the C kernel, with several column blocks per row, weights, ignored rows, reductions, with and without gradient.
TRITON_INTERPRETER_CHECK = """
import torch
from fastai_ls import label_smoothing_cross_entropy
from fastai_ls.loss.backends import c_kernel, triton_family
from fastai_ls.loss.backends import triton as triton_backend
from fastai_ls.loss.backends import fused_family_loss

def run(loss, x, y, with_grad, g, triton):
    saved = triton_backend.accepts, c_kernel.AVAILABLE
    if triton:
        triton_backend.accepts, c_kernel.AVAILABLE = (lambda x: x.dtype != torch.float64), False
    try:
        x = x.detach().clone().requires_grad_(with_grad)
        with torch.set_grad_enabled(with_grad):
            value = loss(x)
        grad = torch.autograd.grad(value, x, g if value.dim() else g[0])[0] if with_grad else None
        return value.detach(), grad
    finally:
        triton_backend.accepts, c_kernel.AVAILABLE = saved

launched = []
for name in ("family_loss_and_grad", "loss_and_grad"):
    kernel = getattr(triton_backend, name)
    setattr(triton_backend, name,
            lambda *args, kernel=kernel, name=name, **kw: launched.append(name) or kernel(*args, **kw))
triton_backend.MAX_BLOCK = triton_family.MAX_BLOCK = 8  # several column blocks, the last one ragged
triton_backend.CHECK_BLOCK = 4
gen = torch.Generator().manual_seed(0)
cases = [("focal", {"gamma": 3.0}), ("focal", {"gamma": 1.0}), ("adaptive_focal", {}),
         ("margin", {"margin": 1.0, "alpha": 0.1}), ("maxsup", {"alpha": 0.1}), ("logitnorm", {"tau": 0.5}),
         ("confidence_penalty", {"beta": 0.3}), ("z_loss", {})]
n_cases = 0
for n_classes in (5, 37):
    for kind, params in cases:
        for weighted in (False, True):
            for reduction, with_grad in (("mean", True), ("none", True), ("sum", False)):
                x = 3 * torch.randn(7, n_classes, generator=gen)
                y = torch.randint(0, n_classes, (7,), generator=gen)
                y[2] = -100
                x[2] = float("nan")
                y[3] = x[3].argmax()  # a confident row
                x[3, y[3]] += 30
                w = torch.rand(n_classes, generator=gen) + 0.1 if weighted else None
                g = torch.randn(7, generator=gen)
                if kind == "z_loss":
                    loss = lambda x: label_smoothing_cross_entropy(x, y, 0.1, w, reduction, z_loss=1e-2)
                else:
                    loss = lambda x: fused_family_loss(kind, x, y, params, w, reduction=reduction)
                got = run(loss, x, y, with_grad, g, triton=True)
                expected = run(loss, x, y, with_grad, g, triton=False)
                torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-5)
                if with_grad:
                    torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-5)
                n_cases += 1
assert launched.count("family_loss_and_grad") == 2 * 7 * 6 and launched.count("loss_and_grad") == 2 * 6, launched
print(f"triton kernels match in {n_cases} cases")
"""


@pytest.mark.skipif(not triton_backend.AVAILABLE, reason="triton is not installed")
def test_triton_kernels_equal_the_c_kernel_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", TRITON_INTERPRETER_CHECK], cwd=Path(__file__).resolve().parents[2],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "triton kernels match" in result.stdout
