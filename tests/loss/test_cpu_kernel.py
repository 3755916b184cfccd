"""The compiled CPU kernel (`fastai_ls/loss/backends/fused_cpu.c`), the backend of float32 logits on the CPU: checked
against PyTorch in float64, and against the torch path that runs where the kernel could not be built."""

from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import test_fused
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fastai_ls import label_smoothing_cross_entropy
from fastai_ls.loss.backends import c_kernel


@pytest.fixture
def kernel_calls(monkeypatch) -> list[tuple[int, ...]]:
    """Shapes of the logits that the compiled kernel received during the test."""
    calls, run = [], c_kernel.loss_and_grad

    def spy(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return run(x, *args, **kwargs)

    monkeypatch.setattr(c_kernel, "loss_and_grad", spy)
    return calls


def make_case(shape: tuple[int, ...], weighted: bool, ignored: bool, seed: int = 0, scale: float = 3.0):
    """`test_fused.make_case` with float32 logits, the dtype that the kernel takes."""
    return test_fused.make_case(shape, weighted, ignored, torch.float32, seed, scale)


def torch_float64(x, y, w, eps, reduction, g):
    """PyTorch's loss and the gradient of <loss, g>, computed in float64 from the same float32 inputs."""
    x64 = x.detach().double().requires_grad_()
    loss = F.cross_entropy(x64, y, None if w is None else w.double(), reduction=reduction, label_smoothing=eps)
    return loss, torch.autograd.grad(loss, x64, g.double())[0]


def test_the_kernel_was_built_by_the_install():
    assert c_kernel.AVAILABLE, \
        "fastai_ls/loss/backends/fused_cpu.c was not compiled: install a C compiler and reinstall"


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(12, 7), (64, 1000), (3, 5000), (4, 5, 3, 2)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignored", [False, True])
def test_float32_loss_and_gradient_equal_torch_in_float64(kernel_calls, shape, reduction, weighted, ignored):
    # 5000 classes: partial sums over many 256-class chunks (`CHUNK` in fused_cpu.c), the last one ragged.
    x, y, w = make_case(shape, weighted, ignored)
    loss = label_smoothing_cross_entropy(x, y, 0.1, w, reduction)
    g = torch.randn(loss.shape)
    grad = torch.autograd.grad(loss, x, g)[0]
    assert kernel_calls
    expected, expected_grad = torch_float64(x, y, w, 0.1, reduction, g)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-6, atol=2e-6)
    assert (grad.double() - expected_grad).abs().max() < 1e-6


@given(n_rows=st.integers(1, 9), n_classes=st.integers(1, 40), eps=st.floats(0, 0.9), weighted=st.booleans(),
       n_ignored=st.integers(0, 3), reduction=st.sampled_from(["mean", "sum", "none"]), seed=st.integers(0, 99),
       smoothing=st.sampled_from(["uniform", "others"]))
@settings(max_examples=60, deadline=None)
def test_property_float32_matches_torch(n_rows, n_classes, eps, weighted, n_ignored, reduction, seed, smoothing):
    assume(smoothing == "uniform" or (n_classes > 1 and eps * n_classes / (n_classes - 1) <= 1))  # PyTorch's limit
    x, y, w = make_case((n_rows, n_classes), weighted, ignored=False, seed=seed)
    y[:n_ignored] = -100
    loss = label_smoothing_cross_entropy(x, y, eps, w, reduction, smoothing=smoothing)
    torch_eps = eps if smoothing == "uniform" else eps * n_classes / (n_classes - 1)
    g = torch.randn(loss.shape)
    expected, expected_grad = torch_float64(x, y, w, torch_eps, reduction, g)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-6, atol=2e-6, equal_nan=True)  # all ignored: 0/0
    if not loss.isnan().any():
        assert (torch.autograd.grad(loss, x, g)[0].double() - expected_grad).abs().max() < 1e-6


def test_exp_is_float32_accurate_down_to_underflow(kernel_calls):
    # Rows [0, z] with target 0 and no smoothing: the gradient on class 1 is exp(z) / (1 + exp(z)), so it shows
    # the kernel's own exp over the whole range that shifted logits take, down to where float32 underflows.
    z = torch.cat([-torch.logspace(-8, 2, 20001), torch.tensor([0.0, -1e30, float("-inf")])])
    x = torch.stack([torch.zeros_like(z), z], 1).requires_grad_()
    loss = label_smoothing_cross_entropy(x, torch.zeros(len(z), dtype=torch.long), 0.0, reduction="sum")
    grad = torch.autograd.grad(loss, x)[0][:, 1].double()
    assert kernel_calls
    exact = torch.sigmoid(z.double())
    normal = exact > torch.finfo(torch.float32).tiny
    assert ((grad - exact).abs() / exact)[normal].max() < 4e-7  # a few float32 ulps
    assert (grad[~normal] - exact[~normal]).abs().max() < 1e-37  # 0 below exp(-88): no denormal results


@pytest.mark.parametrize("shape", [(12, 7), (64, 1000), (4, 5, 3, 2)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_without_grad_the_kernel_computes_the_loss_alone(monkeypatch, shape, reduction, weighted):
    # fastai's validation loss and get_preds(with_loss=True): under no_grad the kernel writes no gradient.
    passed, run = [], c_kernel._kernel
    monkeypatch.setattr(c_kernel, "_kernel", lambda *args: passed.append(args[9]) or run(*args))
    x, y, w = make_case(shape, weighted, ignored=True)
    with torch.no_grad():
        loss = label_smoothing_cross_entropy(x, y, 0.1, w, reduction)
    assert passed == [None]  # the gradient pointer
    expected = F.cross_entropy(x.double(), y, None if w is None else w.double(), reduction=reduction,
                               label_smoothing=0.1)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("n_classes", [16, 17, 31, 37, 100])
@pytest.mark.parametrize("weighted", [False, True])
def test_without_grad_every_class_of_a_row_counts_once(kernel_calls, n_classes, weighted):
    # Without a gradient the kernel does a row's last n_classes % 16 classes as one more 16-class block, whose
    # first lanes the vector loops counted already: each class must count once, special values in any lane too.
    x, y, w = make_case((4 * n_classes, n_classes), weighted, ignored=True)
    x = x.detach()
    for row in range(0, x.shape[0], 4):  # a NaN, +inf or -inf in every position, the overlap and the tail included
        x[row, row // 4] = [float("nan"), float("inf"), -float("inf")][row // 4 % 3]
    with torch.no_grad():
        loss = label_smoothing_cross_entropy(x, y, 0.1, w, "none")
    with_grad = label_smoothing_cross_entropy(x.requires_grad_(), y, 0.1, w, "none")  # no block on this path
    assert len(kernel_calls) == 2
    torch.testing.assert_close(loss, with_grad.detach(), rtol=1e-6, atol=1e-6, equal_nan=True)
    expected = F.cross_entropy(x.detach().double(), y, None if w is None else w.double(), reduction="none",
                               label_smoothing=0.1)
    torch.testing.assert_close(loss.double(), expected.masked_fill(expected.isinf(), float("nan")), rtol=2e-6,
                               atol=2e-6, equal_nan=True)


def test_kernel_equals_the_torch_path_it_replaces(monkeypatch, kernel_calls):
    x, y, w = make_case((33, 300), weighted=True, ignored=True)
    loss = label_smoothing_cross_entropy(x, y, 0.1, w, "none", smoothing="others")
    grad = torch.autograd.grad(loss, x, torch.ones(33))[0]
    assert kernel_calls
    monkeypatch.setattr(c_kernel, "AVAILABLE", False)
    torch_loss = label_smoothing_cross_entropy(x, y, 0.1, w, "none", smoothing="others")
    torch.testing.assert_close(loss, torch_loss)
    torch.testing.assert_close(grad, torch.autograd.grad(torch_loss, x, torch.ones(33))[0])
    assert len(kernel_calls) == 1


def test_threads_give_the_same_bits_as_one_thread(monkeypatch, kernel_calls):
    x, y, w = make_case((256, 1000), weighted=True, ignored=True)
    assert x.numel() >= c_kernel.PARALLEL_NUMEL
    loss = label_smoothing_cross_entropy(x, y, 0.1, w, "none")
    grad = torch.autograd.grad(loss.sum(), x)[0]
    monkeypatch.setattr(c_kernel, "PARALLEL_NUMEL", 2**62)
    one_thread = label_smoothing_cross_entropy(x, y, 0.1, w, "none")
    assert torch.equal(loss, one_thread)
    assert torch.equal(grad, torch.autograd.grad(one_thread.sum(), x)[0])
    assert len(kernel_calls) == 2


def test_rows_of_a_wider_tensor_are_read_in_place(kernel_calls):
    wide = torch.randn(16, 50)
    x = wide[:, 5:45].requires_grad_()  # rows 50 floats apart: no copy is made for the kernel
    y = torch.randint(0, 40, (16,))
    loss = label_smoothing_cross_entropy(x, y, 0.1)
    grad = torch.autograd.grad(loss, x)[0]
    assert kernel_calls and grad.is_contiguous()
    x_ref = x.detach().contiguous().requires_grad_()
    expected = F.cross_entropy(x_ref, y, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, x_ref)[0])


def test_a_wide_row_keeps_float32_precision():
    # 128,000 classes: exp sums over many chunks, added up in double.
    x, y, w = make_case((3, 128000), weighted=True, ignored=False, scale=1.0)
    loss = label_smoothing_cross_entropy(x, y, 0.1, w, "none")
    g = torch.ones(3)
    expected, expected_grad = torch_float64(x, y, w, 0.1, "none", g)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)
    grad = torch.autograd.grad(loss, x, g)[0].double()
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("ids, bad", [([0, 1, 3, 2], 3), ([0, -1, 1, -100], -1)])
def test_the_kernel_checks_ids_as_it_reads_them_and_writes_nothing_on_a_bad_one(kernel_calls, ids, bad):
    # On this path no separate pass over the ids runs before the kernel: its own check must give the usual error.
    x, y = torch.randn(4, 3, requires_grad=True), torch.tensor(ids)
    with pytest.raises(ValueError, match=rf"\[0, 3\) or equal ignore_index=-100; found \[{bad}\]"):
        label_smoothing_cross_entropy(x, y)
    assert kernel_calls
    grad = torch.full_like(x, 7.0)
    with pytest.raises(ValueError, match="target ids must be in"):
        c_kernel.loss_and_grad(x.detach(), y, -100, None, 0.1, True, grad, True)
    assert (grad == 7).all()


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":")[1].split()}


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("cc") is None, reason="needs x86-64 and cc")
@pytest.mark.parametrize("flags", [[], ["-march=x86-64-v3"]], ids=["baseline x86-64", "AVX2"])
def test_every_instruction_set_build_is_as_precise_as_torch_float32(tmp_path, monkeypatch, kernel_calls, flags):
    # The installed library picks its AVX-512, AVX2 or baseline code when it loads, so a test run exercises only
    # one of them. Build the others alone (VECTOR_CLONES empty) and check them here; FMA and lane counts differ.
    if flags and not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("this CPU cannot run AVX2 code")
    source = Path(c_kernel.__file__).with_name("fused_cpu.c")
    library = tmp_path / "fused_cpu.so"
    subprocess.run(["cc", "-O3", "-fopenmp", "-fPIC", "-shared", "-DVECTOR_CLONES=", *flags, "-o", str(library),
                    str(source), "-lm"], check=True)
    monkeypatch.setattr(c_kernel, "_kernel", c_kernel.bind(ctypes.CDLL(str(library))))
    for seed in range(3):
        x, y, w = make_case((64, 1000), weighted=seed == 2, ignored=seed == 1, seed=seed)
        g = torch.randn(64, generator=torch.Generator().manual_seed(seed))
        grad = torch.autograd.grad(label_smoothing_cross_entropy(x, y, 0.1, w, "none"), x, g)[0].double()
        torch32 = torch.autograd.grad(F.cross_entropy(x, y, w, reduction="none", label_smoothing=0.1), x, g)[0]
        expected = torch_float64(x, y, w, 0.1, "none", g)[1]
        assert (grad - expected).abs().max() <= max(1e-6, (torch32.double() - expected).abs().max())
    test_exp_is_float32_accurate_down_to_underflow(kernel_calls)
    test_softmax_of_wide_rows_is_as_precise_as_torch_float32(kernel_calls)
    assert len(kernel_calls) == 5


def test_softmax_of_wide_rows_is_as_precise_as_torch_float32(kernel_calls):
    # Without smoothing, the gradient of the summed loss is softmax(x) - onehot(y): off the target it shows the
    # relative error of the row's sum of exp(z), which every gradient entry carries.
    x, y, _ = make_case((4, 20000), weighted=False, ignored=False, scale=3.0)
    grad = torch.autograd.grad(label_smoothing_cross_entropy(x, y, 0.0, reduction="sum"), x)[0].double()
    assert kernel_calls
    exact = torch.softmax(x.detach().double(), 1)
    off_target = torch.ones_like(exact, dtype=torch.bool).scatter_(1, y[:, None], False)
    error = ((grad - exact).abs() / exact)[off_target].max()
    torch_error = ((torch.softmax(x.detach(), 1).double() - exact).abs() / exact)[off_target].max()
    assert error <= torch_error


@pytest.mark.parametrize("position", [0, 17, 63, 99])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_logit_anywhere_in_a_vector_makes_only_its_row_nan(kernel_calls, position, value):
    # Wide rows run through the vector lanes (and the max's lanes may meet the NaN in any order).
    x, y, _ = make_case((3, 100), weighted=False, ignored=False)
    x = x.detach().clone()
    x[1, position] = value
    y[1] = (position + 1) % 100  # -inf on another class than the target: still covered by the smoothing
    x.requires_grad_()
    loss = label_smoothing_cross_entropy(x, y, 0.1, reduction="none")
    grad = torch.autograd.grad(loss, x, torch.ones(3))[0]
    assert kernel_calls
    assert loss[1].isnan() and loss[[0, 2]].isfinite().all()
    assert grad[[0, 2]].isfinite().all()
    torch.testing.assert_close(loss[[0, 2]], F.cross_entropy(x[[0, 2]], y[[0, 2]], label_smoothing=0.1,
                                                              reduction="none"))
