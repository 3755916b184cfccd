"""The loss under hostile and unusual inputs: a regression test for every defect that issue 11 reports (each reproduces
the issue's own example), and a differential fuzz of every path against PyTorch's `F.cross_entropy`.

Every path is tried where it applies: the fused C kernel (float32 logits that require grad), the fused torch path
(float64), the loss alone without a gradient (fastai's validation and `get_preds`, on the C kernel and on torch), and
the reference path (`fused=False`)."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastai_ls import LabelSmoothingCrossEntropy, label_smoothing_cross_entropy
from fastai_ls.loss.backends import c_kernel

ROOT = Path(__file__).resolve().parents[2]
INF, NAN = float("inf"), float("nan")

# name -> (logits dtype, requires grad, fused); every path that a call can take on the CPU.
PATHS = {
    "C kernel": (torch.float32, True, None),
    "fused torch": (torch.float64, True, None),
    "no grad, C kernel": (torch.float32, False, None),
    "no grad, torch": (torch.float64, False, None),
    "reference": (torch.float64, True, False),
}
ALL_PATHS = pytest.mark.parametrize("path", list(PATHS))


def run(path: str, x, y, grad_output=None, **kwargs):
    """The loss on `path` and, where that path takes one, the gradient of <loss, grad_output> (default ones)."""
    dtype, with_grad, fused = PATHS[path]
    x = torch.as_tensor(x).to(dtype).requires_grad_(with_grad)
    if not with_grad:
        with torch.no_grad():
            return label_smoothing_cross_entropy(x, y, fused=fused, **kwargs), None
    loss = label_smoothing_cross_entropy(x, y, fused=fused, **kwargs)
    g = torch.ones_like(loss) if grad_output is None else torch.as_tensor(grad_output, dtype=loss.dtype)
    return loss, torch.autograd.grad(loss, x, g)[0]


def torch_loss(x, y, dtype, grad_output=None, **kwargs):
    """PyTorch's loss and gradient for the same arguments, in `dtype`."""
    x = torch.as_tensor(x).to(dtype).requires_grad_()
    w = kwargs.pop("weight", None)
    eps = kwargs.pop("eps", 0.1)
    loss = F.cross_entropy(x, y, None if w is None else w.to(dtype), label_smoothing=eps, **kwargs)
    g = torch.ones_like(loss) if grad_output is None else torch.as_tensor(grad_output, dtype=loss.dtype)
    return loss, torch.autograd.grad(loss, x, g)[0]


# --- the C kernel and its loading ---------------------------------------------------------------------------------

RACE = """
import threading, time, torch
from fastai_ls import LabelSmoothingCrossEntropy, label_smoothing_cross_entropy

x = torch.randn(4096, 256, requires_grad=True)
y = torch.randint(0, 256, (4096,))
good, bad = y.clone(), torch.full((4096,), 1 << 40)
stop = False

def writer():  # rewrites the ids while the kernel reads them (ctypes runs it with the GIL released)
    while not stop:
        y.copy_(bad)
        y.copy_(good)

thread = threading.Thread(target=writer)
thread.start()
outcomes = {"raised": 0, "returned": 0}
start = time.perf_counter()
while time.perf_counter() - start < 1.0:
    for grad in (True, False):
        try:
            with torch.set_grad_enabled(grad):
                label_smoothing_cross_entropy(x, y)
            outcomes["returned"] += 1
        except ValueError as err:
            assert "target" in str(err), err
            outcomes["raised"] += 1
stop = True
thread.join()
print(outcomes)
assert outcomes["raised"], "the ids never changed during a call: the race was not exercised"
"""


@pytest.mark.slow
@pytest.mark.skipif(not c_kernel.AVAILABLE, reason="the C kernel is not built")
def test_target_ids_rewritten_by_another_thread_never_crash_the_kernel():
    # Issue 11: the kernel checked every id, then read it again to index x, w and grad: another thread writing
    # the ids in between gave an out-of-bounds read and write (a segfault, 3 runs of 3 with this script).
    result = subprocess.run([sys.executable, "-c", RACE], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr[-3000:])


UNLOADABLE = """
import warnings
warnings.simplefilter("always")
import torch
with warnings.catch_warnings(record=True) as caught:
    from fastai_ls import LabelSmoothingCrossEntropy, label_smoothing_cross_entropy
    from fastai_ls.loss.backends import c_kernel
    assert not c_kernel.AVAILABLE
    y = torch.tensor([0, 2, 1])
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = torch.randn(3, 4).to(dtype).requires_grad_()
        loss = label_smoothing_cross_entropy(x, y)
        loss.backward()
        expected = torch.nn.functional.cross_entropy(x.detach().float(), y, label_smoothing=0.1)
        torch.testing.assert_close(loss.float(), expected, rtol=1e-3, atol=1e-3)
        with torch.no_grad():
            torch.testing.assert_close(label_smoothing_cross_entropy(x, y).float(), expected, rtol=1e-3, atol=1e-3)
mine = [w for w in caught if "fastai_ls" in str(w.message)]
assert len(mine) == 1 and issubclass(mine[0].category, RuntimeWarning), [str(w.message) for w in caught]
print(mine[0].message)
"""


@pytest.mark.slow
@pytest.mark.skipif(not c_kernel.AVAILABLE, reason="the C kernel is not built")
def test_a_truncated_kernel_file_falls_back_to_torch_with_one_warning(tmp_path):
    # Issue 11: a kernel file that exists but cannot be loaded (truncated, wrong architecture, missing libgomp)
    # made every call raise OSError, even float64 and half-precision ones that never use the kernel. A truncated
    # one is the worst case: the dynamic loader maps the missing pages and the process dies (SIGBUS) on touching
    # them, so the file is checked before it is loaded.
    package = tmp_path / "fastai_ls"
    shutil.copytree(ROOT / "fastai_ls", package, ignore=shutil.ignore_patterns("__pycache__"))
    (library,) = package.glob("loss/backends/_fused_cpu*.so")
    library.write_bytes(library.read_bytes()[: library.stat().st_size // 3])
    result = subprocess.run([sys.executable, "-c", UNLOADABLE], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    assert "is truncated" in result.stdout and library.name in result.stdout


def text_section(library: bytes) -> tuple[int, int]:
    """Offset and size of the `.text` section (the code) of a 64-bit little-endian ELF library."""
    sh_offset, = struct.unpack_from("<Q", library, 40)
    sh_size, sh_count, names_index = struct.unpack_from("<HHH", library, 58)
    sections = [struct.unpack_from("<IIQQQQ", library, sh_offset + i * sh_size) for i in range(sh_count)]
    names_at = sections[names_index][4]
    for name, _, _, _, offset, size in sections:
        if library[names_at + name:].startswith(b".text\0"):
            return offset, size
    raise AssertionError("no .text section")


def run_with_kernel(tmp_path, damage) -> subprocess.CompletedProcess:
    """Run UNLOADABLE on a copy of the package whose kernel `damage(library_path)` has changed."""
    package = tmp_path / "fastai_ls"
    shutil.copytree(ROOT / "fastai_ls", package, ignore=shutil.ignore_patterns("__pycache__"), symlinks=True)
    (library,) = package.glob("loss/backends/_fused_cpu*.so")
    damage(library)
    return subprocess.run([sys.executable, "-c", UNLOADABLE], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path)})


@pytest.mark.slow
@pytest.mark.skipif(not c_kernel.AVAILABLE, reason="the C kernel is not built")
def test_a_kernel_whose_code_was_damaged_falls_back_to_torch_with_one_warning(tmp_path):
    # Issue 20: a library whose code (not its headers) was corrupted passed every check, and its first call killed
    # the process (SIGILL). setup.py records the SHA-256 of the library's bytes beside it; load() compares them.
    def damage(library: Path) -> None:
        assert library.with_name(library.name + ".sha256").is_file(), "rebuild: python setup.py build_ext --inplace"
        data = bytearray(library.read_bytes())
        offset, size = text_section(bytes(data))
        data[offset:offset + size] = b"\x0f\x0b" * (size // 2) + b"\x0f" * (size % 2)  # ud2: an illegal instruction
        library.write_bytes(bytes(data))

    result = run_with_kernel(tmp_path, damage)
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    assert "do not have the SHA-256 recorded" in result.stdout and "torch path" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(not c_kernel.AVAILABLE, reason="the C kernel is not built")
@pytest.mark.parametrize("case, reason", [
    ("folder", "Is a directory"),
    ("symlink loop", "Too many levels of symbolic links"),
    ("dangling symlink", "No such file or directory"),
    ("no hash recorded", "no record of its SHA-256"),
])
def test_what_cannot_be_the_kernel_in_its_place_falls_back_with_the_same_warning(tmp_path, case, reason):
    # Issue 20: a folder or a symlink loop where the library should be gave the torch path without the warning the
    # other cases give (the import system passes over what it cannot read as a file).
    def damage(library: Path) -> None:
        if case == "no hash recorded":
            library.with_name(library.name + ".sha256").unlink(missing_ok=True)
            return
        library.unlink()
        if case == "folder":
            library.mkdir()
        elif case == "symlink loop":
            library.symlink_to(library.name)
        else:
            library.symlink_to(library.name + ".gone")

    result = run_with_kernel(tmp_path, damage)
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    assert "cannot be loaded" in result.stdout and reason in result.stdout and "torch path" in result.stdout


@pytest.mark.parametrize("content", [b"#!/bin/sh\n", b"\x7fELF\x02\x01\x01" + bytes(57), b""],
                         ids=["not a library", "an ELF header alone", "empty"])
def test_a_kernel_file_that_is_not_a_library_is_refused_with_a_warning(tmp_path, content):
    library = tmp_path / "_fused_cpu.so"
    library.write_bytes(content)
    with pytest.warns(RuntimeWarning, match="cannot be loaded.*torch path"):
        assert c_kernel.load(str(library)) is None


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_a_kernel_built_from_other_sources_than_those_beside_it_is_refused_with_a_warning(tmp_path):
    # Found in review: a library built from the previous version of fused_cpu.c (an editable install after a pull,
    # without a rebuild) was loaded and called with the current signature: the first call killed the process
    # (SIGSEGV). The library now records the SHA-256 of its source, and one that does not match the fused_cpu.c
    # beside it, or records none (built before the hash existed), is refused like an unloadable one.
    source = Path(c_kernel.__file__).with_name("fused_cpu.c")
    (tmp_path / "fused_cpu.c").write_bytes(source.read_bytes())

    def build(name: str, text: str, digest: str | None) -> str:
        (tmp_path / f"{name}.c").write_text(text)
        defines = [] if digest is None else [f'-DFUSED_CPU_SOURCE_SHA256="{digest}"']
        library = tmp_path / f"{name}.so"
        subprocess.run(["cc", "-O0", "-fopenmp", "-fPIC", "-shared", "-DVECTOR_CLONES=", *defines, "-o",
                        str(library), str(tmp_path / f"{name}.c"), "-lm"], check=True)
        # The record of the library's own bytes, as setup.py writes it: only the source hash is tested here.
        library.with_name(library.name + c_kernel.RECORD_SUFFIX).write_text(
            hashlib.sha256(library.read_bytes()).hexdigest())
        return str(library)

    text = source.read_text()
    assert c_kernel.load(build("current", text, hashlib.sha256(source.read_bytes()).hexdigest())) is not None
    for library, reason in [(build("other", text, "0" * 64), "another version of fused_cpu.c"),
                            (build("unhashed", text, None), "another version of fused_cpu.c"),
                            (build("old", text.replace("fused_cpu_source_sha256", "renamed"), None), "no source hash")]:
        with pytest.warns(RuntimeWarning, match=f"cannot be loaded .*{reason}.*torch path"):
            assert c_kernel.load(library) is None


# --- eps = 0 ------------------------------------------------------------------------------------------------------


@ALL_PATHS
def test_eps_zero_ignores_a_minus_inf_logit_on_a_wrong_class_like_torch(path):
    # Issue 11: eps=0 (the plain cross-entropy baseline) gave NaN here; PyTorch gives 0.2014.
    x, y = torch.tensor([[2.0, -INF, 0.5]]), torch.tensor([0])
    loss, grad = run(path, x, y, eps=0.0)
    assert round(loss.item(), 4) == 0.2014
    torch.testing.assert_close(loss, torch_loss(x, y, loss.dtype, eps=0.0)[0])
    if grad is not None:
        torch.testing.assert_close(grad, torch_loss(x, y, grad.dtype, eps=0.0)[1])


@ALL_PATHS
def test_eps_zero_with_finite_logits_too_far_apart_to_sum_is_finite_like_torch(path):
    # Issue 11: the smoothing term's sum of logits overflows float32 here; with eps=0 it must not be evaluated.
    x, y = torch.tensor([[1e38, -1e38] * 10]), torch.tensor([0])
    loss, grad = run(path, x, y, eps=0.0, reduction="none")
    assert round(loss.item(), 4) == 2.3026 == round(math.log(10), 4)
    if grad is not None:
        torch.testing.assert_close(grad, torch_loss(x, y, grad.dtype, eps=0.0, reduction="none")[1])


# --- class weights ------------------------------------------------------------------------------------------------


@ALL_PATHS
def test_a_weight_that_requires_grad_raises_like_torch(path):
    # Issue 11: the fused path silently dropped the weight's gradient, the reference path computed one. PyTorch
    # raises whenever grad mode is on, even for logits that need no gradient, and computes the loss under no_grad.
    dtype, with_grad, fused = PATHS[path]
    x, y = torch.randn(4, 3, dtype=dtype, requires_grad=with_grad), torch.tensor([0, 1, 2, 0])
    w = torch.rand(3, dtype=dtype, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        F.cross_entropy(x, y, w, label_smoothing=0.1)
    with pytest.raises(RuntimeError, match="weight requires grad.*weight.detach"):
        label_smoothing_cross_entropy(x, y, weight=w, fused=fused)
    with torch.no_grad():
        expected = F.cross_entropy(x, y, w, label_smoothing=0.1)
        torch.testing.assert_close(label_smoothing_cross_entropy(x, y, weight=w, fused=fused), expected)


@pytest.mark.parametrize("path", ["C kernel", "no grad, C kernel"])
@pytest.mark.parametrize("weight", [[1e39, 1, 1, 1], [1e-300] * 4, [1, 1e-40, 1, 1]],
                         ids=["overflows", "underflows to 0", "subnormal"])
def test_float64_weights_that_float32_cannot_hold_raise_instead_of_turning_inf_or_zero(path, weight):
    # Issue 11: float64 weights were checked as float64, then cast to float32: [1e39, 1, 1, 1] became inf and
    # all-1e-300 became 0, and both gave NaN where PyTorch (float64 logits) gives a number.
    x, y = torch.randn(4, 4), torch.tensor([0, 1, 2, 3])
    w = torch.tensor(weight, dtype=torch.float64)
    with pytest.raises(ValueError, match="cannot be represented in torch.float32"):
        run(path, x, y, weight=w)


@pytest.mark.parametrize("path", ["fused torch", "no grad, torch", "reference"])
@pytest.mark.parametrize("weight", [[1e39, 1, 1, 1], [1e-300] * 4])
def test_float64_weights_on_float64_logits_give_torch_numbers(path, weight):
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    w = torch.tensor(weight, dtype=torch.float64)
    loss, grad = run(path, x, y, weight=w)
    expected, expected_grad = torch_loss(x, y, torch.float64, weight=w)
    assert expected.isfinite()
    torch.testing.assert_close(loss, expected)
    if grad is not None:
        torch.testing.assert_close(grad, expected_grad)


@ALL_PATHS
@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_mean_over_only_zero_weight_classes_is_nan_like_torch(path, eps):
    # Issue 11 (found by the differential fuzz): every kept target in a zero-weight class gave inf; PyTorch's
    # 'mean' is NaN, with a NaN gradient on the kept rows and 0 on ignored ones.
    x = torch.tensor([[-0.0029, -0.0048], [-0.0003, -0.0106], [1.0, 2.0]])
    t, w = torch.tensor([0, 0, -100]), torch.tensor([0.0, 0.9872])
    loss, grad = run(path, x, t, eps=eps, weight=w)
    expected, expected_grad = torch_loss(x, t, loss.dtype, eps=eps, weight=w)
    assert loss.isnan() and expected.isnan()
    if grad is not None:
        assert grad[:2].isnan().all() and (grad[2] == 0).all()
        torch.testing.assert_close(grad, expected_grad, equal_nan=True)
    for reduction in ("sum", "none"):  # finite, as in PyTorch
        loss, _ = run(path, x, t, eps=eps, weight=w, reduction=reduction)
        torch.testing.assert_close(loss, torch_loss(x, t, loss.dtype, eps=eps, weight=w, reduction=reduction)[0])


@ALL_PATHS
@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_a_non_contiguous_weight_is_read_through_its_strides_on_every_path(path, layout):
    # Found in review: the C kernel read a float32 weight from its data pointer as if contiguous, so every other
    # entry of a strided weight was silently wrong, and an expanded one (stride 0, one stored number) was read past
    # its end (AddressSanitizer: heap-buffer-overflow); the Triton kernels did the same.
    dtype = PATHS[path][0]
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, -100, 1])
    stored = torch.tensor([1.0, 9.0, 2.0, 9.0, 0.5, 9.0, 3.0, 9.0], dtype=dtype)
    w = stored[::2] if layout == "strided" else stored[:1].expand(4)
    for reduction in ("mean", "none"):
        loss, grad = run(path, x, y, weight=w, reduction=reduction)
        expected, expected_grad = torch_loss(x, y, dtype, weight=w.contiguous(), reduction=reduction)
        torch.testing.assert_close(loss, expected)
        if grad is not None:
            torch.testing.assert_close(grad, expected_grad)


# --- targets and ignore_index -------------------------------------------------------------------------------------


@ALL_PATHS
@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.int8, torch.int16,
                                   torch.int32])
def test_every_integer_target_dtype_gives_the_int64_result(path, dtype):
    # Issue 11: uint16/32/64 targets worked fused but raised NotImplementedError ("aminmax_cpu") without a gradient.
    x = torch.randn(6, 5)
    y = torch.tensor([0, 4, 1, 3, 2, 0])
    expected, expected_grad = run(path, x, y, reduction="none")
    loss, grad = run(path, x, y.to(dtype), reduction="none")
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    if grad is not None:
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)


@ALL_PATHS
def test_uint64_ids_from_2_63_raise_instead_of_wrapping_to_ignore_index(path):
    # Issue 11: a uint64 id of 2**64 - 100 became -100 as int64, and so was silently ignored.
    x = torch.randn(3, 4)
    y = torch.tensor([0, 2**64 - 100, 1], dtype=torch.uint64)
    with pytest.raises(ValueError, match=r"found uint64 ids \[18446744073709551516\]"):
        run(path, x, y)


@pytest.mark.parametrize("ignore_index", [2**64 - 100, 2**63, -(2**63) - 1])
def test_ignore_index_outside_int64_raises_a_clear_error(ignore_index):
    # Issue 11: 2**64 - 100 silently acted as -100 in the kernel, -2**63 - 1 gave an unclear OverflowError.
    # PyTorch refuses both too ("Overflow when unpacking long long").
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    for path in PATHS:
        with pytest.raises(ValueError, match="ignore_index must fit in int64"):
            run(path, x, y, ignore_index=ignore_index)
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        label_smoothing_cross_entropy(x, y.to(torch.uint64), ignore_index=ignore_index)


# --- gradients ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["C kernel", "fused torch", "reference"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_a_nan_grad_output_leaves_ignored_rows_zero_like_torch(path, reduction):
    # Issue 11: a NaN grad_output wrote NaN into the gradient of ignored rows; PyTorch writes 0 there.
    x, y = torch.randn(3, 4), torch.tensor([0, -100, 2])
    g = torch.full((3,) if reduction == "none" else (), NAN)
    _, grad = run(path, x, y, grad_output=g, reduction=reduction)
    _, expected = torch_loss(x, y, grad.dtype, grad_output=g, reduction=reduction)
    assert (grad[1] == 0).all() and grad[[0, 2]].isnan().all()
    torch.testing.assert_close(grad, expected, equal_nan=True)
    g = torch.full((3,) if reduction == "none" else (), INF)  # inf * 0 is NaN too
    _, grad = run(path, x, y, grad_output=g, reduction=reduction)
    assert (grad[1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_torch_func_grad_equals_autograd(dtype, reduction):
    # Issue 11: torch.func.grad with the default settings failed ("must override the setup_context staticmethod").
    x, y = torch.randn(5, 4, dtype=dtype), torch.tensor([0, 3, -100, 1, 2])
    w = torch.rand(4, dtype=dtype)
    got = torch.func.grad(lambda x: label_smoothing_cross_entropy(x, y, weight=w, reduction=reduction))(x)
    x_ref = x.clone().requires_grad_()
    F.cross_entropy(x_ref, y, w, label_smoothing=0.1, reduction=reduction).backward()
    torch.testing.assert_close(got, x_ref.grad)


def test_torch_func_vmap_and_per_sample_gradients_equal_a_loop():
    # vmap over a batch of problems, and the classic per-sample gradients: vmap(grad(loss)) over the samples.
    x, y = torch.randn(3, 5, 4), torch.randint(0, 4, (3, 5))
    batched = torch.func.vmap(lambda x, y: label_smoothing_cross_entropy(x, y, reduction="none"))(x, y)
    torch.testing.assert_close(batched, torch.stack([F.cross_entropy(a, b, label_smoothing=0.1, reduction="none")
                                                     for a, b in zip(x, y)]))
    rows, ids = x[0], y[0]

    def one_sample_loss(row, t):
        return label_smoothing_cross_entropy(row[None], t[None])

    per_sample = torch.func.vmap(torch.func.grad(one_sample_loss))(rows, ids)
    rows = rows.clone().requires_grad_()  # rows are independent: the gradient of their sum holds each row's own
    expected = torch.autograd.grad(F.cross_entropy(rows, ids, label_smoothing=0.1, reduction="sum"), rows)[0]
    torch.testing.assert_close(per_sample, expected)


def test_torch_func_transforms_still_check_the_ids():
    x, y = torch.randn(2, 3, 4), torch.tensor([[0, 1, 2], [0, 9, 1]])
    with pytest.raises(ValueError, match=r"found \[9\]"):
        torch.func.vmap(lambda x, y: label_smoothing_cross_entropy(x, y))(x, y)
    with pytest.raises(ValueError, match=r"found \[9\]"):
        torch.func.grad(lambda x: label_smoothing_cross_entropy(x, y[1]))(x[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_forward_mode_ad_gives_torch_tangent(dtype, reduction):
    # Found in review: under forward-mode AD (dual tensors) the float32 loss came back without a tangent (the C
    # kernel reads the data pointer: a silent 0 derivative), and float64 raised "forward AD with aten::softmax".
    x, y = torch.randn(5, 4, dtype=dtype), torch.tensor([0, 3, -100, 1, 2])
    w, tangent = torch.rand(4, dtype=dtype), torch.randn(5, 4, dtype=dtype)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, tangent)
        got = torch.autograd.forward_ad.unpack_dual(label_smoothing_cross_entropy(dual, y, weight=w,
                                                                                 reduction=reduction))
        expected = torch.autograd.forward_ad.unpack_dual(F.cross_entropy(dual, y, w, reduction=reduction,
                                                                         label_smoothing=0.1))
    torch.testing.assert_close(got.primal, expected.primal)
    assert got.tangent is not None
    torch.testing.assert_close(got.tangent, expected.tangent)
    jvp = torch.func.jvp(lambda x: label_smoothing_cross_entropy(x, y, weight=w, reduction=reduction), (x,),
                         (tangent,))[1]
    torch.testing.assert_close(jvp, expected.tangent)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_forward_mode_ad_through_the_weight_gives_the_finite_difference(dtype, reduction):
    # Found in review: a dual class weight's tangent was dropped on the fused path (tangent None). The reference
    # path's tangent is the derivative; PyTorch's own (torch 2.14) is not: it disagrees with finite differences.
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 3, -100, 1, 2])
    w, direction, h = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64), 1e-6
    expected = (label_smoothing_cross_entropy(x, y, weight=w + h * direction, reduction=reduction)
                - label_smoothing_cross_entropy(x, y, weight=w - h * direction, reduction=reduction)) / (2 * h)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(w.to(dtype), direction.to(dtype))
        loss = label_smoothing_cross_entropy(x.to(dtype), y, weight=dual, reduction=reduction)
        tangent = torch.autograd.forward_ad.unpack_dual(loss).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent.double(), expected, rtol=1e-4 if dtype == torch.float32 else 1e-6,
                               atol=1e-5 if dtype == torch.float32 else 1e-8)


@pytest.mark.parametrize("path", ["C kernel", "fused torch", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_batched_grad_outputs_give_torch_jacobian(path, reduction):
    # Found in review: `torch.autograd.grad(..., is_grads_batched=True)`, which `torch.autograd.functional.jacobian`
    # and `hessian` use with vectorize=True, failed on the fused path ("vmap: aten::mul_ ... is not possible",
    # "Batching rule not implemented for aten::item"): its backward scaled the stored gradient in place.
    dtype = PATHS[path][0]
    x = torch.randn(4, 3, dtype=dtype)
    y = torch.tensor([0, 2, -100, 1])
    loss, _ = run(path, x, y, reduction=reduction)
    batch = torch.randn(3, *loss.shape, dtype=loss.dtype)
    batch[0] = NAN  # an ignored row's gradient stays 0 whatever it receives, in each batch entry too
    x_ref = x.to(dtype).requires_grad_()
    expected = torch.stack([torch.autograd.grad(F.cross_entropy(x_ref, y, reduction=reduction, label_smoothing=0.1),
                                                x_ref, g)[0] for g in batch])
    expected[:, 2] = 0
    dtype, _, fused = PATHS[path]
    x = x.to(dtype).requires_grad_()
    loss = label_smoothing_cross_entropy(x, y, reduction=reduction, fused=fused)
    got = torch.autograd.grad(loss, x, batch, is_grads_batched=True, retain_graph=True)[0]
    torch.testing.assert_close(got, expected, equal_nan=True)
    got = torch.autograd.grad(loss, x, batch[1:], is_grads_batched=True)[0]  # the stored gradient, reused
    torch.testing.assert_close(got, expected[1:])
    if reduction == "none":
        jacobian = torch.autograd.functional.jacobian(
            lambda x: label_smoothing_cross_entropy(x, y, reduction=reduction, fused=fused), x, vectorize=True)
        torch.testing.assert_close(jacobian, torch.autograd.functional.jacobian(
            lambda x: F.cross_entropy(x, y, reduction=reduction, label_smoothing=0.1), x).index_fill(1, y.eq(-100)
                                                                                                .nonzero()[0], 0.0))


@pytest.mark.parametrize("fused", [0, 1, "no", np.bool_(False)])
def test_fused_must_be_a_bool_or_none(fused):
    # Found in review: `fused` was read by truthiness and identity, so fused=0 took the fused path (not the
    # reference one that fused=False selects) and fused="no" the fused path too.
    x, y = torch.randn(3, 4, requires_grad=True), torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match="fused must be True, False or None"):
        label_smoothing_cross_entropy(x, y, fused=fused)
    with pytest.raises(TypeError, match="fused must be True, False or None"):
        LabelSmoothingCrossEntropy(fused=fused)


# --- the differential fuzz ----------------------------------------------------------------------------------------

# Special logits; huge ones stay below the size where a sum of a row's float32 logits would overflow (see the README:
# with eps > 0 PyTorch and we both give inf or NaN there).
SPECIAL = st.sampled_from([-INF, INF, NAN, 1e30, -1e30, 0.0, 30.0, -30.0])


@st.composite
def problems(draw):
    n_rows, n_classes = draw(st.integers(0, 5)), draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    x = 4 * torch.randn(n_rows, n_classes, generator=gen)
    for _ in range(draw(st.integers(0, 2)) if n_rows else 0):  # a few special logits
        x[draw(st.integers(0, n_rows - 1)), draw(st.integers(0, n_classes - 1))] = draw(SPECIAL)
    y = torch.randint(0, n_classes, (n_rows,), generator=gen)
    y[torch.rand(n_rows, generator=gen) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = -100
    weight = None
    if draw(st.booleans()):
        weight = torch.tensor(draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.5]) | st.floats(0, 3),
                                            min_size=n_classes, max_size=n_classes)))
    eps = draw(st.sampled_from([0.0, 0.1]) | st.floats(0, 0.95))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    grad_output = None
    if draw(st.booleans()):
        grad_output = torch.randn((n_rows,) if reduction == "none" else (), generator=gen)
        if draw(st.booleans()):
            grad_output.view(-1)[:1] = NAN
    return x, y, dict(eps=eps, weight=weight, reduction=reduction), grad_output


def inf_as_nan(t: torch.Tensor) -> torch.Tensor:
    """PyTorch's loss with +inf read as NaN: we report an infinite loss as NaN (README, non-finite logits)."""
    return t.masked_fill(t.isinf(), NAN)


@pytest.mark.slow
@pytest.mark.parametrize("path", list(PATHS))
@given(problem=problems())
@settings(max_examples=30, deadline=None)
def test_differential_fuzz_against_torch(path, problem):
    x, y, kwargs, grad_output = problem
    loss, grad = run(path, x, y, grad_output, **kwargs)
    # PyTorch in float64 on the same (float32) logits: float32 paths are checked to float32's precision.
    expected, expected_grad = torch_loss(x, y, torch.float64, grad_output, **dict(kwargs))
    tolerance = dict(rtol=1e-4, atol=1e-5) if loss.dtype == torch.float32 else dict(rtol=1e-7, atol=1e-9)
    loss, grad = loss.double(), None if grad is None else grad.double()
    torch.testing.assert_close(loss, inf_as_nan(expected), equal_nan=True, **tolerance)
    if grad is not None and expected.isfinite().all():
        expected_grad[y == -100] = 0  # an ignored row's gradient is 0 even where its logits are not finite (README)
        torch.testing.assert_close(grad, expected_grad, equal_nan=True, **tolerance)
