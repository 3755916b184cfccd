"""Smooth ECE and the smoothed reliability curve (Błasiok & Nakkiran, "Smooth ECE: Principled Reliability Diagrams
via Kernel Smoothing", ICLR 2024), computed from the fine histogram of top-label confidence.

With residuals r_i = a_i - c_i, smECE_sigma = integral over [0, 1] of |(1/n) sum_i K_sigma(t, c_i) r_i| dt, where
K_sigma is the reflected Gaussian kernel: a Gaussian folded back into [0, 1] at both ends, so no mass is lost at a
boundary (the heat kernel with reflecting ends). smECE is smECE_sigma at the bandwidth where smECE_sigma = sigma;
smoothing more can only lower smECE_sigma, so that fixed point is unique.

How it is computed: each fine cell's rows sit at the cell's mean confidence and are shared linearly between the
two grid points t_j = j / K around it (the linear rounding relplot applies to single rows). On that grid the
reflected kernel is diagonal in the cosine basis, so smoothing is one DCT-I, a multiplication by
exp(-(pi k sigma)^2 / 2) and a DCT-I back; the integral is the trapezoid rule on the grid. Limits: rows in one cell
are placed at its mean confidence (the value stays within the cell width 1/K of the row-level one), and bandwidths
below 1/K are not resolved (sigma is kept at or above 1/K, so a smECE below 1/K is reported as smECE_(1/K) <= 1/K).

Against relplot 1.0.3 (`relplot.smECE`): within 2e-3 on uniform and skewed confidences of 1e3 to 1e5 rows
(tests/test_calibration_metrics.py). relplot reflects its grid once and without the end points themselves, so a
row at (or within one grid step of) confidence 0 or 1 keeps only part of its kernel mass there, and it searches
sigma on a grid of 2^-10. Where many rows sit at 1.0 the first matters: on a CIFAR-10 WideResNet's outputs (a
quarter at exactly 1.0, over-confident in every bin) relplot gives 0.0757, this module 0.0537, that model's mean
gap: where the smoothed residual keeps one sign, a kernel that keeps every row's mass gives exactly the mean gap.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["smooth_ece", "smooth_ece_at", "smooth_curve"]

_TOLERANCE = 1e-9  # |smECE_sigma - sigma| at the returned bandwidth
_MAX_STEPS = 60  # the Illinois method needs about 5; this only bounds a pathological case


def _dct1(x: np.ndarray) -> np.ndarray:
    import scipy.fft  # imported here: only smooth ECE needs it, and it costs ~0.2 s at first import

    return scipy.fft.dct(x, type=1, axis=-1, workers=-1)


def _grid_spectra(fine: Tensor, what: str, cells: Tensor | None,
                  n_cells: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Cosine coefficients of the rows' masses on the grid t_j = j / K, and n.

    `what` = 'residual' (accuracy - confidence, summed per grid point) or 'count'. Shapes: (B, K + 1) and (B,)."""
    f = fine.detach().to(torch.float64).cpu().numpy().reshape(-1, fine.shape[-2], 3)
    count, conf, correct = f[..., 0], f[..., 1], f[..., 2]
    index = np.arange(count.shape[-1]) if cells is None else cells.numpy()
    n_cells = count.shape[-1] if n_cells is None else n_cells
    mean = np.divide(conf, count, out=np.zeros_like(conf), where=count > 0)
    frac = np.clip(mean * n_cells - index, 0.0, 1.0)  # where in its cell the mean lies
    mass = correct - conf if what == "residual" else count
    grid = np.zeros((count.shape[0], n_cells + 1))
    grid[:, index] += mass * (1 - frac)
    grid[:, index + 1] += mass * frac
    # DCT-I weighs the two end points once and the interior twice: halve the interior to get sum_j m_j cos(pi k j/K).
    grid[:, 1:-1] *= 0.5
    return _dct1(grid), count.sum(-1)


def _smoothed(spectrum: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """The masses smoothed by the reflected Gaussian of bandwidth sigma (one per row), as a density on the grid."""
    # Modes with (pi k sigma)^2 / 2 > 745 underflow to 0 in float64: a wide kernel needs only the first few.
    n_modes = min(spectrum.shape[-1], int(np.ceil(np.sqrt(2 * 745) / (math.pi * sigma.min()))) + 1)
    k = np.arange(n_modes)
    damped = np.zeros_like(spectrum)
    damped[:, :n_modes] = spectrum[:, :n_modes] * np.exp(-0.5 * (math.pi * sigma[:, None] * k) ** 2)
    return _dct1(damped)


def _integral(values: np.ndarray) -> np.ndarray:
    """Trapezoid rule over [0, 1] on the grid t_j = j / K."""
    n_cells = values.shape[-1] - 1
    return (values.sum(-1) - (values[..., 0] + values[..., -1]) / 2) / n_cells


def _smece_at(spectrum: np.ndarray, n: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    return _integral(np.abs(_smoothed(spectrum, sigma))) / n


def smooth_ece_at(fine: Tensor, sigma: float | Tensor, cells: Tensor | None = None,
                  n_cells: int | None = None) -> Tensor:
    """smECE_sigma at a given bandwidth, one value per histogram of `fine` `(..., K, 3)`.

    Parameters
    ----------
    fine, cells, n_cells
        As for `smooth_ece`.
    sigma : float or Tensor
        The kernel's bandwidth, one for all histograms or one per histogram.
    """
    spectrum, n = _grid_spectra(fine, "residual", cells, n_cells)
    sigma = np.broadcast_to(np.asarray(sigma, dtype=np.float64).reshape(-1), n.shape)
    return torch.from_numpy(_smece_at(spectrum, n, sigma)).reshape(fine.shape[:-2])


def smooth_ece(fine: Tensor, cells: Tensor | None = None, n_cells: int | None = None) -> tuple[Tensor, Tensor]:
    """Smooth ECE and its bandwidth, one of each per histogram of `fine` `(..., K, 3)` (K fine cells of
    count, sum of confidence, number correct), as float64 tensors. `fine` may hold only some of the grid's
    `n_cells` cells (the others empty): `cells` gives their indices, in increasing order.

    The bandwidth solves smECE_sigma = sigma for all histograms at once, by the Illinois variant of regula falsi
    on [1/K, 1] until |smECE_sigma - sigma| < 1e-9 (smECE_sigma changes slowly with sigma, so a few steps do).
    Lower is better; 0 means calibrated at every confidence.

    Parameters
    ----------
    fine : Tensor
        `(..., K, 3)` float64 counters per cell: count, sum of confidence, number correct.
    cells : Tensor, optional
        Indices of the grid cells that `fine` holds, increasing; None: all.
    n_cells : int, optional
        The size of the grid, when `fine` holds only some of its cells.

    Examples
    --------
    >>> fine = torch.zeros(1000, 3, dtype=torch.float64)
    >>> fine[949] = torch.tensor([100., 95., 80.])  # 100 rows at confidence 0.95, 80 right
    >>> [round(float(v), 3) for v in smooth_ece(fine)]  # smECE, bandwidth
    [0.15, 0.15]
    """
    spectrum, n = _grid_spectra(fine, "residual", cells, n_cells)
    n_cells = fine.shape[-2] if n_cells is None else n_cells
    lo, hi = np.full(n.shape, 1.0 / n_cells), np.ones(n.shape)
    s_lo, s_hi = _smece_at(spectrum, n, lo), _smece_at(spectrum, n, hi)
    gap_lo, gap_hi = s_lo - lo, s_hi - hi  # smECE_sigma - sigma: decreasing in sigma
    # Outside the bracket: smECE_(1/K) <= 1/K (below resolution: report smECE_(1/K)) or smECE_1 >= 1 (impossible
    # for a valid histogram); an empty histogram gives NaN throughout.
    sigma = np.where(gap_lo <= 0, lo, hi)
    value = np.where(gap_lo <= 0, s_lo, s_hi)
    todo = (gap_lo > 0) & (gap_hi < 0)
    side = np.zeros(n.shape)  # which end stayed put last time (Illinois halves its gap when it stays again)
    for _ in range(_MAX_STEPS):
        if not todo.any():
            break
        i = np.flatnonzero(todo)
        guess = lo[i] + (hi[i] - lo[i]) * gap_lo[i] / (gap_lo[i] - gap_hi[i])
        s_guess = _smece_at(spectrum[i], n[i], guess)
        gap = s_guess - guess
        sigma[i], value[i] = guess, s_guess
        above = gap > 0  # the fixed point lies above the guess
        lo[i], gap_lo[i] = np.where(above, guess, lo[i]), np.where(above, gap, gap_lo[i])
        hi[i], gap_hi[i] = np.where(above, hi[i], guess), np.where(above, gap_hi[i], gap)
        gap_hi[i] = np.where(above & (side[i] > 0), gap_hi[i] / 2, gap_hi[i])
        gap_lo[i] = np.where(~above & (side[i] < 0), gap_lo[i] / 2, gap_lo[i])
        side[i] = np.where(above, 1.0, -1.0)
        todo[i] = np.abs(gap) > _TOLERANCE
    shape = fine.shape[:-2]
    return torch.from_numpy(value).reshape(shape), torch.from_numpy(sigma).reshape(shape)


def smooth_curve(fine: Tensor, sigma: float | Tensor, cells: Tensor | None = None,
                 n_cells: int | None = None) -> dict[str, Tensor]:
    """The smoothed reliability curve at bandwidth `sigma`, on the grid t_j = j / K: `t`, `accuracy` (kernel-smoothed
    accuracy against confidence, t + smoothed residual / density, as relplot draws it) and `density` (the
    reflected-Gaussian density of the confidences, integrating to 1). `accuracy` and `density` have the leading
    shape of `fine` `(..., K, 3)` followed by K + 1; where the density is near 0 the curve is extrapolated.

    Parameters
    ----------
    fine, cells, n_cells
        As for `smooth_ece`.
    sigma : float or Tensor
        The kernel's bandwidth (relplot draws the curve at smooth ECE's own).
    """
    residual, n = _grid_spectra(fine, "residual", cells, n_cells)
    count, _ = _grid_spectra(fine, "count", cells, n_cells)
    n_cells = fine.shape[-2] if n_cells is None else n_cells
    sigma = np.broadcast_to(np.asarray(sigma, dtype=np.float64).reshape(-1), n.shape)
    density = _smoothed(count, sigma) / n[:, None]
    shift = _smoothed(residual, sigma) / n[:, None]
    t = np.linspace(0.0, 1.0, n_cells + 1)
    # relplot's guard: a tiny density (1e-4 per row there) keeps empty regions finite.
    accuracy = np.clip(t + shift / np.maximum(density, 1e-4 / n[:, None]), 0.0, 1.0)
    shape = (*fine.shape[:-2], t.shape[0])
    return {"t": torch.from_numpy(t), "accuracy": torch.from_numpy(accuracy).reshape(shape),
            "density": torch.from_numpy(density).reshape(shape)}
