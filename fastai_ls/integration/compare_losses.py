"""Choosing a training loss honestly: every loss trained on the same splits from the same seeds, scored on the same
held-out images as trained and after its own best cross-fitted calibrator, with intervals over images and seeds and
paired differences from cross-entropy."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import pandas as pd
import torch
from fastai.learner import Learner
from fastai.torch_core import rank_distrib

from fastai_ls.calibration.best_calibrator import calibrate_learner
from fastai_ls.calibration.calibrators import CALIBRATORS
from fastai_ls.calibration.report import format_interval
from fastai_ls.calibration.scores import row_scores
from fastai_ls.calibration.seed_bootstrap import SEED_METRICS, seed_bootstrap, weighted_metrics
from fastai_ls.integration.loss_registry import LOSSES, check_loss_names, get_loss
from fastai_ls.integration.training import train, validation_logits
from fastai_ls.validation import check_ci, check_seed

__all__ = ["STAGES", "LossComparison", "compare_losses"]

# How each model is scored: its own probabilities, and its best calibrator's out-of-fold probabilities.
STAGES = ("as trained", "best calibrator")
_LABELS = {"error_rate": "error rate", "ece": "ECE", "smece": "smooth ECE", "nll": "NLL", "brier": "Brier",
           "aurc": "AURC"}


@dataclass
class LossComparison:
    """The result of `compare_losses`.

    Parameters
    ----------
    table : pandas.DataFrame
        Index (loss, stage, metric); columns estimate (the mean over seeds), lower, upper, and difference,
        difference_lower, difference_upper (the loss minus `baseline`, paired by seed and image).
    per_seed : pandas.DataFrame
        Index (loss, seed, stage); a column per metric and `calibrator` (the best one of that model).
    baseline : str
        The loss the differences are taken from.
    seeds : list of int
        The seeds, each one split and one training per loss.
    ci : float
        Confidence level of the intervals.
    """

    table: pd.DataFrame
    per_seed: pd.DataFrame
    baseline: str
    seeds: list[int]
    ci: float

    def shown(self, stage: str = "as trained", differences: bool = False) -> pd.DataFrame:
        """One stage as text, `estimate [lower, upper]`: a row per loss, a column per metric; with `differences`,
        each loss minus the baseline instead.

        Parameters
        ----------
        stage : str, default 'as trained'
            One of `STAGES`.
        differences : bool, default False
            The paired differences from the baseline instead of the estimates.

        Returns
        -------
        pandas.DataFrame

        Examples
        --------
        >>> compare_losses(digits_learner, ["ce", "ls"], seeds=2).shown("best calibrator")  # doctest: +SKIP
        """
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        columns = ["difference", "difference_lower", "difference_upper"] if differences else \
            ["estimate", "lower", "upper"]
        part = self.table.xs(stage, level="stage")
        losses = [loss for loss in part.index.unique("loss") if not (differences and loss == self.baseline)]
        return pd.DataFrame({_LABELS[m]: [format_interval(*part.loc[(loss, m), columns]) for loss in losses]
                             for m in SEED_METRICS}, index=pd.Index(losses, name="loss"))


def _seeds(seeds: int | Sequence[int], seed: int) -> list[int]:
    if isinstance(seeds, bool) or not isinstance(seeds, (int, Sequence)) or isinstance(seeds, str):
        raise ValueError(f"seeds must be a number of seeds or a list of seeds, got {seeds!r}")
    values = [seed + i for i in range(seeds)] if isinstance(seeds, int) else list(seeds)
    if not values or len(set(values)) < len(values):
        raise ValueError(f"seeds must give at least one seed, each once, got {seeds!r}")
    for value in values:
        check_seed(value, allow_none=False)
    return values


def compare_losses(
    make_learner: Callable[..., Learner],
    losses: Sequence[str] = ("ce", "ls"),
    seeds: int | Sequence[int] = 5,
    epochs: int = 10,
    seed: int = 42,
    methods: Sequence[str] | None = None,
    folds: int = 5,
    ci: float = 0.95,
    n_boot: int = 1000,
) -> LossComparison | None:
    """Train each loss from each seed on that seed's split, and compare them on the held-out images: error rate, ECE,
    smooth ECE, NLL, Brier and AURC, as trained and after each model's best cross-fitted calibrator, each the mean
    over seeds with an interval over images and seeds, and its paired difference from cross-entropy.

    For seed s, every loss trains on the same split (`make_learner(seed=s)`) from the same initial weights
    (`set_seed(s)`), so the losses differ in nothing else. Each model's calibrators are compared by cross-fitting
    (`compare_calibrators`: no image is scored by a calibrator fitted on it) and the one with the lowest NLL is kept,
    with its out-of-fold probabilities. The intervals come from a two-level bootstrap (seeds, then each drawn
    seed's images: `seed_bootstrap`); the differences use the same draws for both losses. With one seed they are
    over images only, and say nothing about another training run. Every loss's class is imported before any
    training, so a loss this installation lacks fails at once. Under `torchrun`/`accelerate launch` every process
    trains and rank 0 scores.

    Parameters
    ----------
    make_learner : callable
        `make_learner(eps=0.0, seed=s)` builds a learner whose split depends on `s` (e.g. `digits_learner`, or a
        `functools.partial` of it); its loss is replaced by each compared loss.
    losses : sequence of str, default ('ce', 'ls')
        Names of `LOSSES`: ce, ls, focal, flsd53, mbls, maxsup, logitnorm.
    seeds : int or sequence of int, default 5
        The seeds (a number n: `seed`, `seed + 1`, ..., `seed + n - 1`).
    epochs : int, default 10
        `fit_one_cycle` epochs per model.
    seed : int, default 42
        The first seed when `seeds` is a number; also the seed of the bootstrap.
    methods : sequence of str, optional
        Calibration methods to choose among (default: all of `CALIBRATORS`).
    folds : int, default 5
        Cross-fitting folds.
    ci : float, default 0.95
        Confidence level.
    n_boot : int, default 1000
        Bootstrap replicates.

    Returns
    -------
    LossComparison or None
        On rank 0; None on the other ranks.

    Examples
    --------
    >>> result = compare_losses(digits_learner, ["ce", "ls", "focal"], seeds=5)  # doctest: +SKIP
    >>> result.shown("best calibrator", differences=True)  # doctest: +SKIP
    """
    names = check_loss_names(list(losses))
    seed_list = _seeds(seeds, seed)
    check_ci(ci, n_boot)
    methods = list(CALIBRATORS) if methods is None else list(methods)
    for name in names:  # a missing class fails now, not after the other losses trained
        get_loss(name)
    baseline = "ce" if "ce" in names else names[0]
    scores = {(name, stage): [] for name in names for stage in STAGES}
    rows, targets = {}, {}
    total, count = len(names) * len(seed_list), 0
    for name in names:
        for s in seed_list:
            count += 1
            learn = train(partial(make_learner, seed=s), 0.0, epochs, s, loss_func=get_loss(name),
                          label=f"training {count}/{total}: {LOSSES[name].title}, seed {s}")
            logits, target = validation_logits(learn)
            if rank_distrib() != 0:
                continue
            if not torch.equal(targets.setdefault(s, target), target):
                raise ValueError(f"seed {s}: {name}'s validation images differ from the first loss's: "
                                 "make_learner(seed=...) must give the same split for the same seed")
            result = calibrate_learner(logits, target, methods, folds, s, ci=None)
            for stage, probs in zip(STAGES, (result.before, result.after)):
                per_row = row_scores(probs, target)
                scores[(name, stage)].append(per_row)
                values = {m: float(v) for m, v in weighted_metrics(per_row, torch.ones(1, len(target))).items()}
                rows[(name, s, stage)] = {**values, "calibrator": "none" if stage == STAGES[0] else result.best}
    if rank_distrib() != 0:
        return None
    table = {}
    for stage in STAGES:
        found = seed_bootstrap({name: scores[(name, stage)] for name in names}, baseline, ci, n_boot, seed)
        for (name, metric), values in found.items():
            table[(name, stage, metric)] = values
    table = pd.DataFrame.from_dict(table, orient="index").rename_axis(["loss", "stage", "metric"])
    per_seed = pd.DataFrame.from_dict(rows, orient="index").rename_axis(["loss", "seed", "stage"])
    return LossComparison(table, per_seed, baseline, seed_list, ci)
