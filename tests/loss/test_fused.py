"""The fused backends (`fastai_ls/loss/backends/`): same values and gradients as PyTorch, chosen only where they
apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from triton_interpreter import run_in_triton_interpreter

import fastai_ls.loss.backends.blockwise as blockwise_module
from fastai_ls import (
    LabelSmoothingCrossEntropy,
    LabelSmoothingCrossEntropyFlat,
    label_smoothing_cross_entropy,
)
from fastai_ls.loss.backends import triton as triton_backend
from fastai_ls.loss.backends.autograd import FusedBackend, FusedLoss
from fastai_ls.loss.backends.reference import ReferenceBackend

FUSED_NODE = "FusedLossBackward"


def torch_eps(eps: float, smoothing: str, n_classes: int) -> float:
    """PyTorch's `label_smoothing` for our `smoothing` option (other-classes eps is eps*C/(C-1) uniform)."""
    return eps if smoothing == "uniform" else eps * n_classes / (n_classes - 1)


def make_case(shape: tuple[int, ...], weighted: bool, ignored: bool, dtype=torch.float64, seed: int = 0,
              scale: float = 3.0):
    gen = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(shape, generator=gen, dtype=dtype)).requires_grad_()
    n_classes = shape[1]
    y = torch.randint(0, n_classes, shape[:1] + shape[2:], generator=gen)
    if ignored:
        y.view(-1)[::3] = -100
    w = torch.rand(n_classes, generator=gen, dtype=dtype) + 0.1 if weighted else None
    return x, y, w


def grads(loss: torch.Tensor, x: torch.Tensor, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of <loss, g> for a fixed random g (so 'none' checks every row's scale), and g."""
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=loss.dtype)
    return torch.autograd.grad(loss, x, g)[0], g


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(12, 7), (4, 5, 3, 2)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignored", [False, True])
@pytest.mark.parametrize("smoothing", ["uniform", "others"])
def test_fused_loss_and_gradient_equal_torch_cross_entropy(shape, reduction, weighted, ignored, smoothing):
    x, y, w = make_case(shape, weighted, ignored)
    loss = label_smoothing_cross_entropy(x, y, 0.2, w, reduction, smoothing=smoothing)
    assert FUSED_NODE in graph_nodes(loss)
    grad, g = grads(loss, x)
    expected = F.cross_entropy(x, y, w, reduction=reduction, label_smoothing=torch_eps(0.2, smoothing, shape[1]))
    expected_grad = torch.autograd.grad(expected, x, g)[0]
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_float32_gradient_within_1e_6_of_torch(reduction, weighted):
    x, y, w = make_case((64, 1000), weighted, ignored=True, dtype=torch.float32)
    loss = label_smoothing_cross_entropy(x, y, 0.1, w, reduction)
    grad, g = grads(loss, x)
    expected = F.cross_entropy(x.double(), y, None if w is None else w.double(), reduction=reduction,
                               label_smoothing=0.1)
    expected_grad = torch.autograd.grad(expected, x, g.double())[0]
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    assert (grad.double() - expected_grad).abs().max() < 1e-6


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_equals_reference_path(reduction):
    x, y, w = make_case((6, 5, 4), weighted=True, ignored=True)
    fused = label_smoothing_cross_entropy(x, y, 0.1, w, reduction, smoothing="others")
    reference = label_smoothing_cross_entropy(x, y, 0.1, w, reduction, smoothing="others", fused=False)
    assert FUSED_NODE not in graph_nodes(reference)
    torch.testing.assert_close(fused, reference)
    torch.testing.assert_close(grads(fused, x)[0], grads(reference, x)[0])


@pytest.mark.parametrize("n_rows", [1, 7, 10])
def test_many_blocks_and_a_ragged_last_block_give_the_same_gradient(monkeypatch, n_rows):
    x, y, w = make_case((n_rows, 9), weighted=True, ignored=True)
    expected = label_smoothing_cross_entropy(x, y, 0.1, w, "none")
    expected_grad = grads(expected, x)[0]
    monkeypatch.setattr(blockwise_module, "BLOCK_BYTES", 3 * 9 * 8)  # three float64 rows per block
    loss = label_smoothing_cross_entropy(x, y, 0.1, w, "none")
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grads(loss, x)[0], expected_grad)


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_gradcheck_float64(reduction, weighted):
    x, y, w = make_case((5, 4, 2), weighted, ignored=True)
    assert torch.autograd.gradcheck(lambda x: label_smoothing_cross_entropy(x, y, 0.3, w, reduction), (x,))


@given(n_rows=st.integers(1, 6), n_classes=st.integers(1, 6), eps=st.floats(0, 0.9), weighted=st.booleans(),
       n_ignored=st.integers(0, 3), reduction=st.sampled_from(["mean", "sum", "none"]), seed=st.integers(0, 99))
@settings(max_examples=40, deadline=None)
def test_property_fused_matches_torch(n_rows, n_classes, eps, weighted, n_ignored, reduction, seed):
    x, y, w = make_case((n_rows, n_classes), weighted, ignored=False, seed=seed)
    y[:n_ignored] = -100
    loss = label_smoothing_cross_entropy(x, y, eps, w, reduction)
    expected = F.cross_entropy(x, y, w, reduction=reduction, label_smoothing=eps)
    torch.testing.assert_close(loss, expected, equal_nan=True)  # every row ignored: 'mean' is 0/0 in both
    if not loss.isnan().any():
        grad, g = grads(loss, x)
        torch.testing.assert_close(grad, torch.autograd.grad(expected, x, g)[0])


# float32 logits on the CPU take the compiled kernel (`c_kernel.py`), float64 ones the torch path.
ROUTES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["C kernel", "torch path"])


@ROUTES
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(8, 6), (2, 6, 4)])
def test_backward_twice_with_retain_graph_gives_the_same_gradient(reduction, dtype, shape):
    x, y, w = make_case(shape, weighted=True, ignored=True, dtype=dtype)
    loss = label_smoothing_cross_entropy(x, y, 0.1, w, reduction)
    g = torch.rand(loss.shape, dtype=loss.dtype)
    first = torch.autograd.grad(loss, x, g, retain_graph=True)[0].clone()
    second = torch.autograd.grad(loss, x, g, retain_graph=True)[0]
    third = torch.autograd.grad(loss, x, 2 * g)[0]
    expected = torch.autograd.grad(F.cross_entropy(x, y, w, reduction=reduction, label_smoothing=0.1), x, g)[0]
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    torch.testing.assert_close(third, 2 * expected)


@ROUTES
def test_backward_accumulates_into_grad_like_torch(dtype):
    x, y, _ = make_case((8, 6), weighted=False, ignored=False, dtype=dtype)
    loss = label_smoothing_cross_entropy(x, y)
    loss.backward(retain_graph=True)
    (3 * loss).backward()
    x_ref = x.detach().requires_grad_()
    F.cross_entropy(x_ref, y, label_smoothing=0.1).mul(4).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.slow
@ROUTES
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(6, 5), (2, 5, 3)])
def test_create_graph_gives_torch_second_derivatives(dtype, reduction, shape):
    # Found in review: backward with create_graph=True (second derivatives, gradient penalties, MAML's inner
    # steps; `hessian`, `gradgradcheck`) raised on the fused path where PyTorch's loss works. The fused backward
    # now hands autograd the reference path's differentiable gradient in that case.
    x, y, w = make_case(shape, weighted=True, ignored=True, dtype=dtype)
    loss = label_smoothing_cross_entropy(x, y, 0.1, w, reduction)
    assert FUSED_NODE in graph_nodes(loss)
    g = torch.randn(loss.shape, dtype=dtype, requires_grad=True)
    (grad,) = torch.autograd.grad(loss, x, g, create_graph=True)
    penalty = grad.pow(2).sum()  # a gradient penalty: differentiated in x (the Hessian) and in g
    x_ref, g_ref = x.detach().requires_grad_(), g.detach().requires_grad_()
    expected = F.cross_entropy(x_ref, y, w, reduction=reduction, label_smoothing=0.1)
    (expected_grad,) = torch.autograd.grad(expected, x_ref, g_ref, create_graph=True)
    expected_grad = expected_grad.masked_fill((y == -100).unsqueeze(1), 0.0)  # ignored rows: 0, as in forward
    torch.testing.assert_close(grad, expected_grad)
    got = torch.autograd.grad(penalty, (x, g))
    torch.testing.assert_close(got, torch.autograd.grad(expected_grad.pow(2).sum(), (x_ref, g_ref)))
    if dtype == torch.float64:
        assert torch.autograd.gradgradcheck(lambda x: label_smoothing_cross_entropy(x, y, 0.1, w, reduction),
                                            (x.detach().requires_grad_(),))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_logits_are_never_written(reduction):
    x, y, w = make_case((10, 7), weighted=True, ignored=True, dtype=torch.float32)
    before, version = x.detach().clone(), x._version
    loss = label_smoothing_cross_entropy(x, y, 0.1, w, reduction)
    loss.sum().backward()
    assert x._version == version
    assert torch.equal(x.detach(), before)
    metric = x.detach().softmax(1)  # fastai's metrics read the same logits after the loss
    torch.testing.assert_close(metric, before.softmax(1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
def test_half_precision_logits_give_float32_loss_and_gradient_of_their_dtype(dtype, weighted):
    x32, y, w = make_case((16, 11), weighted, ignored=True, dtype=torch.float32)
    x = x32.detach().to(dtype).requires_grad_()
    loss = label_smoothing_cross_entropy(x, y, 0.1, w)
    loss.backward()
    assert FUSED_NODE in graph_nodes(loss)
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype
    x_ref = x.detach().float().requires_grad_()
    expected = F.cross_entropy(x_ref, y, w, label_smoothing=0.1)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(x.grad.float(), x_ref.grad, rtol=0, atol=1e-2 if dtype == torch.bfloat16 else 1e-3)


def test_half_precision_over_many_blocks(monkeypatch):
    x32, y, w = make_case((9, 5), weighted=True, ignored=True, dtype=torch.float32)
    x = x32.detach().half().requires_grad_()
    expected = label_smoothing_cross_entropy(x, y, 0.1, w, fused=False)
    expected_grad = torch.autograd.grad(expected, x)[0]
    monkeypatch.setattr(blockwise_module, "BLOCK_BYTES", 2 * 5 * 4)  # two float32 rows per block
    loss = label_smoothing_cross_entropy(x, y, 0.1, w)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(torch.autograd.grad(loss, x)[0], expected_grad)


def test_non_finite_logits_give_nan_rows_except_ignored_ones_like_the_reference_path():
    x = torch.randn(5, 4)
    x[1, 2] = float("-inf")  # a class the smoothed target covers: infinite loss, reported as NaN
    x[2, 0] = float("nan")
    x[3, 1] = float("inf")
    x[4, :] = float("nan")  # an ignored row: loss and gradient 0
    x.requires_grad_()
    y = torch.tensor([0, 1, 2, 3, -100])
    loss = label_smoothing_cross_entropy(x, y, reduction="none")
    expected = label_smoothing_cross_entropy(x, y, reduction="none", fused=False)
    torch.testing.assert_close(loss, expected, equal_nan=True)
    assert loss[1:4].isnan().all() and loss[4] == 0
    grad = torch.autograd.grad(loss, x, torch.ones(5))[0]
    assert grad[[0, 1]].isfinite().all() and (grad[4] == 0).all()
    assert label_smoothing_cross_entropy(x, y).isnan()


def graph_nodes(loss: torch.Tensor) -> set[str]:
    """Names of the autograd nodes between `loss` and the leaves."""
    names, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_path_is_selected_for_integer_targets_with_grad(reduction):
    x, y, _ = make_case((6, 4), weighted=False, ignored=False)
    assert type(label_smoothing_cross_entropy(x, y, reduction=reduction).grad_fn).__name__ == FUSED_NODE
    assert type(LabelSmoothingCrossEntropy(reduction=reduction)(x, y).grad_fn).__name__ == FUSED_NODE
    flat = LabelSmoothingCrossEntropyFlat(axis=1, reduction=reduction)
    assert FUSED_NODE in graph_nodes(flat(x.view(2, 3, 4).transpose(1, 2), y.view(2, 3)))


def fail(*args, **kwargs):
    raise AssertionError("this path must not run")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["C kernel", "torch", "bf16"])
def test_without_a_gradient_integer_targets_take_the_loss_only_path(monkeypatch, reduction, dtype):
    # fastai's validation and get_preds(with_loss=True) call the loss under no_grad: no gradient is computed.
    x, y, w = make_case((6, 5, 3), weighted=True, ignored=True)
    x = x.detach().to(dtype)
    monkeypatch.setattr(FusedLoss, "apply", fail)
    monkeypatch.setattr(ReferenceBackend, "loss", fail)
    monkeypatch.setattr(blockwise_module, "BLOCK_BYTES", 3 * 5 * 8)  # several blocks on the torch path
    expected = F.cross_entropy(x.double(), y, w, reduction=reduction, label_smoothing=0.1)
    with torch.no_grad():
        loss = label_smoothing_cross_entropy(x, y, 0.1, w, reduction)
    assert loss.grad_fn is None and loss.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(label_smoothing_cross_entropy(x, y, 0.1, w, reduction).double(), expected,
                               rtol=1e-5, atol=1e-6)  # logits that need no gradient, grad mode on


def test_reference_path_for_soft_targets_and_when_asked(monkeypatch):
    x, y, _ = make_case((6, 4), weighted=False, ignored=False)
    monkeypatch.setattr(FusedBackend, "loss", fail)
    soft = torch.softmax(torch.randn(6, 4, dtype=torch.float64), 1)
    assert FUSED_NODE not in graph_nodes(label_smoothing_cross_entropy(x, soft))
    with torch.no_grad():
        label_smoothing_cross_entropy(x, soft)
        label_smoothing_cross_entropy(x, y, fused=False)
    assert FUSED_NODE not in graph_nodes(LabelSmoothingCrossEntropy(fused=False)(x, y))


def test_fused_true_forces_the_fused_loss_and_refuses_soft_targets():
    x, y, _ = make_case((6, 4), weighted=False, ignored=False)
    with torch.no_grad():
        forced = label_smoothing_cross_entropy(x, y, fused=True)
    torch.testing.assert_close(forced, F.cross_entropy(x.detach(), y, label_smoothing=0.1))
    with pytest.raises(ValueError, match="integer class-id targets"):
        label_smoothing_cross_entropy(x, torch.softmax(x.detach(), 1), fused=True)


# Triton's interpreter runs the kernels on CPU tensors; it must be switched on before triton is imported, hence a
# fresh interpreter. The public loss routed through the Triton kernels (check, loss and gradient, backward's scaling)
# must equal the same call on the CPU paths, on the rows that break naive kernels.
TRITON_INTERPRETER_CHECK = """
import torch
from fastai_ls import label_smoothing_cross_entropy
from fastai_ls.loss.backends import c_kernel
from fastai_ls.loss.backends import triton as triton_backend

def run(x, y, w, eps, reduction, with_grad, g, triton, ignore_index=-100):
    saved = triton_backend.accepts, c_kernel.AVAILABLE
    if triton:  # CPU tensors through the Triton kernels: the interpreter runs them
        triton_backend.accepts, c_kernel.AVAILABLE = (lambda x: x.dtype != torch.float64), False
    try:
        x = x.detach().clone().requires_grad_(with_grad)
        with torch.set_grad_enabled(with_grad):
            loss = label_smoothing_cross_entropy(x, y, eps, w, reduction, ignore_index)
        grad = torch.autograd.grad(loss, x, g if reduction == "none" else g[0])[0] if with_grad else None
        return loss.detach(), grad
    finally:
        triton_backend.accepts, c_kernel.AVAILABLE = saved

triton_backend.MAX_BLOCK = 8  # several column blocks per row, the last one ragged (5 classes: a single block)
triton_backend.CHECK_BLOCK = 4  # several programs of the check
gen = torch.Generator().manual_seed(0)
n_cases = 0
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for n_classes in (5, 37):
        for weighted, masked in ((False, True), (True, True), (False, False), (True, False)):
            for eps, with_grad, reduction in ((0.1, True, "mean"), (0.1, False, "none"), (0.0, True, "sum"),
                                              (0.1, True, "none"), (0.0, False, "mean")):
                x = torch.randn(7, n_classes, generator=gen).to(dtype)
                x[4, :7] = float("-inf")  # a row whose first block is all -inf (and, with 5 classes, the whole row)
                x[5, 1] = float("nan")
                y = torch.randint(0, n_classes, (7,), generator=gen)
                x[6, (y[6] + 1) % n_classes] = float("-inf")  # a wrong class: a finite loss for eps = 0
                if masked:
                    y[2] = -100
                    x[2] = float("nan")  # an ignored row: loss and gradient 0 whatever it holds
                w = torch.rand(n_classes, generator=gen) + 0.1 if weighted else None
                g = torch.randn(7, generator=gen)
                g[3] = 1.0  # a row the scaling kernel skips
                g[2] = float("nan")  # an ignored row keeps its zeros
                got = run(x, y, w, eps, reduction, with_grad, g, triton=True)
                expected = run(x.float(), y, w, eps, reduction, with_grad, g, triton=False)
                torch.testing.assert_close(got[0], expected[0], equal_nan=True)
                if with_grad:
                    assert got[1].dtype == dtype
                    tolerance = {} if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
                    torch.testing.assert_close(got[1].float(), expected[1], equal_nan=True, **tolerance)
                if reduction == "none":
                    assert got[0][6].isfinite() == (eps == 0)
                n_cases += 1
# Ids and weights that are views with strides (a column of a 2-D target; a strided or an expanded weight): the
# kernels index them with unit stride, so they must be handed contiguous copies (found in review: wrong gradients).
x = torch.randn(6, 37, generator=gen)
for y in (torch.randint(0, 37, (6, 2), generator=gen)[:, 1], torch.tensor([3]).expand(6)):
    for w in (None, torch.rand(74, generator=gen)[::2], torch.rand(1, generator=gen).expand(37)):
        for with_grad in (True, False):
            g = torch.ones(1)
            got = run(x, y, w, 0.1, "mean", with_grad, g, triton=True)
            expected = run(x, y, w, 0.1, "mean", with_grad, g, triton=False)
            torch.testing.assert_close(got, expected)
# Every row ignored, a zero-weight class as the only target: 'mean' is NaN, its gradient NaN on kept rows.
for y, w in ((torch.full((6,), -100), None), (torch.zeros(6, dtype=torch.long), torch.tensor([0.0] + [1.0] * 36))):
    got = run(x, y, w, 0.1, "mean", True, torch.ones(1), triton=True)
    expected = run(x, y, w, 0.1, "mean", True, torch.ones(1), triton=False)
    torch.testing.assert_close(got, expected, equal_nan=True)
# Bad ids and weights raise check_ids' errors, found by the check kernel.
for y, w, message in ((torch.tensor([0, 37, 1, 2, 3, 4]), None, "target ids must be in"),
                      (torch.tensor([0, -1, 1, 2, 3, 4]), None, "target ids must be in"),
                      (torch.zeros(6, dtype=torch.long), torch.tensor([1.0] * 36 + [float("nan")]), "weight must"),
                      (torch.zeros(6, dtype=torch.long), torch.tensor([-1.0] + [1.0] * 36), "weight must")):
    for with_grad in (True, False):
        try:
            run(x, y, w, 0.1, "mean", with_grad, torch.ones(1), triton=True)
        except ValueError as err:
            assert message in str(err), err
        else:
            raise AssertionError(f"no error for {y}, {w}")
# A numpy integer ignore_index passes check_options, but Triton's launcher refused it (found in review: an error
# on CUDA only, where the CPU paths take it).
import numpy as np
y = torch.tensor([0, 5, -100, 7, -100, 3])
for with_grad in (True, False):
    got = run(x, y, None, 0.1, "mean", with_grad, torch.ones(1), triton=True, ignore_index=np.int64(-100))
    torch.testing.assert_close(got, run(x, y, None, 0.1, "mean", with_grad, torch.ones(1), triton=False))
print(f"triton kernels match in {n_cases} cases")
"""


@pytest.mark.slow
@pytest.mark.skipif(not triton_backend.AVAILABLE, reason="triton is not installed")
def test_triton_kernels_equal_the_cpu_paths_in_the_interpreter():
    assert "triton kernels match" in run_in_triton_interpreter(TRITON_INTERPRETER_CHECK, timeout=120)


@pytest.mark.parametrize("scale", [1.0, 100.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_small_losses_are_as_precise_as_torch_float32(scale, weighted):
    # Confident, correct rows have losses far below the logits' size: the formula must not cancel large numbers
    # (computed from unshifted logits, the loss of the first rows would be off by ~5e-4 relative at scale 1, and by
    # ~6e-5 absolute instead of 0 at scale 100).
    x = (scale * torch.tensor([[1.0, 8, 1], [1, 1, 8], [0.1, 8, 0.1], [0.1, 0.1, 8]])).requires_grad_()
    y = torch.tensor([1, 2, 1, 2])
    w = torch.tensor([0.5, 1.0, 2.0]) if weighted else None
    for eps in [0.0, 0.01]:
        loss = label_smoothing_cross_entropy(x, y, eps, w, reduction="none")
        assert FUSED_NODE in graph_nodes(loss)
        exact = F.cross_entropy(x.double(), y, None if w is None else w.double(), reduction="none",
                                label_smoothing=eps)
        torch32 = F.cross_entropy(x, y, w, reduction="none", label_smoothing=eps).double()
        error, torch_error = (loss.double() - exact).abs(), (torch32 - exact).abs()
        assert (error <= 2 * torch_error + 1e-7 * exact.abs() + 1e-12).all(), (error, torch_error)


@ROUTES
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", ["empty batch", "all ignored", "all ignored, weighted"])
def test_fused_empty_and_fully_ignored_batches_behave_like_torch(reduction, case, dtype):
    n = 0 if case == "empty batch" else 3
    x = torch.randn(n, 4, dtype=dtype, requires_grad=True)
    y = torch.full((n,), -100)
    w = torch.rand(4, dtype=dtype) if "weighted" in case else None
    loss = label_smoothing_cross_entropy(x, y, 0.1, w, reduction)
    assert FUSED_NODE in graph_nodes(loss)
    expected = F.cross_entropy(x, y, w, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected, equal_nan=True)
    if n:
        assert torch.equal(torch.autograd.grad(loss.sum(), x)[0], torch.zeros_like(x))


@pytest.mark.parametrize("axis, shape", [(1, (2, 5, 4, 3)), (-1, (2, 7, 5))])
def test_class_axis_moves_leave_no_copy_for_autograd_to_keep(axis, shape):
    # Segmentation and text outputs: the rows are made inside the fused function, so autograd keeps only a view
    # of the logits (no N x C copy until backward, and no copy of the gradient back to the input's layout).
    x = torch.randn(shape, requires_grad=True)
    target_shape = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    y = torch.randint(0, shape[axis], target_shape)
    loss = LabelSmoothingCrossEntropyFlat(axis=axis)(x, y)
    assert type(loss.grad_fn).__name__ == FUSED_NODE
    assert [type(f).__name__ for f, _ in loss.grad_fn.next_functions if f is not None] == ["PermuteBackward0"]
    assert loss.grad_fn.saved_tensors[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    loss.backward()
    expected = torch.autograd.grad(F.cross_entropy(x.movedim(axis, 1), y, label_smoothing=0.1), x)[0]
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("fused", [True, False])
def test_weighted_loss_keeps_float32_precision_under_autocast(fused):
    # fastai computes the loss inside autocast; a matrix product there would run in bfloat16.
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(64, 50, generator=gen)).requires_grad_()
    y = torch.randint(0, 50, (64,), generator=gen)
    w = torch.rand(50, generator=gen) + 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = label_smoothing_cross_entropy(x, y, 0.1, w, fused=fused)
    exact = F.cross_entropy(x.double(), y, w.double(), label_smoothing=0.1)
    torch.testing.assert_close(loss.double(), exact, rtol=1e-6, atol=0)
