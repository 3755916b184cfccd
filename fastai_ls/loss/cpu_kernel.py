"""The compiled CPU kernel of the fused loss (`fused_cpu.c`), called through ctypes: float32 logits on the CPU.

The kernel is built at install time as an optional extension (setup.py). Where it could not be built (no C compiler)
`AVAILABLE` is False and `fused.py` runs the same arithmetic as torch operations instead.
"""

from __future__ import annotations

import ctypes
import importlib.util

import torch
from torch import Tensor

from fastai_ls.loss.formula import check_ids

__all__ = ["AVAILABLE", "accepts", "loss_and_grad"]

# Below this many logits one thread is quicker than waking a second (torch's own grain size for elementwise work).
PARALLEL_NUMEL = 32768


def _load() -> ctypes._CFuncPtr | None:
    spec = importlib.util.find_spec("fastai_ls.loss._fused_cpu")
    return None if spec is None or not spec.origin else bind(ctypes.CDLL(spec.origin))


def bind(library: ctypes.CDLL) -> ctypes._CFuncPtr:
    """The kernel's function in a loaded build of `fused_cpu.c`, with its C signature declared."""
    func = library.fused_cpu_loss_and_grad
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    func.argtypes = [pointer, size, size, size, pointer, size, pointer, ctypes.c_double, ctypes.c_int,
                     pointer, pointer, ctypes.POINTER(ctypes.c_double), ctypes.c_int]
    func.restype = ctypes.c_int64
    return func


_kernel = _load()
AVAILABLE = _kernel is not None


def accepts(input: Tensor) -> bool:
    """Whether the kernel can take these logits: float32 on the CPU."""
    return AVAILABLE and input.dtype == torch.float32 and input.is_cpu


def loss_and_grad(x: Tensor, t: Tensor, ignore_index: int, w: Tensor | None, eps: float, mean: bool,
                  grad: Tensor) -> tuple[Tensor, float]:
    """Per-row losses of `x` (M, C) against int64 ids `t`, and their sum (PyTorch's 'mean' if `mean`); the gradient
    of that sum or mean is written into `grad` (contiguous). The kernel checks the ids: one that is neither a class
    nor `ignore_index` raises ValueError before anything is written."""
    n_rows, n_classes = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    t, loss, reduced = t.contiguous(), x.new_empty(n_rows), ctypes.c_double()
    w = None if w is None else w.contiguous()
    n_threads = torch.get_num_threads() if x.numel() >= PARALLEL_NUMEL else 1
    bad_row = _kernel(x.data_ptr(), n_rows, n_classes, x.stride(0), t.data_ptr(), ignore_index,
                      None if w is None else w.data_ptr(), eps, mean, grad.data_ptr(), loss.data_ptr(), reduced,
                      n_threads)
    if bad_row >= 0:
        check_ids(t, n_classes, ignore_index)  # raises, naming the ids
    return loss, reduced.value
