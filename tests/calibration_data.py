"""Synthetic predictions with a known calibration curve, for the calibration tests (no data files needed)."""

from __future__ import annotations

import numpy as np
import torch

from fastai_ls import CalibrationState

# Distributions of top-label confidence (in (0.1, 1] for 10 classes), each with a calibration curve acc(conf).
CASES = {
    "uniform, over-confident": (lambda g, n: g.uniform(0.1, 1.0, n), lambda c: c ** 2),
    "uniform, calibrated": (lambda g, n: g.uniform(0.1, 1.0, n), lambda c: c),
    # Most mass near 1 and a quarter exactly at 1.0, as in a WideResNet's CIFAR-10 softmax outputs.
    "skewed to 1, over-confident": (
        lambda g, n: np.where(g.random(n) < 0.25, 1.0, 1 - 0.9 * g.beta(0.5, 12, n)),
        lambda c: np.clip(c - 0.06, 0, 1)),
    "skewed, under-confident": (lambda g, n: 0.15 + 0.7 * g.beta(2, 5, n), lambda c: np.minimum(1.0, c + 0.2)),
}


def sample(case: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` top-label confidences and whether each prediction is correct, drawn from `CASES[case]`."""
    conf_of, curve = CASES[case]
    g = np.random.default_rng(seed)
    conf = np.clip(conf_of(g, n), 0.1 + 1e-6, 1.0)
    return conf, g.random(n) < curve(conf)


def rows(conf: np.ndarray, correct: np.ndarray, n_classes: int = 10, seed: int = 0) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """(N, C) float64 probabilities whose top-label confidence is `conf` (class 0) and targets that are class 0
    exactly where `correct`; the other classes share the rest equally."""
    probs = np.repeat(((1 - conf) / (n_classes - 1))[:, None], n_classes, 1)
    probs[:, 0] = conf
    wrong = np.random.default_rng(seed).integers(1, n_classes, len(conf))
    return torch.from_numpy(probs), torch.from_numpy(np.where(correct, 0, wrong))


def state_from(conf: np.ndarray, correct: np.ndarray, **kwargs) -> CalibrationState:
    """A state holding the given (confidence, correct) rows."""
    probs, target = rows(conf, correct)
    state = CalibrationState(probs.shape[1], **kwargs)
    state.update(probs, target)
    return state
