"""Per-row scores of probabilistic predictions: each row's confidence, correctness, NLL and Brier score, whose
means are a `CalibrationState`'s accuracy, `nll` and `brier`; the NLL's floor; the error rate's interval from the
accuracy's; and the paired difference of two models' per-row scores on the same rows. The state, the calibrators'
comparison, the demo and the loss comparison all score rows through this module, so they agree to the last bit."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from fastai_ls.calibration.intervals import normal_interval

__all__ = ["NLL_FLOOR", "ROW_SCORES", "target_nll", "row_scores", "with_error_rate", "paired_difference"]

# A true-class probability below this (float32's smallest normal number, 1.2e-38) counts as this in the NLL: at most
# -log(NLL_FLOOR) = 87.3 nats per row, also for float64 probabilities. Capped at float64's own floor (708 nats) the
# same predictions scored in float64 got another NLL than in float32, and a calibrator that gives some rows a 0
# ranked differently: on the CIFAR-10 WideResNet records, isotonic regression's cross-fitted NLL was 0.347 from
# float32 logits and 1.092 from the same logits in float64.
NLL_FLOOR = float(torch.finfo(torch.float32).tiny)
# The keys of `row_scores`, in order.
ROW_SCORES = ("confidence", "correct", "nll", "brier")


def target_nll(p_y: Tensor) -> Tensor:
    """-log p_y of each row's true-class probability, with p_y below `NLL_FLOOR` counted as `NLL_FLOOR`.

    Parameters
    ----------
    p_y : Tensor
        (N,) probabilities of the true classes, in the dtype the NLL is computed in.

    Returns
    -------
    Tensor
        (N,) NLL per row, at most -log(NLL_FLOOR) = 87.3 nats.

    Examples
    --------
    >>> [round(v, 4) for v in target_nll(torch.tensor([0.5, 0.0], dtype=torch.float64)).tolist()]
    [0.6931, 87.3365]
    """
    return -p_y.clamp_min(NLL_FLOOR).log()


def row_scores(probs: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Each row's top-label confidence, correctness (1 where the top class is the target), NLL (`target_nll`) and
    Brier score (sum over classes of (p_k - 1[y = k])^2), computed in the dtype of `probs`. No checks: `probs` are
    finite probabilities and `target` class ids in range (the callers check or mask them).

    Parameters
    ----------
    probs : Tensor
        (N, C) probabilities.
    target : Tensor
        (N,) class ids.

    Returns
    -------
    dict of str to Tensor
        The keys of `ROW_SCORES`, each (N,) in the dtype of `probs`.

    Examples
    --------
    >>> s = row_scores(torch.tensor([[0.75, 0.25], [0.5, 0.5]], dtype=torch.float64), torch.tensor([0, 1]))
    >>> s["correct"].tolist(), [round(v, 4) for v in s["nll"].tolist()], s["brier"].tolist()
    ([1.0, 0.0], [0.2877, 0.6931], [0.125, 0.5])
    """
    p_y = probs.gather(1, target[:, None]).squeeze(1)
    # amax and argmax, not `max(1)`: its CPU kernel goes multi-threaded on tiny input (a state's per-batch update).
    confidence = probs.amax(1)
    return {"confidence": confidence, "correct": (probs.argmax(1) == target).to(confidence.dtype),
            "nll": target_nll(p_y), "brier": (probs * probs).sum(1) - 2 * p_y + 1}


def with_error_rate(metrics: Mapping[str, float]) -> dict[str, float]:
    """`metrics` (of `CalibrationState.metrics`) with `error_rate` = 1 - accuracy added, and, where the accuracy
    has an interval, `error_rate_lo` = 1 - accuracy_hi and `error_rate_hi` = 1 - accuracy_lo (the accuracy's
    interval turned round). The input is not changed.

    Parameters
    ----------
    metrics : mapping of str to float
        Holds `accuracy`, and `accuracy_lo`, `accuracy_hi` with intervals.

    Returns
    -------
    dict of str to float

    Examples
    --------
    >>> m = with_error_rate({"accuracy": 0.9, "accuracy_lo": 0.85, "accuracy_hi": 0.95})
    >>> [round(m[k], 2) for k in ("error_rate", "error_rate_lo", "error_rate_hi")]
    [0.1, 0.05, 0.15]
    """
    out = dict(metrics)
    out["error_rate"] = 1 - metrics["accuracy"]
    for bound, flipped in (("lo", "hi"), ("hi", "lo")):
        if f"accuracy_{bound}" in metrics:
            out[f"error_rate_{flipped}"] = 1 - metrics[f"accuracy_{bound}"]
    return out


def paired_difference(first: Tensor, second: Tensor, ci: float = 0.95) -> tuple[float, float, float]:
    """The mean of `second - first` over paired rows, with its normal interval (mean -+ z * standard error of the
    differences). Pairing removes what the rows share, so the interval is narrower than the two means' intervals
    side by side.

    Parameters
    ----------
    first : Tensor
        (N,) per-row scores of one model (the one subtracted).
    second : Tensor
        (N,) per-row scores of the other model on the same rows, in the same order.
    ci : float, default 0.95
        Confidence level.

    Returns
    -------
    tuple of float
        (estimate, lower, upper); the interval is NaN for fewer than two rows.

    Examples
    --------
    >>> a, b = torch.tensor([0.2, 0.4, 0.3, 0.5]), torch.tensor([0.3, 0.5, 0.3, 0.7])
    >>> [round(v, 4) for v in paired_difference(a, b)]
    [0.1, 0.02, 0.18]
    """
    if first.shape != second.shape or first.dim() != 1:
        raise ValueError(f"paired scores must be two (N,) tensors of the same rows, got {tuple(first.shape)} and "
                         f"{tuple(second.shape)}")
    d = second.double() - first.double()
    n = len(d)
    se = float(d.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.nan
    lower, upper = normal_interval(float(d.mean()), se, ci)
    return float(d.mean()), lower, upper
