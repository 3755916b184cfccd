"""The loss's math, tensors in and tensors out (torch only, no fastai): the formula (`formula.py`), the argument
checks (`checks.py`), the public function that checks once, chooses a backend and runs it (`functional.py`), and the
backends (`backends/`: reference, blockwise, the C kernel, Triton, and the autograd Function of the fused ones)."""

from fastai_ls.loss.functional import label_smoothing_cross_entropy

__all__ = ["label_smoothing_cross_entropy"]
