"""Confidence scores of held-out logits, higher more confident: the softmax response and the scores that compete
with it for deciding when to abstain (selective classification), computed in float64 so that ties are real ones.
`selective.py` turns a score into the exact risk-coverage metrics of the rows it ranks."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from fastai_ls.calibration.calibrators.base import clean_logits, row_blocks
from fastai_ls.calibration.threads import one_thread
from fastai_ls.validation import check_logits

__all__ = ["SCORE_NAMES", "NORMALISED", "confidence_scores"]

SCORE_NAMES = ("msp", "max_logit", "margin", "energy", "entropy", "doctor", "pnorm", "pnorm_softmax")
# The scores that normalise the logits (Cattelan & Silva 2024), which undo most of what label smoothing does to the
# ranking (Xia et al. 2025).
NORMALISED = ("pnorm", "pnorm_softmax")
# The largest finite |logit| scored: differences and sums of C such values stay finite in float64.
_LARGEST_LOGIT = 1e300
# Row blocks of this many logits: the float64 temporaries of the scores (2 MB each) stay in the cache through the ~70
# passes over them, and memory stays bounded whatever N.
CACHE_BLOCK = 2**18


def _check_p(p: float, name: str = "p") -> float:
    """`p` as a float, or a ValueError naming `name`: bools, NaN, p <= 0 and ints beyond float64 are refused."""
    error = ValueError(f"{name} must be a positive number (the norm's order, e.g. 2; math.inf for the max norm), "
                       f"got {p!r}")
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not p > 0:  # also refuses NaN
        raise error
    try:
        return float(p)
    except OverflowError:
        raise error from None


def _checked_logits(logits: Tensor) -> Tensor:
    """`logits` detached on the CPU, or a ValueError naming the problem (shape, dtype, NaN or +inf rows)."""
    check_logits(logits, min_rows=1)
    logits = logits.detach().cpu()
    bad = (logits.isnan() | (logits == math.inf)).any(1) | (logits == -math.inf).all(1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"logits hold NaN or +inf (or no finite value) in {int(bad.sum())} of {len(logits)} rows "
                         f"(first: row {i}); drop those rows")
    # Differences and sums of logits past this overflow float64 and give NaN scores.
    huge = (logits.isfinite() & (logits.abs() > _LARGEST_LOGIT)).any(1)
    if bool(huge.any()):
        i = int(huge.nonzero()[0, 0])
        raise ValueError(f"logits hold finite values beyond +-{_LARGEST_LOGIT:g} in {int(huge.sum())} of "
                         f"{len(logits)} rows (first: row {i}), which overflow float64 in the scores")
    return logits


def _block_scores(logits: Tensor, names: Sequence[str], grid: Sequence[float],
                  temperature: float) -> dict[tuple[str, float | None], Tensor]:
    """(name, p) -> scores of a block of rows (p None for the scores without one; `pnorm` and `pnorm_softmax` at
    every p of `grid`)."""
    z = clean_logits(logits, torch.float64)[0] if bool((logits == -math.inf).any()) else logits.double()
    out = {}
    top2 = z.topk(2, dim=1).values
    lse = z.logsumexp(1)
    for name in names:
        if name == "msp":
            out[(name, None)] = (top2[:, 0] - lse).exp()
        elif name == "max_logit":
            out[(name, None)] = top2[:, 0]
        elif name == "margin":
            out[(name, None)] = (top2[:, 0] - lse).exp() - (top2[:, 1] - lse).exp()
        elif name == "energy":
            out[(name, None)] = lse
        elif name in ("entropy", "doctor"):
            log_p = z - lse[:, None]
            probs = log_p.exp()
            if name == "entropy":
                out[(name, None)] = (probs * log_p).sum(1)
            else:
                top = probs.max(1)
                rest = (probs * (1 + top.values[:, None] - probs)).scatter_(1, top.indices[:, None], 0.0).sum(1)
                out[(name, None)] = -rest / (probs * probs).sum(1)
    normalised = [name for name in NORMALISED if name in names]
    if not normalised:
        return out
    # ||c||_p = m ||c / m||_p with m = max |c|: no overflow at large p, and integer powers by repeated products.
    centred = z - z.mean(1, keepdim=True)
    top = centred.amax(1)
    scale = centred.abs().amax(1)
    constant = scale == 0  # equal logits: no evidence, the least confident values (pnorm 0, pnorm_softmax 1/C)
    scale = torch.where(constant, 1.0, scale)
    ratio = centred.abs_().div_(scale[:, None])  # `centred` is |c| / m from here
    shifted = None
    power, order = None, 0
    for p in sorted(set(grid)):
        if p == math.inf:
            root = torch.ones_like(scale)
        elif float(p).is_integer() and p <= 64:
            if power is None:
                power, order = ratio.clone(), 1
            while order < p:
                power.mul_(ratio)
                order += 1
            root = power.sum(1).pow(1 / p)
        else:
            root = ratio.pow(p).sum(1).pow(1 / p)
        overflow = ~constant & ~root.isfinite()
        if bool(overflow.any()):
            raise ValueError(f"p={p:g} is too small for these logits: ||z - mean z||_p overflows float64 in "
                             f"{int(overflow.sum())} rows, so every such row would tie at the lowest score; use a "
                             "larger p (e.g. 1 to 9)")
        norm = scale * root
        if "pnorm" in normalised:
            out[("pnorm", p)] = torch.where(constant, 0.0, top / norm)
        if "pnorm_softmax" in normalised:
            if shifted is None:
                shifted = z - z.amax(1, keepdim=True)  # c - max c
            # max_k softmax(c / (t ||c||))_k = 1 / sum_k exp((c_k - max c) / (t ||c||))
            total = (shifted * (1 / (temperature * norm))[:, None]).exp_().sum(1)
            out[("pnorm_softmax", p)] = torch.where(constant, 1 / z.shape[1], 1 / total)
    return out


def _scores(logits: Tensor, names: Sequence[str], grid: Sequence[float],
            temperature: float = 1.0) -> dict[tuple[str, float | None], Tensor]:
    """`_block_scores` of checked logits, block by block."""
    blocks = row_blocks(*logits.shape, elements=CACHE_BLOCK)
    parts = [_block_scores(logits[rows], names, grid, temperature) for rows in blocks]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def confidence_scores(
    logits: Tensor,
    scores: Sequence[str] | None = None,
    p: float = 2,
    temperature: float = 1.0,
) -> dict[str, Tensor]:
    """Confidence scores of each row, computed in float64 from the (N, C) logits: higher is more confident.

    - `msp`: the softmax response max_k p_k (Hendrycks & Gimpel 2017).
    - `max_logit`: max_k z_k.
    - `margin`: the softmax margin p_(1) - p_(2), the two largest probabilities.
    - `energy`: log sum_k exp z_k, the negative free energy (Liu et al. 2020).
    - `entropy`: the negative entropy sum_k p_k log p_k.
    - `doctor`: -D_alpha = -(1 - sum_k p_k^2) / sum_k p_k^2, minus DOCTOR's statistic (Granese et al., NeurIPS 2021),
      so that higher is more confident. (D_beta = (1 - max p) / max p ranks the rows as `msp` does.) 1 - sum p^2
      is summed as sum over k != argmax of p_k (1 + p_max - p_k), of non-negative terms, so that it does not cancel
      on confident rows.
    - `pnorm`: MaxLogit-pNorm, max_k (z_k - mean z) / ||z - mean z||_p (Cattelan & Silva, UAI 2024).
    - `pnorm_softmax`: p-NormSoftmax, max_k softmax((z - mean z) / (temperature ||z - mean z||_p))_k (the same).

    A -inf logit (a class ruled out) stands for the row's lowest finite logit minus 104, as in the calibrators.
    `pnorm` and `pnorm_softmax` are exact from log-probabilities too (centring cancels the log-sum-exp), and
    so are `msp`, `margin`, `entropy` and `doctor`; `max_logit` and `energy` need the logits themselves. A row of
    equal logits gets `pnorm` 0 and `pnorm_softmax` 1/C, the least confident values. Rows are taken in blocks, so
    the float64 temporaries stay small (2 MB each).

    Parameters
    ----------
    logits : Tensor
        (N, C) logits (or log-probabilities); NaN and +inf are refused.
    scores : sequence of str, optional
        The names to compute, from `SCORE_NAMES` (default: all).
    p : float
        Order of the norm of `pnorm` and `pnorm_softmax`, > 0 (`math.inf` for the max norm).
    temperature : float
        The temperature of `pnorm_softmax`, > 0.

    Returns
    -------
    dict of str to Tensor
        Score name to an (N,) float64 CPU tensor, in the order asked for.

    Examples
    --------
    >>> s = confidence_scores(torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0]]), ["msp", "pnorm"])
    >>> [round(v, 4) for v in s["msp"].tolist()], [round(v, 4) for v in s["pnorm"].tolist()]
    ([0.787, 0.4223], [0.8165, 0.4082])
    """
    names = list(SCORE_NAMES if scores is None else scores)
    unknown = [name for name in names if name not in SCORE_NAMES]
    if isinstance(scores, str) or unknown or not names or len(set(names)) < len(names):
        raise ValueError(f"scores must be distinct names from {', '.join(SCORE_NAMES)}, got {scores!r}")
    p = _check_p(p)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    logits = _checked_logits(logits)
    with one_thread():  # ~70 passes over small blocks: a second thread saves little and waits on busy cores
        computed = _scores(logits, names, [p], float(temperature))
    return {name: computed[(name, p if name in NORMALISED else None)] for name in names}
