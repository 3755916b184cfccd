"""The calibration-loss family on the backends: focal, FLSD-53, MbLS, MaxSup, LogitNorm and the confidence penalty,
each "a cross-entropy plus a term on a few row statistics" (lse, z_y, sum z, z_max, the MbLS margin term, the norm,
the entropy), so one read of each logit row gives its loss and gradient.

`fastai_ls.loss.backends.fused_family_loss` is the entry point: it checks the arguments once, chooses a backend
(the C kernel for float32 CPU logits, Triton for CUDA, else the blockwise backend, which computes the same
closed-form gradient with torch operations, `family_rows`; the reference one, the papers' formulas of
`family_formulas.py`, under `torch.func` transforms and forward-mode AD, and for second derivatives) and runs it.

Every loss is PyTorch's weighted mean: the row's loss is multiplied by its target's class weight w_y, and 'mean'
divides by the sum of w_y over the rows not ignored.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import torch
from torch import Tensor

from fastai_ls.loss.backends.base import RowLoss
from fastai_ls.loss.backends.family_formulas import LOGITNORM_DELTA

__all__ = ["KINDS", "KIND_CODES", "check_family_params", "family_rows"]

# The losses and the names of their parameters (`params`), in the order the C kernel takes them (at most 2). The
# focal losses here have no label smoothing: smoothed, each class has its own focal factor (1 - p_c)^gamma
# (`fastai_ls.loss.focal`), which the loss classes compute with torch operations.
KINDS = {"focal": ("gamma",), "adaptive_focal": (), "margin": ("margin", "alpha"), "maxsup": ("alpha",),
         "logitnorm": ("tau",), "confidence_penalty": ("beta",)}
# The kernels' codes of the losses (fused_cpu.c's enum, triton_family.py's KIND).
KIND_CODES = {"focal": 1, "adaptive_focal": 2, "margin": 3, "maxsup": 4, "logitnorm": 5, "confidence_penalty": 6}


def check_family_params(kind: str, params: Mapping[str, float]) -> dict[str, float]:
    """The parameters of loss `kind` as Python floats, after checking them: exactly `KINDS[kind]`, real and finite,
    gamma, margin, alpha and beta non-negative, tau positive."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {tuple(KINDS)}, got {kind!r}")
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of parameter names to numbers, got {type(params).__name__}")
    names = KINDS[kind]
    if set(params) != set(names):
        raise ValueError(f"the {kind} loss takes the parameters {names}, got {tuple(params)}")
    checked = {}
    for name in names:
        value = params[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{name} must be finite, got {value}")
        if name == "tau" and not value > 0:
            raise ValueError(f"tau must be positive, got {value}")
        if name in ("gamma", "margin", "alpha", "beta") and value < 0:
            raise ValueError(f"{name} must be non-negative, got {value}")
        checked[name] = value
    return checked


def family_rows(x: Tensor, y: Tensor, spec: RowLoss, w: Tensor | None, scale: Tensor | float,
                grad: Tensor | None) -> Tensor:
    """Per-row losses of `x` (M, C, the compute dtype) against valid ids `y`, each row weighted by w_y; with `grad`,
    writes into it `scale` (a number, or one per row) times their gradient: the closed form that the C kernel
    computes (`fused_cpu.c`'s family_row), with torch operations."""
    kind, p = spec.kind, spec.params
    n_classes = x.shape[1]
    m, arg = x.max(1)
    k = None
    if kind == "logitnorm":
        norm = torch.linalg.vector_norm(x, dim=1)
        k = 1 / (p["tau"] * (norm + LOGITNORM_DELTA))
    z = x - m[:, None] if k is None else (x - m[:, None]) * k[:, None]
    e = z.exp()
    s = e.sum(1)
    log_s = s.log()
    prob = e / s[:, None]
    yc = y[:, None]
    z_y = z.gather(1, yc).squeeze(1)
    w_y = x.new_ones(()) if w is None else w[y]
    true_class = w_y  # subtracted on the true class
    arg_add = None  # added on the first largest logit
    uniform = None  # subtracted from every class last (MaxSup), so that a one-class row's gradient is exactly 0
    if kind in ("focal", "adaptive_focal"):
        ce = w_y * (log_s - z_y)
        log_p = z_y - log_s
        p_y, q = log_p.exp(), -torch.expm1(log_p)
        gamma = p["gamma"] if kind == "focal" else torch.where(p_y < 0.2, 5.0, 3.0).to(x.dtype)
        f = q ** gamma
        # K = 0 where p_y rounds to 1 (q = 0, ce = 0): q^(gamma - 1) is infinite there for gamma < 1, the limit 0.
        big_k = torch.where(q > 0, ce * gamma * q ** (gamma - 1) * p_y, 0.0) if kind != "focal" or gamma \
            else torch.zeros_like(ce)
        loss = f * ce
        true_class = f * w_y + big_k
        g = true_class[:, None] * prob if grad is not None else None
    elif kind == "margin":
        below = (m - p["margin"])[:, None]
        active = x < below
        penalty = torch.where(active, below - x, 0.0).sum(1)
        loss = w_y * (log_s - z_y + p["alpha"] / n_classes * penalty)
        g = (w_y * prob.T).T - (w_y * (p["alpha"] / n_classes))[..., None] * active if grad is not None else None
        arg_add = w_y * (p["alpha"] / n_classes) * active.sum(1)
    elif kind == "maxsup":
        loss = w_y * (log_s - z_y + p["alpha"] * (m - x.mean(1)))
        g = (w_y * prob.T).T if grad is not None else None
        arg_add = w_y * p["alpha"] * x.new_ones(x.shape[0])
        uniform = arg_add / n_classes
    elif kind == "logitnorm":
        loss = w_y * (log_s - z_y)
        if grad is not None:
            x_y = x.gather(1, yc).squeeze(1)
            scale_x = w_y * ((prob * x).sum(1) - x_y) / (norm * p["tau"] * (norm + LOGITNORM_DELTA) ** 2)
            g = ((w_y * k) * prob.T).T - torch.where(norm > 0, scale_x, 0.0)[:, None] * x
        true_class = w_y * k
    else:  # confidence_penalty
        pz = torch.where(prob > 0, prob * z, 0.0).sum(1)
        loss = w_y * (log_s - z_y - p["beta"] * (log_s - pz))
        if grad is not None:
            g = torch.where(prob > 0, prob * (1 + p["beta"] * (z - pz[:, None])), 0.0)
            g = (w_y * g.T).T
    if grad is not None:
        g.scatter_add_(1, yc, -(true_class * x.new_ones(x.shape[0]))[:, None])
        if arg_add is not None:
            g.scatter_add_(1, arg[:, None], arg_add[:, None].to(g.dtype))
        if uniform is not None:
            g = g - uniform[:, None].to(g.dtype)
        grad.copy_(g * (scale[:, None] if isinstance(scale, Tensor) and scale.dim() else scale))
    return loss
