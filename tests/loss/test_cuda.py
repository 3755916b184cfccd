"""The loss on a CUDA device (skipped without one; `benchmarks/gpu_check.sh` runs these on a GPU machine): the Triton
kernels against the CPU paths, and no host synchronization besides the one argument check.

The CPU paths are checked against PyTorch elsewhere (test_fused.py, test_cpu_kernel.py, the fuzz in
test_loss_hostile_inputs.py); here the GPU's loss and gradient must equal theirs on the same inputs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastai_ls.loss.fused as fused_module
from fastai_ls import label_smoothing_cross_entropy
from fastai_ls.loss import triton_kernel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(not triton_kernel.AVAILABLE, reason="needs triton")]
INF, NAN = float("inf"), float("nan")


def hostile_case(n_rows: int, n_classes: int, weighted: bool, seed: int = 0):
    """float32 logits with the rows that break naive kernels, int64 ids with ignored rows, optional weights."""
    gen = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(n_rows, n_classes, generator=gen)
    y = torch.randint(0, n_classes, (n_rows,), generator=gen)
    y[::5] = -100
    x[1, :] = -INF  # every logit -inf: NaN
    x[2, 7] = NAN
    x[3, (y[3] + 1) % n_classes] = -INF  # a wrong class: finite for eps = 0, NaN (inf reported as NaN) otherwise
    x[5, :] = NAN  # an ignored row: loss and gradient 0 whatever it holds
    x[6, 0] = 1e30
    w = torch.rand(n_classes, generator=gen) + 0.1 if weighted else None
    return x, y, w


def on(device, x, y, w, dtype, eps, reduction, with_grad, g=None):
    """The loss (and the gradient of <loss, g>) on `device`, logits in `dtype`."""
    x = x.to(device=device, dtype=dtype).requires_grad_(with_grad)
    y, w = y.to(device), None if w is None else w.to(device)
    if not with_grad:
        with torch.no_grad():
            return label_smoothing_cross_entropy(x, y, eps, w, reduction), None
    loss = label_smoothing_cross_entropy(x, y, eps, w, reduction)
    g = torch.ones_like(loss) if g is None else g.to(device)
    return loss, torch.autograd.grad(loss, x, g)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("with_grad", [True, False], ids=["fused", "no grad"])
def test_cuda_loss_and_gradient_equal_the_cpu_paths(dtype, weighted, reduction, eps, with_grad):
    # 5000 classes: two column blocks of the Triton kernels (MAX_BLOCK 4096), the second ragged.
    x, y, w = hostile_case(40, 5000, weighted)
    x = x.to(dtype).float()  # the same values on both devices
    g = torch.randn(40) if reduction == "none" else torch.tensor(0.7)
    loss, grad = on("cuda", x, y, w, dtype, eps, reduction, with_grad, g)
    expected, expected_grad = on("cpu", x, y, w, torch.float32, eps, reduction, with_grad, g)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.cpu(), expected, rtol=1e-5, atol=1e-5, equal_nan=True)
    if with_grad:
        assert grad.dtype == dtype
        tolerance = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
        torch.testing.assert_close(grad.cpu().float(), expected_grad, equal_nan=True, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
def test_cuda_fused_loss_equals_torch(dtype, weighted):
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(64, 5000, generator=gen)).cuda().to(dtype).requires_grad_()
    y = torch.randint(0, 5000, (64,), generator=gen).cuda()
    y[::3] = -100
    w = torch.rand(5000, generator=gen).cuda() + 0.1 if weighted else None
    loss = label_smoothing_cross_entropy(x, y, 0.1, w)
    loss.backward()
    x_ref = x.detach().float().requires_grad_()
    expected = F.cross_entropy(x_ref, y, w, label_smoothing=0.1)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(x.grad.float(), x_ref.grad, rtol=1e-2, atol=1e-6 if dtype == torch.float32 else 1e-4)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cuda_empty_and_fully_ignored_batches(reduction):
    for n in (0, 3):
        x = torch.randn(n, 4, device="cuda", requires_grad=True)
        y = torch.full((n,), -100, device="cuda")
        loss = label_smoothing_cross_entropy(x, y, 0.1, reduction=reduction)
        torch.testing.assert_close(loss, F.cross_entropy(x, y, reduction=reduction, label_smoothing=0.1),
                                   equal_nan=True)
        assert torch.equal(torch.autograd.grad(loss.sum(), x)[0], torch.zeros_like(x))


@pytest.mark.parametrize("with_grad", [True, False], ids=["fused", "no grad"])
def test_cuda_strided_ids_and_weights_equal_the_cpu_paths(with_grad):
    # Found in review (in Triton's interpreter): the kernels indexed ids and weights with unit stride, so a column of
    # a 2-D target and a strided or expanded weight were read wrong, and an expanded one past its end. The views
    # are made on each device (`.to` would hand over contiguous copies).
    x, y, _ = hostile_case(40, 300, weighted=False)
    stored = torch.rand(600) + 0.1

    def cases(device):
        targets = torch.stack([y, y.flip(0)], 1).to(device)[:, 0]  # a column: stride 2
        weights = stored.to(device)
        return [(targets, None), (targets, weights[::2]), (targets, weights[:1].expand(300))]

    for (y_cpu, w_cpu), (y_cuda, w_cuda) in zip(cases("cpu"), cases("cuda")):
        assert y_cuda.stride() == (2,)
        expected = on("cpu", x, y_cpu, w_cpu, torch.float32, 0.1, "none", with_grad)
        got = on("cuda", x, y_cuda, w_cuda, torch.float32, 0.1, "none", with_grad)
        torch.testing.assert_close(got[0].cpu(), expected[0], equal_nan=True, rtol=1e-5, atol=1e-5)
        if with_grad:
            torch.testing.assert_close(got[1].cpu(), expected[1], equal_nan=True, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("with_grad", [True, False], ids=["fused", "no grad"])
def test_cuda_loss_synchronizes_only_to_check_its_arguments(monkeypatch, reduction, weighted, with_grad):
    # The ids' range and the weights' validity are read on the host once per call (a clear error instead of a
    # device-side assert); everything before that read is queued without one, and everything after it, the rest of
    # forward and backward, runs with a synchronization an error.
    x, y, w = hostile_case(64, 1000, weighted)
    x, y, w = x.cuda().requires_grad_(with_grad), y.cuda(), None if w is None else w.cuda()
    checks, check = [], fused_module._raise_if_flagged

    def check_then_forbid_synchronization(*args):
        result = check(*args)
        checks.append(len(checks))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        return result

    monkeypatch.setattr(fused_module, "_raise_if_flagged", check_then_forbid_synchronization)
    try:
        with torch.set_grad_enabled(with_grad):
            loss = label_smoothing_cross_entropy(x, y, 0.1, w, reduction)
        if with_grad:
            loss.backward(torch.ones_like(loss))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert checks == [0]
    expected = F.cross_entropy(x.detach(), y, w, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(loss.detach(), expected.masked_fill(expected.isinf(), NAN), equal_nan=True)


@pytest.mark.parametrize("with_grad", [True, False], ids=["fused", "no grad"])
def test_cuda_loss_makes_exactly_one_synchronizing_call(with_grad):
    x, y, w = hostile_case(64, 1000, weighted=True)
    x, y, w = x.cuda().requires_grad_(with_grad), y.cuda(), w.cuda()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.set_grad_enabled(with_grad):
                loss = label_smoothing_cross_entropy(x, y, 0.1, w)
            if with_grad:
                loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronizing = [str(c.message) for c in caught if "synchroniz" in str(c.message).lower()]
    assert len(synchronizing) == 1, synchronizing


@pytest.mark.parametrize("with_grad", [True, False], ids=["fused", "no grad"])
def test_cuda_bad_ids_and_weights_raise_and_leave_the_device_usable(with_grad):
    # PyTorch's CUDA cross-entropy stops the process's CUDA context with a device-side assert on such ids; the check
    # kernel finds them first, and the message names them.
    x = torch.randn(64, 37, device="cuda", requires_grad=with_grad)
    cases = [(torch.full((64,), 3, device="cuda").index_fill_(0, torch.tensor([5], device="cuda"), 37), None,
              r"found \[37\]"),
             (torch.full((64,), -1, device="cuda"), None, r"found \[-1\]"),
             (torch.zeros(64, dtype=torch.long, device="cuda"), torch.full((37,), NAN, device="cuda"), "weight must"),
             (torch.zeros(64, dtype=torch.long, device="cuda"), -torch.ones(37, device="cuda"), "weight must")]
    for y, w, message in cases:
        with torch.set_grad_enabled(with_grad), pytest.raises(ValueError, match=message):
            label_smoothing_cross_entropy(x, y, 0.1, w)
    y = torch.randint(0, 37, (64,), device="cuda")
    with torch.set_grad_enabled(with_grad):
        loss = label_smoothing_cross_entropy(x, y, 0.1)
    torch.testing.assert_close(loss, F.cross_entropy(x, y, label_smoothing=0.1))


def test_cuda_backward_of_a_retained_graph_and_a_scaled_loss():
    # backward(retain_graph=True) twice: the second recomputes the gradient the first handed out; a loss scaled
    # before backward (AMP's GradScaler, gradient accumulation) gets the scaling kernel's product.
    x, y, w = hostile_case(40, 5000, weighted=True)
    for reduction in ("mean", "sum", "none"):
        xc = x.cuda().requires_grad_()
        loss = label_smoothing_cross_entropy(xc, y.cuda(), 0.1, w.cuda(), reduction)
        g = torch.full_like(loss, 2.5)
        first = torch.autograd.grad(loss, xc, g, retain_graph=True)[0]
        second = torch.autograd.grad(loss, xc, g)[0]
        xr = x.clone().requires_grad_()
        expected = label_smoothing_cross_entropy(xr, y, 0.1, w, reduction)
        expected_grad = torch.autograd.grad(expected, xr, torch.full_like(expected, 2.5))[0]
        for got in (first, second):
            torch.testing.assert_close(got.cpu(), expected_grad, rtol=1e-5, atol=1e-7, equal_nan=True)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("with_grad", [True, False], ids=["fused", "no grad"])
def test_cuda_loss_on_a_device_that_is_not_the_current_one(with_grad):
    # Found in review: Triton launches on the current device, not the tensors' one, so logits on cuda:1 while
    # cuda:0 is current (a model moved with .to("cuda:1"), no set_device) were refused where F.cross_entropy works.
    x, y, w = hostile_case(40, 300, weighted=True)
    with torch.cuda.device(0):
        got = on("cuda:1", x, y, w, torch.float32, 0.1, "none", with_grad, torch.randn(40))
    expected = on("cpu", x, y, w, torch.float32, 0.1, "none", with_grad, torch.randn(40))
    torch.testing.assert_close(got[0].cpu(), expected[0], equal_nan=True, rtol=1e-5, atol=1e-5)
    if with_grad:
        torch.testing.assert_close(got[1].cpu(), expected[1], equal_nan=True, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_classes", [1, 2, 3])
@pytest.mark.parametrize("ignore_index", [-100, 0, 2**40, np.int64(-100)], ids=["-100", "0", "2**40", "np.int64"])
def test_cuda_few_classes_and_any_ignore_index_equal_the_cpu_paths(n_classes, ignore_index):
    # Compiled, not interpreted: Triton specializes an int argument equal to 1 (one class) into a constant and passes
    # one outside int32 as int64; a numpy integer ignore_index was refused by its launcher (found in review).
    gen = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(9, n_classes, generator=gen)
    y = torch.randint(0, n_classes, (9,), generator=gen)
    y[::4] = int(ignore_index) if int(ignore_index) != 2**40 else 0
    g = torch.randn(9, generator=gen)
    for reduction in ("mean", "none"):
        results = []
        for device in ("cuda", "cpu"):
            xd = x.to(device).requires_grad_()
            loss = label_smoothing_cross_entropy(xd, y.to(device), 0.1, None, reduction, ignore_index)
            grad = torch.autograd.grad(loss, xd, g.to(device) if reduction == "none" else None)[0]
            results.append((loss.detach().cpu(), grad.cpu()))
        torch.testing.assert_close(results[0], results[1], equal_nan=True, rtol=1e-5, atol=1e-6)


def test_cuda_more_rows_than_the_kernels_count_take_the_blockwise_path(monkeypatch):
    # The Triton kernels launch one program per row and index ids with 32-bit offsets: from MAX_ROWS positions (2**31
    # in practice; 10 here) the loss takes the blockwise torch path instead of failing at launch.
    monkeypatch.setattr(triton_kernel, "MAX_ROWS", 10)
    x, y, w = hostile_case(40, 300, weighted=True)
    for with_grad in (True, False):
        got = on("cuda", x, y, w, torch.float32, 0.1, "mean", with_grad)
        expected = on("cpu", x.clone(), y, w, torch.float32, 0.1, "mean", with_grad)  # `on` sets requires_grad
        torch.testing.assert_close(got[0].cpu(), expected[0], equal_nan=True, rtol=1e-5, atol=1e-5)
        if with_grad:
            torch.testing.assert_close(got[1].cpu(), expected[1], equal_nan=True, rtol=1e-5, atol=1e-6)
