"""The calibration-loss family on the backends: focal, adaptive focal (FLSD-53), AdaFocal, MbLS, MaxSup, LogitNorm
and the confidence penalty, each "a cross-entropy plus a term on a few row statistics" (lse, z_y, p_y, sum z, z_max,
the MbLS margin term, the norm, the entropy), so one read of each logit row gives its loss and gradient; each with the
z-loss lambda w_y lse(x)^2 of the raw logits, and the focal losses with label smoothing, whose per-class focal factors
(1 - p_c)^gamma_c take one more sweep of the row while it is in cache.

`fastai_ls.loss.backends.fused_family_loss` is the entry point: it checks the arguments once, chooses a backend
(the C kernel for float32 CPU logits, Triton for CUDA, else the blockwise backend, which computes the same
closed-form gradient with torch operations, `family_rows`; the reference one, the papers' formulas of
`family_formulas.py`, under `torch.func` transforms and forward-mode AD, and for second derivatives) and runs it.

Every loss is PyTorch's weighted mean: the row's loss is multiplied by its target's class weight w_y, and 'mean'
divides by the sum of w_y over the rows not ignored.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch
from torch import Tensor

from fastai_ls.loss.backends.base import RowLoss
from fastai_ls.loss.backends.family_formulas import LOGITNORM_DELTA, ada_focal_gamma
from fastai_ls.loss.checks import _unwrapped

__all__ = ["KINDS", "KIND_CODES", "BINS", "DEFAULTS", "SMOOTHED_KINDS", "check_bins", "check_family_params",
           "kernel_params", "family_rows"]

# The losses and the names of their parameters (`params`), in the order the C kernel takes them (at most 3).
# AdaFocal's bins, `gammas` (B,) and `edges` (B + 1,) or None, are tensors, which the kernels take after the rest.
KINDS = {"focal": ("gamma",), "adaptive_focal": ("threshold", "gamma_below", "gamma_above"),
         "margin": ("margin", "alpha"), "maxsup": ("alpha",), "logitnorm": ("tau",), "confidence_penalty": ("beta",),
         "ada_focal": ("switch", "gammas", "edges")}
# Parameters that may be left out, and their values: FLSD-53's (Mukhoti et al. 2020), AdaFocal's paper's switch and
# equal-width bins.
DEFAULTS = {"adaptive_focal": {"threshold": 0.2, "gamma_below": 5.0, "gamma_above": 3.0},
            "ada_focal": {"switch": 0.2, "edges": None}}
# The losses that take label smoothing (`eps`): each class's term has its own focal factor.
SMOOTHED_KINDS = ("focal", "adaptive_focal")
# The kernels' codes of the losses (fused_cpu.c's enum, triton_family.py's KIND).
KIND_CODES = {"focal": 1, "adaptive_focal": 2, "margin": 3, "maxsup": 4, "logitnorm": 5, "confidence_penalty": 6,
              "ada_focal": 7}
BINS = ("gammas", "edges")  # AdaFocal's tensor parameters


def check_bins(gammas: Tensor, edges: Tensor | None) -> None:
    """Raise unless AdaFocal's `gammas` are a non-empty finite 1-D float tensor and `edges` None or its B + 1
    non-decreasing floats from 0 to 1."""
    if not isinstance(gammas, Tensor) or gammas.dim() != 1 or not gammas.is_floating_point() or not gammas.numel():
        raise ValueError("gammas must be a non-empty 1-D floating-point tensor, one gamma per bin")
    if edges is not None and (not isinstance(edges, Tensor) or edges.shape != (gammas.numel() + 1,)):
        raise ValueError(f"edges must be a tensor of {gammas.numel() + 1} bin edges from 0 to 1 for "
                         f"{gammas.numel()} gammas")
    # A NaN or infinite gamma, or edges out of order, would give every row of its bins a NaN or 0 loss silently.
    # One host read for both checks (a synchronization on a GPU). Under torch.func transforms the values are read
    # from the tensor that holds every sample (`_unwrapped`), whose layout is unknown here: there the edges are
    # checked to lie in [0, 1], their order only outside transforms.
    if edges is not None and not edges.is_floating_point():
        raise ValueError(f"edges must be a floating-point tensor, got {edges.dtype}")
    values = _unwrapped(gammas.detach())
    ok = values.isfinite().all()[None]
    if edges is not None:
        e = edges.detach()
        if torch._C._functorch.is_functorch_wrapped_tensor(e):
            e = _unwrapped(e).to(ok.device)
            fits = ((e >= 0) & (e <= 1)).all()
        else:
            e = e.to(ok.device)
            fits = (e[1:] >= e[:-1]).all() & (e[0] == 0) & (e[-1] == 1)
        ok = torch.cat([ok, fits[None]])
    ok = ok.tolist()
    if not ok[0]:
        raise ValueError(f"gammas must be finite, got {values.reshape(-1).tolist()[:15]}")
    if not all(ok):
        raise ValueError(f"edges must be non-decreasing from 0 to 1, got {e.reshape(-1).tolist()[:16]}")


def check_family_params(kind: str, params: Mapping[str, float | Tensor | None]) -> dict[str, float | Tensor | None]:
    """The parameters of loss `kind` as Python floats (AdaFocal's bins as the tensors given, `check_bins`), after
    checking them: `KINDS[kind]` (those of `DEFAULTS[kind]` may be left out), real and finite, gamma, margin, alpha,
    beta and switch non-negative, tau positive, threshold in [0, 1]."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {tuple(KINDS)}, got {kind!r}")
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of parameter names to numbers, got {type(params).__name__}")
    names = KINDS[kind]
    defaults = DEFAULTS.get(kind, {})
    if not set(params) <= set(names) or not set(names) - set(defaults) <= set(params):
        raise ValueError(f"the {kind} loss takes the parameters {names}, got {tuple(params)}")
    checked = {}
    if kind == "ada_focal":
        check_bins(params["gammas"], params.get("edges"))
        checked.update((name, params.get(name)) for name in BINS)
    for name in names:
        if name in BINS:
            continue
        value = params.get(name, defaults.get(name))
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{name} must be finite, got {value}")
        if name == "tau" and not value > 0:
            raise ValueError(f"tau must be positive, got {value}")
        if name in ("gamma", "gamma_below", "gamma_above", "margin", "alpha", "beta", "threshold", "switch") \
                and value < 0:
            raise ValueError(f"{name} must be non-negative, got {value}")
        if name == "threshold" and value > 1:
            raise ValueError(f"threshold must be at most 1, got {value}")
        checked[name] = value
    return checked


def kernel_params(spec: RowLoss) -> list[float]:
    """The numbers of `spec` as the kernels take them (`fused_cpu.c`'s family_row): the kind's own parameters
    (`KINDS` order, 0 for unused slots; AdaFocal's switch, number of bins and whether it has edges), then the
    z-loss's lambda and the label smoothing eps. AdaFocal's gammas and edges are not read here (on a GPU, that
    would wait for the device)."""
    p = spec.params
    if spec.kind == "ada_focal":
        own = [p["switch"], p["gammas"].numel(), float(p["edges"] is not None)]
    else:
        own = [p[name] for name in KINDS[spec.kind]]
    return own + [0.0] * (3 - len(own)) + [spec.z_loss, spec.eps]


def family_rows(x: Tensor, y: Tensor, spec: RowLoss, w: Tensor | None, scale: Tensor | float,
                grad: Tensor | None) -> Tensor:
    """Per-row losses of `x` (M, C, the compute dtype) against valid ids `y`, each row weighted by w_y; with `grad`,
    writes into it `scale` (a number, or one per row) times their gradient: the closed form that the C kernel
    computes (`fused_cpu.c`'s family_row), with torch operations."""
    kind, p = spec.kind, spec.params
    if kind in SMOOTHED_KINDS and spec.eps:
        return _smoothed_focal_rows(x, y, spec, w, scale, grad)
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
    g = None
    if kind in ("focal", "adaptive_focal", "ada_focal"):
        ce = w_y * (log_s - z_y)
        log_p = z_y - log_s
        p_y, q = log_p.exp(), -torch.expm1(log_p)
        if kind == "ada_focal":
            f, big_k = _ada_focal_factor(ce, p_y, q, p)
        else:
            gamma = p["gamma"] if kind == "focal" else _adaptive_gamma(log_p, p, x.dtype)
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
    if spec.z_loss:
        # LogitNorm's softmax is that of the normalized logits; the z-loss is on the raw ones.
        raw = (m, log_s, prob) if k is None else (m, *_log_sum_and_softmax(x - m[:, None]))
        loss, g = _plus_z_loss(loss, g, spec.z_loss, w_y, *raw)
    if grad is not None:
        g.scatter_add_(1, yc, -(true_class * x.new_ones(x.shape[0]))[:, None])
        if arg_add is not None:
            g.scatter_add_(1, arg[:, None], arg_add[:, None].to(g.dtype))
        if uniform is not None:
            g = g - uniform[:, None].to(g.dtype)
        grad.copy_(g * _per_row(scale))
    return loss


def _adaptive_gamma(log_p: Tensor, p: Mapping[str, float], dtype: torch.dtype) -> Tensor:
    """The adaptive focal loss's gamma for log-probabilities `log_p`: gamma_below under the threshold, else
    gamma_above. log p is compared with log(threshold) in log p's dtype, as `adaptive_focal_rows` does: where p is
    the threshold (all-equal logits, threshold 1/C), comparing p would round differently and pick the other gamma."""
    log_threshold = math.log(p["threshold"]) if p["threshold"] else -math.inf
    return torch.where(log_p < log_threshold, p["gamma_below"], p["gamma_above"]).to(dtype)


def _ada_focal_factor(ce: Tensor, p_y: Tensor, q: Tensor, p: Mapping) -> tuple[Tensor, Tensor]:
    """AdaFocal's factor f and K (the focal losses' ce d f / d z_y term): (1 - p_y)^g where g >= switch, else the
    inverse focal factor (1 + p_y)^|g|, whose K has the opposite sign."""
    gamma = ada_focal_gamma(p_y, p["gammas"], p["edges"])
    focal = gamma >= p["switch"]
    g = gamma.abs()
    f = torch.where(focal, q ** gamma, (1 + p_y) ** g)
    k_focal = torch.where(q > 0, ce * gamma * q ** (gamma - 1) * p_y, 0.0)
    return f, torch.where(focal, k_focal, -ce * g * (1 + p_y) ** (g - 1) * p_y)


def _log_sum_and_softmax(z: Tensor) -> tuple[Tensor, Tensor]:
    """log sum_c exp(z_c) and softmax(z) of rows shifted by their max (z <= 0)."""
    e = z.exp()
    s = e.sum(1)
    return s.log(), e / s[:, None]


def _plus_z_loss(loss: Tensor, g: Tensor | None, z_loss: float, w_y: Tensor, m: Tensor, log_s: Tensor,
                 prob: Tensor) -> tuple[Tensor, Tensor | None]:
    """The row losses plus the z-loss z_loss w_y lse^2 (lse = m + log_s of the raw logits) and, with `g`, the
    gradient plus its 2 z_loss w_y lse softmax (`prob`)."""
    lse = m + log_s
    loss = loss + z_loss * w_y * lse * lse
    if g is not None:
        g = g + (2 * z_loss * w_y * lse)[:, None] * prob
    return loss, g


def _per_row(scale: Tensor | float) -> Tensor | float:
    return scale[:, None] if isinstance(scale, Tensor) and scale.dim() else scale


def _smoothed_focal_rows(x: Tensor, y: Tensor, spec: RowLoss, w: Tensor | None, scale: Tensor | float,
                         grad: Tensor | None) -> Tensor:
    """`family_rows` of the label-smoothed focal losses (`fused_cpu.c`'s smoothed_focal_row): with
    a_c = (1 - eps) w_y [c == y] + (eps / C) w_c, loss = -sum_c a_c (1 - p_c)^gamma_c log p_c and
    grad_j = p_j sum_c a_c h_c - a_j h_j, h_c = (1 - p_c)^gamma_c - gamma_c (1 - p_c)^(gamma_c - 1) p_c log p_c."""
    p, eps, n_classes = spec.params, spec.eps, x.shape[1]
    m = x.amax(1)
    log_s, prob = _log_sum_and_softmax(x - m[:, None])
    # (x - m) - log s, not x - (m + log s): at |x| ~ 1e30, m + log s rounds to m and log p of the largest reads 0.
    log_p = (x - m[:, None]) - log_s[:, None]
    q = -torch.expm1(log_p)
    gamma = p["gamma"] if spec.kind == "focal" else _adaptive_gamma(log_p, p, x.dtype)
    f = q ** gamma  # 0^gamma where p_c rounds to 1: 0, or 1 for gamma = 0
    term = -f * log_p
    # The derivative's second part is 0 where p_c rounds to 1 (its limit), not 0 * inf, and at gamma = 0 (label
    # smoothing), not 0 * 0 * -inf for a -inf logit: as the C kernel's focal_term.
    h = f - torch.where((q > 0) & (torch.as_tensor(gamma) > 0), gamma * q ** (gamma - 1) * prob * log_p, 0.0)
    yc = y[:, None]
    w_y = x.new_ones(()) if w is None else w[y]
    true_class = (1 - eps) * w_y
    smooth = eps / n_classes
    w_term, w_h = (term, h) if w is None else (term * w, h * w)
    loss = true_class * term.gather(1, yc).squeeze(1) + smooth * w_term.sum(1)
    g = None
    if grad is not None:
        h_y = h.gather(1, yc).squeeze(1)
        g = (true_class * h_y + smooth * w_h.sum(1))[:, None] * prob - smooth * w_h
        g.scatter_add_(1, yc, -(true_class * h_y)[:, None])
    if spec.z_loss:
        loss, g = _plus_z_loss(loss, g, spec.z_loss, w_y, m, log_s, prob)
    if grad is not None:
        grad.copy_(g * _per_row(scale))
    return loss
