"""The calibration-loss family on the fused backends (`fastai_ls/loss/backends/family.py`): each loss and its gradient
equal the paper's formula written with torch operations (float64 to 1e-10 on the blockwise backend, float32 on the C
kernel to float32's precision), over weights, ignored rows, reductions, N-D inputs and C from 1 up; the same with
the z-loss on every loss and label smoothing on the focal losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from triton_interpreter import run_in_triton_interpreter

from fastai_ls import label_smoothing_cross_entropy
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
    "ada_focal": {"switch": 0.2, "gammas": torch.tensor([-1.5, 0.1, 0.5, 2.0], dtype=torch.float64),
                  "edges": torch.tensor([0.0, 0.1, 0.3, 0.6, 1.0], dtype=torch.float64)},
}
EQUAL_WIDTH = {"gammas": torch.tensor([-1.0, 3.0, 0.0, 1.0, 4.0])}  # AdaFocal's equal-width bins, default switch
CASES = [(kind, PARAMS[kind]) for kind in KINDS if kind != "adaptive_focal"] + [
    ("adaptive_focal", {}), ("focal", {"gamma": 2.0}), ("ada_focal", EQUAL_WIDTH)]
ADAPTIVE = {"threshold": 0.3, "gamma_below": 4.0, "gamma_above": 1.5}
Z = 1e-2
# (kind, params, eps, z_loss): the z-loss on every loss, label smoothing on the focal ones, adaptive focal's own
# parameters
EXTRA = [(kind, PARAMS[kind], 0.0, Z) for kind in KINDS] + [
    ("focal", {"gamma": 3.0}, 0.1, 0.0), ("focal", {"gamma": 0.0}, 0.2, 0.0), ("focal", {"gamma": 2.0}, 0.1, Z),
    ("adaptive_focal", {}, 0.1, 0.0), ("adaptive_focal", ADAPTIVE, 0.0, 0.0), ("adaptive_focal", ADAPTIVE, 0.05, Z),
    ("ada_focal", EQUAL_WIDTH, 0.0, Z)]
EXTRA_IDS = [f"{k}-{i}-eps{e}-z{z}" for i, (k, p, e, z) in enumerate(EXTRA)]
IDS = [f"{k}-{i}" for i, (k, _) in enumerate(CASES)]


def paper_rows(kind: str, x: Tensor, y: Tensor, params: dict, w: Tensor | None, eps: float = 0.0,
               z_loss: float = 0.0) -> Tensor:
    """Each loss per row (weighted by its class weight), as its paper writes it: x (M, C) logits, y valid ids; with
    `eps` the focal losses' smoothed target, and `z_loss` PaLM's z-loss on the raw logits."""
    w_y = torch.ones_like(x[:, 0]) if w is None else w[y]
    z_term = z_loss * w_y * torch.logsumexp(x, 1) ** 2
    if kind == "logitnorm":  # Wei et al. 2022: CE of x / (tau (||x|| + 1e-7))
        x = x / (params["tau"] * (x.norm(dim=1, keepdim=True) + 1e-7))
    log_p = F.log_softmax(x, 1)
    ce = -log_p[torch.arange(len(y)), y]
    if kind in ("focal", "adaptive_focal"):  # Mukhoti et al. 2020: -sum_c q_c (1 - p_c)^gamma_c log p_c
        p = log_p.exp()
        if kind == "focal":
            gamma = params["gamma"]
        else:
            a = {"threshold": 0.2, "gamma_below": 5.0, "gamma_above": 3.0, **params}  # FLSD-53 by default
            gamma = torch.where(p.detach() < a["threshold"], a["gamma_below"], a["gamma_above"]).double()
        q = (1 - eps) * F.one_hot(y, x.shape[1]).double() + eps / x.shape[1]
        wq = q * (torch.ones(x.shape[1], dtype=x.dtype) if w is None else w)
        return -(wq * (1 - p) ** gamma * log_p).sum(1) + z_term
    if kind == "ada_focal":  # Ghosh et al. 2022: gamma of p_y's bin; (1 + p_y)^|gamma| below the switch
        p_y = (-ce).exp()
        gammas, n_bins = params["gammas"].double(), params["gammas"].numel()
        if params.get("edges") is None:
            bins = (p_y.detach() * n_bins).ceil().long().sub(1).clamp(0, n_bins - 1)
        else:  # bins (e_b, e_b+1]: the first whose upper edge is >= p_y
            bins = (params["edges"][None, 1:-1] < p_y.detach()[:, None]).sum(1)
        gamma = gammas[bins]
        focal = gamma >= params.get("switch", 0.2)
        factor = torch.where(focal, (1 - p_y) ** gamma.clamp_min(0), (1 + p_y) ** gamma.abs().where(~focal, 0.0))
        return w_y * factor * ce + z_term
    if kind == "margin":  # Liu et al. 2022: CE + alpha / C sum_k relu(max z - z_k - m)
        gaps = x.max(1, keepdim=True).values - x - params["margin"]
        return w_y * (ce + params["alpha"] * gaps.clamp_min(0).mean(1)) + z_term
    if kind == "maxsup":  # Zhou et al. 2025: CE + alpha (max z - mean z)
        return w_y * (ce + params["alpha"] * (x.max(1).values - x.mean(1))) + z_term
    if kind == "logitnorm":
        return w_y * ce + z_term
    entropy = -(log_p.exp() * log_p).sum(1)  # Pereyra et al. 2017: CE - beta H(p)
    return w_y * (ce - params["beta"] * entropy) + z_term


def paper_loss(kind, x, y, params, w, reduction, ignore_index=-100, eps=0.0, z_loss=0.0):
    """`paper_rows` with PyTorch's reductions over an (N, C, d...) input: 'mean' divides by the kept rows' w_y."""
    rows = x.movedim(1, -1).reshape(-1, x.shape[1])
    t = y.reshape(-1)
    kept = t != ignore_index
    loss = torch.zeros(len(t), dtype=rows.dtype)
    loss = loss.masked_scatter(kept, paper_rows(kind, rows[kept], t[kept], params, w, eps, z_loss))
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
@pytest.mark.parametrize("kind, params", CASES, ids=IDS)
def test_fused_loss_and_gradient_equal_the_papers_formula_in_float64(kind, params, shape, weighted, reduction):
    x, y, w = make_case(shape, weighted, ignored=len(shape) == 2)
    got = loss_and_grad(lambda x: fused_family_loss(kind, x, y, params, w, reduction=reduction), x)
    clean = x.nan_to_num(0.0)  # the reference reads every row; the ignored row's gradient must be 0 all the same
    expected = loss_and_grad(lambda x: paper_loss(kind, x, y, params, w, reduction), clean)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-10, atol=1e-10)


def count_c_kernel_calls(monkeypatch) -> list:
    """The kinds the C kernel's family function is called with, one per call."""
    calls, run = [], c_kernel._kernel.family
    monkeypatch.setattr(c_kernel._kernel, "family", lambda *args: calls.append(args[7]) or run(*args))
    return calls


@pytest.mark.skipif(not c_kernel.AVAILABLE, reason="the C kernel is not built")
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(9, 1), (16, 37), (8, 1000)])
@pytest.mark.parametrize("kind, params", CASES, ids=IDS)
def test_the_c_kernel_equals_the_papers_formula_to_float32_precision(kind, params, shape, weighted, monkeypatch):
    x, y, w = make_case(shape, weighted, ignored=True, seed=1)
    calls = count_c_kernel_calls(monkeypatch)
    x32, w32 = x.float(), None if w is None else w.float()
    got = loss_and_grad(lambda x: fused_family_loss(kind, x, y, params, w32), x32)
    expected = loss_and_grad(lambda x: paper_loss(kind, x, y, params, w, "mean"), x32.double().nan_to_num(0.0))
    assert calls, "the C kernel did not run"
    torch.testing.assert_close(got[0].double(), expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1].double(), expected[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind, params", CASES, ids=IDS)
def test_gradcheck_and_second_derivatives(kind, params):
    x, y, w = make_case((5, 4), weighted=True, ignored=False, seed=2)
    x.requires_grad_()
    torch.autograd.gradcheck(lambda x: fused_family_loss(kind, x, y, params, w), (x,))
    torch.autograd.gradgradcheck(lambda x: fused_family_loss(kind, x, y, params, w), (x,))


@pytest.mark.parametrize("kind, params", CASES, ids=IDS)
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
@pytest.mark.parametrize("kind, params", CASES, ids=IDS)
def test_without_a_gradient_the_loss_is_the_same(kind, params, reduction, dtype):
    x, y, w = make_case((6, 5), weighted=True, ignored=True, seed=3, dtype=dtype)
    w = w.to(dtype)
    with torch.no_grad():
        alone = fused_family_loss(kind, x, y, params, w, reduction=reduction)
    trained = fused_family_loss(kind, x.clone().requires_grad_(), y, params, w, reduction=reduction)
    assert alone.grad_fn is None and trained.grad_fn.name() == "FusedLossBackward"
    torch.testing.assert_close(alone, trained.detach())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(9, 1), (9, 7), (3, 5, 2)])
@pytest.mark.parametrize("kind, params, eps, z_loss", EXTRA, ids=EXTRA_IDS)
def test_z_losses_smoothing_and_adaptive_parameters_equal_the_papers_formula_in_float64(kind, params, eps, z_loss,
                                                                                        shape, weighted, reduction):
    x, y, w = make_case(shape, weighted, ignored=len(shape) == 2)
    x = x + 2  # lse far from 0: the z-loss matters
    got = loss_and_grad(lambda x: fused_family_loss(kind, x, y, params, w, reduction=reduction, eps=eps,
                                                    z_loss=z_loss), x)
    expected = loss_and_grad(lambda x: paper_loss(kind, x, y, params, w, reduction, eps=eps, z_loss=z_loss),
                             x.nan_to_num(0.0))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not c_kernel.AVAILABLE, reason="the C kernel is not built")
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(9, 1), (16, 37), (8, 1000)])
@pytest.mark.parametrize("kind, params, eps, z_loss", EXTRA, ids=EXTRA_IDS)
def test_the_c_kernel_computes_z_losses_and_smoothing_to_float32_precision(kind, params, eps, z_loss, shape,
                                                                           weighted, monkeypatch):
    x, y, w = make_case(shape, weighted, ignored=True, seed=1)
    x[3, y[3]] += 40  # a row whose p_y rounds to 1 in float32
    calls = count_c_kernel_calls(monkeypatch)
    x32, w32 = x.float() + 2, None if w is None else w.float()
    got = loss_and_grad(lambda x: fused_family_loss(kind, x, y, params, w32, eps=eps, z_loss=z_loss), x32)
    with torch.no_grad():
        alone = fused_family_loss(kind, x32, y, params, w32, reduction="none", eps=eps, z_loss=z_loss)
    clean = x32.double().nan_to_num(0.0)
    expected = loss_and_grad(lambda x: paper_loss(kind, x, y, params, w, "mean", eps=eps, z_loss=z_loss), clean)
    assert len(calls) == 2, "the C kernel did not run"
    torch.testing.assert_close(got[0].double(), expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1].double(), expected[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(alone.double(), paper_loss(kind, clean, y, params, w, "none", eps=eps, z_loss=z_loss),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, params, eps, z_loss", EXTRA, ids=EXTRA_IDS)
def test_gradcheck_and_second_derivatives_with_z_losses_and_smoothing(kind, params, eps, z_loss):
    x, y, w = make_case((5, 4), weighted=True, ignored=False, seed=2)
    x.requires_grad_()
    func = lambda x: fused_family_loss(kind, x, y, params, w, eps=eps, z_loss=z_loss)  # noqa: E731
    torch.autograd.gradcheck(func, (x,))
    torch.autograd.gradgradcheck(func, (x,))
    paper = lambda x: paper_loss(kind, x, y, params, w, "mean", eps=eps, z_loss=z_loss)  # noqa: E731
    torch.testing.assert_close(torch.func.grad(func)(x.detach()), torch.func.grad(paper)(x.detach()), rtol=1e-10,
                               atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weighted", [False, True])
def test_the_smoothed_focal_loss_at_gamma_zero_is_label_smoothing_and_its_z_loss_is_the_same(dtype, weighted):
    x, y, w = make_case((8, 6), weighted, ignored=True, seed=4, dtype=dtype)
    w = None if w is None else w.to(dtype)
    got = loss_and_grad(lambda x: fused_family_loss("focal", x, y, {"gamma": 0.0}, w, eps=0.1, z_loss=Z), x)
    expected = loss_and_grad(lambda x: label_smoothing_cross_entropy(x, y, 0.1, w, z_loss=Z), x)
    tolerance = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else {}
    torch.testing.assert_close(got, expected, equal_nan=True, **tolerance)


@pytest.mark.parametrize("kind, params, eps, z_loss", EXTRA, ids=EXTRA_IDS)
def test_a_hundred_thousand_classes_with_z_losses_and_smoothing(kind, params, eps, z_loss):
    x, y, w = make_case((2, 100_000), weighted=True, ignored=False, seed=6)
    got = loss_and_grad(lambda x: fused_family_loss(kind, x, y, params, w, eps=eps, z_loss=z_loss), x)
    expected = loss_and_grad(lambda x: paper_loss(kind, x, y, params, w, "mean", eps=eps, z_loss=z_loss), x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


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


@pytest.mark.parametrize("kind, params", CASES, ids=IDS)
def test_a_hundred_thousand_classes(kind, params):
    x, y, w = make_case((3, 100_000), weighted=True, ignored=False, seed=6)
    got = loss_and_grad(lambda x: fused_family_loss(kind, x, y, params, w), x)
    expected = loss_and_grad(lambda x: paper_loss(kind, x, y, params, w, "mean"), x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind, params, error, message", [
    ("focal", {"gamma": -1.0}, ValueError, "gamma must be non-negative"),
    ("focal", {"gamma": 1.0, "eps": 0.1}, ValueError, r"the focal loss takes the parameters \('gamma',\)"),
    ("adaptive_focal", {"threshold": 1.5}, ValueError, "threshold must be at most 1"),
    ("adaptive_focal", {"gamma_below": -1.0}, ValueError, "gamma_below must be non-negative"),
    ("adaptive_focal", {"gamma": 1.0}, ValueError, "the adaptive_focal loss takes the parameters"),
    ("ada_focal", {"switch": 0.2}, ValueError, "the ada_focal loss takes the parameters"),
    ("ada_focal", {"gammas": torch.tensor([1.0, float("nan")])}, ValueError, "gammas must be finite"),
    ("ada_focal", {"gammas": torch.ones(2), "edges": torch.tensor([0.0, 0.7, 0.5])}, ValueError,
     "edges must be non-decreasing from 0 to 1"),
    ("ada_focal", {"gammas": torch.ones(2), "switch": -1.0}, ValueError, "switch must be non-negative"),
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


@pytest.mark.parametrize("kind, params, options, error, message", [
    ("maxsup", {"alpha": 0.1}, {"eps": 0.1}, ValueError, "eps .label smoothing. is for the focal losses"),
    ("focal", {"gamma": 1.0}, {"eps": 1.0}, ValueError, r"eps must be in \[0, 1\)"),
    ("focal", {"gamma": 1.0}, {"z_loss": -1.0}, ValueError, "z_loss must be finite and non-negative"),
    ("logitnorm", {"tau": 1.0}, {"z_loss": "0.1"}, TypeError, "z_loss must be a real number"),
])
def test_bad_smoothing_and_z_losses_raise_naming_them(kind, params, options, error, message):
    x, y, _ = make_case((4, 3), weighted=False, ignored=False)
    with pytest.raises(error, match=message):
        fused_family_loss(kind, x, y, params, **options)


def test_probability_targets_and_bad_ids_raise():
    x, y, _ = make_case((4, 3), weighted=False, ignored=False)
    with pytest.raises(ValueError, match="needs integer class-id targets"):
        fused_family_loss("maxsup", x, torch.softmax(x, 1), {"alpha": 0.1})
    for dtype in (torch.float32, torch.float64):
        with pytest.raises(ValueError, match="target ids must be in"):
            fused_family_loss("maxsup", x.to(dtype), torch.tensor([0, 1, 3, 0]), {"alpha": 0.1})


@pytest.mark.parametrize("kind, params", CASES, ids=IDS)
def test_the_logits_and_weights_are_never_written(kind, params):
    x, y, w = make_case((6, 5), weighted=True, ignored=True, dtype=torch.float32)
    w = w.float()
    x_before, w_before = x.clone(), w.clone()
    fused_family_loss(kind, x.requires_grad_(), y, params, w).backward()
    torch.testing.assert_close(x.detach(), x_before, equal_nan=True)
    torch.testing.assert_close(w, w_before)


# Triton's interpreter runs the kernels on CPU tensors; it must be switched on before triton is imported, hence a
# fresh interpreter: every loss of the family (with z-losses, the focal losses with label smoothing), and label
# smoothing with z-loss, through the Triton kernels equals the C kernel, with several column blocks per row,
# weights, ignored rows, reductions, with and without gradient.
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
cases = [("focal", {"gamma": 3.0}, {}), ("focal", {"gamma": 1.0}, {}), ("adaptive_focal", {}, {}),
         ("margin", {"margin": 1.0, "alpha": 0.1}, {}), ("maxsup", {"alpha": 0.1}, {}), ("logitnorm", {"tau": 0.5}, {}),
         ("confidence_penalty", {"beta": 0.3}, {}), ("focal", {"gamma": 2.0}, {"eps": 0.1, "z_loss": 1e-2}),
         ("adaptive_focal", {"threshold": 0.3, "gamma_below": 4.0, "gamma_above": 1.5}, {"eps": 0.1}),
         ("margin", {"margin": 1.0, "alpha": 0.1}, {"z_loss": 1e-2}), ("logitnorm", {"tau": 0.5}, {"z_loss": 1e-2}),
         ("confidence_penalty", {"beta": 0.3}, {"z_loss": 1e-2}),
         ("ada_focal", {"gammas": torch.tensor([-1.5, 0.1, 0.5, 2.0]),
                        "edges": torch.tensor([0, 0.1, 0.3, 0.6, 1])}, {}),
         ("ada_focal", {"gammas": torch.tensor([-1.0, 3.0, 0.0, 1.0, 4.0])}, {"z_loss": 1e-2}), ("z_loss", {}, {})]
n_cases = 0
for n_classes in (5, 37):
    for kind, params, options in cases:
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
                    loss = lambda x: fused_family_loss(kind, x, y, params, w, reduction=reduction, **options)
                got = run(loss, x, y, with_grad, g, triton=True)
                expected = run(loss, x, y, with_grad, g, triton=False)
                torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-5)
                if with_grad:
                    torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-5)
                n_cases += 1
assert launched.count("family_loss_and_grad") == 2 * 14 * 6 and launched.count("loss_and_grad") == 2 * 6, launched
print(f"triton kernels match in {n_cases} cases")
"""


@pytest.mark.slow  # Triton's interpreter runs each program instance in Python: 25 s on 2 cores
@pytest.mark.skipif(not triton_backend.AVAILABLE, reason="triton is not installed")
def test_triton_kernels_equal_the_c_kernel_in_the_interpreter():
    assert "triton kernels match" in run_in_triton_interpreter(TRITON_INTERPRETER_CHECK, timeout=300)
