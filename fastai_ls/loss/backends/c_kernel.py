"""The C kernel backend: the compiled CPU kernel of the fused loss (`fused_cpu.c`), called through ctypes, for
float32 logits on the CPU. It reads each row once and finishes its gradient while the row is in cache, and checks
the ids and weights itself as it reads them (so the loss makes no separate pass for the checks).

The kernel is built at install time as an optional extension (setup.py), which writes the SHA-256 of the library's
bytes beside it (`<library>.sha256`). Where it could not be built (no C compiler) `AVAILABLE` is False and the
blockwise backend runs the same arithmetic as torch operations instead; where something is there but cannot be
loaded (truncated, damaged or changed since it was built, built for another machine or from other sources, a missing
OpenMP runtime, a folder or a broken link in its place) the same happens, with one warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import importlib.util
import os
import struct
import warnings

import torch
from torch import Tensor

from fastai_ls.loss.backends.autograd import FusedBackend
from fastai_ls.loss.backends.base import RowLoss, Targets, per_position
from fastai_ls.loss.backends.family import BINS, KIND_CODES, kernel_params
from fastai_ls.loss.checks import check_ids, check_weight_values, weight_in

__all__ = ["AVAILABLE", "accepts", "loss_and_grad", "CKernelBackend", "C_KERNEL"]

# Below this many logits one thread is quicker than waking a second (torch's own grain size for elementwise work).
PARALLEL_NUMEL = 32768
# The kernel's return codes besides a bad row (>= 0); see fused_cpu.c.
DONE, BAD_WEIGHT, NO_MEMORY, BAD_KIND = -1, -2, -3, -4

# The file beside the library, `<library><RECORD_SUFFIX>`, holding the SHA-256 of its bytes: setup.py writes it.
RECORD_SUFFIX = ".sha256"


def load(path: str | None) -> ctypes._CFuncPtr | None:
    """The kernel's function in the library at `path`, or None: when `path` is None (not built), or with a warning
    when the library cannot be loaded, so that every call takes the torch path instead of failing."""
    if path is None:
        return None
    try:
        _check_not_truncated(path)
        _check_recorded_hash(path)
        library = ctypes.CDLL(path)
        _check_built_from_the_source_beside_it(library, path)
        return bind(library)
    except (OSError, AttributeError) as err:  # not a loadable library for this machine, or not ours
        warnings.warn(f"fastai_ls: the compiled loss kernel {path} cannot be loaded ({err}); the loss runs its torch "
                      f"path instead (same results, slower on float32 CPU logits). Reinstall fastai_ls to rebuild it "
                      f"(in a source checkout: python setup.py build_ext --inplace).", RuntimeWarning, stacklevel=2)
        return None


def _check_built_from_the_source_beside_it(library: ctypes.CDLL, path: str) -> None:
    """Raise OSError if `fused_cpu.c` lies beside the library (a source checkout, an editable install) and the library
    was built from another version of it: after a pull without a rebuild, the previous version's library would be
    called with the current signature (one such build wrote past its output and crashed the process). An installed
    package carries no source, and its library was built with the rest of it."""
    source = os.path.join(os.path.dirname(path), "fused_cpu.c")
    if not os.path.exists(source):
        return
    with open(source, "rb") as file:
        expected = hashlib.sha256(file.read()).hexdigest()
    try:
        built_from = library.fused_cpu_source_sha256
    except AttributeError:
        raise OSError("it was built from an older fused_cpu.c, which recorded no source hash") from None
    built_from.restype, built_from.argtypes = ctypes.c_char_p, []
    if built_from().decode() != expected:
        raise OSError("it was built from another version of fused_cpu.c than the one beside it")


def _check_recorded_hash(path: str) -> None:
    """Raise OSError unless the library's bytes have the SHA-256 recorded beside it when it was built: a library whose
    code was damaged or changed since would be loaded, and the first call could kill the process (SIGILL, SIGSEGV)
    instead of raising. Opening a folder or a symlink loop raises OSError too."""
    with open(path, "rb") as file:
        digest = hashlib.sha256(file.read()).hexdigest()
    record = path + RECORD_SUFFIX
    try:
        with open(record) as file:
            recorded = file.read().strip()
    except FileNotFoundError:
        raise OSError(f"no record of its SHA-256 ({os.path.basename(record)}) lies beside it: it was built before "
                      f"the hash was recorded, or copied without it") from None
    if digest != recorded:
        raise OSError(f"its bytes do not have the SHA-256 recorded in {os.path.basename(record)} when it was built: "
                      f"it was damaged or changed since")


def _check_not_truncated(path: str) -> None:
    """Raise OSError if the ELF file at `path` ends before its own headers and loaded segments: the dynamic loader
    maps a truncated file's missing pages all the same, and touching them kills the process (SIGBUS) instead of
    raising. Other files (not ELF, or 32-bit) are left to the loader, which rejects what it cannot read."""
    with open(path, "rb") as file:
        header = file.read(64)
        if len(header) < 64 or header[:5] != b"\x7fELF\x02" or header[5] not in (1, 2):
            return
        order = "<" if header[5] == 1 else ">"
        ph_offset, sh_offset = struct.unpack_from(order + "QQ", header, 32)
        ph_size, ph_count, sh_size, sh_count = struct.unpack_from(order + "HHHH", header, 54)
        needed = max(ph_offset + ph_size * ph_count, sh_offset + sh_size * sh_count)
        file.seek(ph_offset)
        program_headers = file.read(ph_size * ph_count)
    for i in range(len(program_headers) // ph_size if ph_size >= 56 else 0):
        kind, _, offset, _, _, file_size = struct.unpack_from(order + "IIQQQQ", program_headers, i * ph_size)
        if kind == 1:  # PT_LOAD
            needed = max(needed, offset + file_size)
    size = os.path.getsize(path)
    if size < needed:
        raise OSError(f"{path} is truncated: {size} bytes of {needed}")


def bind(library: ctypes.CDLL) -> ctypes._CFuncPtr:
    """The kernel's function in a loaded build of `fused_cpu.c`, with its C signature declared; the family's
    function (`fused_cpu_family`) is its attribute `family`."""
    func = library.fused_cpu_loss_and_grad
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    func.argtypes = [pointer, size, size, size, pointer, size, pointer, ctypes.c_double, ctypes.c_int,
                     pointer, pointer, pointer, ctypes.c_int, ctypes.c_double]
    func.restype = ctypes.c_int64
    family = library.fused_cpu_family
    family.argtypes = [pointer, size, size, size, pointer, size, pointer, ctypes.c_int, pointer, ctypes.c_int,
                       pointer, pointer, pointer, ctypes.c_int]
    family.restype = ctypes.c_int64
    func.family = family
    return func


def _built_library() -> str | None:
    """The path of the built kernel, or None where there is none."""
    spec = importlib.util.find_spec("fastai_ls.loss.backends._fused_cpu")
    if spec is not None and spec.origin:
        return spec.origin
    # The import system passes over an entry it cannot read as a file (a folder, a symlink loop, a dangling link):
    # that is a damaged build, for `load` to report, rather than no build.
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(os.path.dirname(__file__), "_fused_cpu" + suffix)
        if os.path.lexists(path):
            return path
    return None


_kernel = load(_built_library())
AVAILABLE = _kernel is not None


def accepts(input: Tensor) -> bool:
    """Whether the kernel can take these logits: float32 on the CPU."""
    return AVAILABLE and input.dtype == torch.float32 and input.is_cpu


def loss_and_grad(x: Tensor, t: Tensor, ignore_index: int, w: Tensor | None, eps: float, mean: bool,
                  grad: Tensor | None, per_row: bool, spec: RowLoss | None = None) -> Tensor:
    """The per-row losses of `x` (M, C) against int64 ids `t` if `per_row`, else their sum (PyTorch's 'mean' if
    `mean`) as a 0-d tensor. With `grad` (contiguous, M x C) the gradient of that sum or mean is written into it.

    The kernel checks the float32 weights `w` and the ids, reading each id once: a negative or non-finite weight, or
    an id that is neither a class nor `ignore_index`, raises ValueError before anything is written. `spec` (default:
    label smoothing with `eps`) picks the loss of the family and holds its parameters."""
    n_rows, n_classes = x.shape
    # The kernel indexes the ids and weights with unit stride: a strided or expanded (stride 0) view is copied, or
    # it would be read wrong, and past its end.
    x = x if x.stride(1) == 1 else x.contiguous()
    t = t if t.is_contiguous() else t.contiguous()
    w = w if w is None or w.is_contiguous() else w.contiguous()
    out = x.new_empty(n_rows if per_row else ())
    n_threads = torch.get_num_threads() if x.numel() >= PARALLEL_NUMEL else 1
    pointers = (None if grad is None else grad.data_ptr(), out.data_ptr() if per_row else None,
                None if per_row else out.data_ptr(), n_threads)
    if spec is None or spec.kind == "label_smoothing":
        z_loss = 0.0 if spec is None else spec.z_loss
        code = _kernel(x.data_ptr(), n_rows, n_classes, x.stride(0), t.data_ptr(), ignore_index,
                       None if w is None else w.data_ptr(), eps, mean, *pointers, z_loss)
    else:
        values = kernel_params(spec)
        if spec.kind == "ada_focal":  # the bins follow: gammas, then the edges if there are any
            values += [v for name in BINS if spec.params[name] is not None for v in spec.params[name].tolist()]
        params = (ctypes.c_double * len(values))(*values)
        code = _kernel.family(x.data_ptr(), n_rows, n_classes, x.stride(0), t.data_ptr(), ignore_index,
                              None if w is None else w.data_ptr(), KIND_CODES[spec.kind], params, mean, *pointers)
    if code != DONE:
        _raise(code, t, n_classes, ignore_index, w)
    return out


def _raise(code: int, t: Tensor, n_classes: int, ignore_index: int, w: Tensor | None) -> None:
    """The error for the kernel's return `code`, naming the problem as the checks of the other paths do."""
    if code == BAD_KIND:
        raise ValueError("fastai_ls: the loss kernel does not know this loss")
    if code == NO_MEMORY:
        raise MemoryError(f"fastai_ls: no memory for the loss kernel's buffers ({t.numel()} ids)")
    if code == BAD_WEIGHT:
        check_weight_values(w)  # raises, naming the problem
        raise ValueError("weight must be finite and non-negative (it changed while the loss read it)")
    check_ids(t, n_classes, ignore_index)  # raises, naming the ids
    raise ValueError(f"target ids must be in [0, {n_classes}) or equal ignore_index={ignore_index}; the id in row "
                     f"{code} was not (the target changed while the loss read it)")


class CKernelBackend(FusedBackend):
    """`loss_and_grad` as a backend: the kernel also finds the ignored rows and the 'mean' divisor itself, reduces the
    loss (in double precision) and writes the gradient with the 'mean' divisor applied."""

    name = "C kernel"

    def accepts(self, input: Tensor) -> bool:
        return accepts(input)

    def prepare(self, input: Tensor, t: Tensor, weight: Tensor | None, ignore_index: int) -> Targets:
        return Targets(t, None, weight_in(weight, torch.float32, input.device))

    def forward(self, input: Tensor, x: Tensor, targets: Targets, spec: RowLoss, reduction: str, ignore_index: int,
                grad: Tensor | None) -> Tensor:
        loss = loss_and_grad(x, targets.y, ignore_index, targets.w, spec.eps, reduction == "mean", grad,
                             reduction == "none", spec)
        return per_position(loss, input.shape) if reduction == "none" else loss


C_KERNEL = CKernelBackend()
