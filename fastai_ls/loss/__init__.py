"""The loss's math, tensors in and tensors out (torch only, no fastai): the formula and its checks
(`formula.py`), the public function that dispatches between the reference and the fused path (`functional.py`),
and the fused path with its kernels (`fused.py`; `fused_cpu.c` via `cpu_kernel.py`; `triton_kernel.py`)."""

from fastai_ls.loss.functional import label_smoothing_cross_entropy

__all__ = ["label_smoothing_cross_entropy"]
