"""`fastai-ls demo --losses ce,ls,focal,... --seeds 5`: the training losses compared on the digits (`compare_losses`),
printed as tables with intervals over images and seeds, and written as CSV."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

from fastai_ls.cli.calibrate import quiet_bars
from fastai_ls.cli.demo_render import say
from fastai_ls.cli.demo_write import writable_folder
from fastai_ls.integration.compare_losses import STAGES, LossComparison, compare_losses
from fastai_ls.integration.loss_registry import LOSSES

__all__ = ["LOSS_FILES", "print_losses", "demo_losses"]

# Every file `demo_losses` writes into its folder.
LOSS_FILES = ("losses.csv", "losses_per_seed.csv")


def print_losses(result: LossComparison) -> None:
    """The comparison's tables: each stage's estimates, then its paired differences from the baseline, and which
    calibrator each model got.

    Parameters
    ----------
    result : LossComparison
        What `compare_losses` returned.

    Examples
    --------
    >>> print_losses(compare_losses(digits_learner, ["ce", "ls"], seeds=2))  # doctest: +SKIP
    """
    seeds = result.seeds
    titles = {name: f"{name}: {LOSSES[name].title}" for name in result.table.index.unique("loss")}
    say(f"{len(titles)} losses, each trained from {len(seeds)} seed(s) ({', '.join(map(str, seeds))}: one split and "
        "one initialisation per seed, the same for every loss) and scored on that seed's validation images: "
        "the mean over seeds, with a 95% interval from a two-level bootstrap (seeds, then each drawn seed's images)"
        + (" (with one seed, over images only: another training run may differ more)" if len(seeds) == 1 else "")
        + ". 'best calibrator': each model after its own calibrator with the lowest cross-fitted NLL, scored "
        "out-of-fold. Losses: " + "; ".join(titles.values()) + ".")
    for stage in STAGES:
        print(f"{stage}:")
        print(result.shown(stage).to_string(), flush=True)
        if len(titles) > 1:
            print(f"\n{stage}, minus {result.baseline} (paired by seed and image; an interval that holds 0 is a "
                  "difference these runs do not resolve):")
            print(result.shown(stage, differences=True).to_string(), flush=True)
        print()
    chosen = result.per_seed.xs(STAGES[1], level="stage")["calibrator"]
    lines = [f"{name}: " + ", ".join(f"{method} x{n}" for method, n in Counter(chosen.loc[name]).most_common())
             for name in titles]
    say("the best calibrator per seed: " + "; ".join(lines))


def demo_losses(
    make_learner: Callable,
    losses: list[str],
    seeds: int,
    epochs: int,
    out: str | Path,
    seed: int = 42,
    methods: list[str] | None = None,
    folds: int = 5,
    force: bool = False,
    quiet: bool = False,
) -> LossComparison | None:
    """Run `compare_losses`, print its tables (`print_losses`) and write losses.csv (`LossComparison.table`) and
    losses_per_seed.csv (`LossComparison.per_seed`) into `out`, which is checked before any training.

    Parameters
    ----------
    make_learner : callable
        `make_learner(eps=0.0, seed=s)` builds a learner (e.g. a partial of `digits_learner`).
    losses : list of str
        Names of `LOSSES`.
    seeds : int
        Number of seeds: `seed`, `seed + 1`, ...
    epochs : int
        `fit_one_cycle` epochs per model.
    out : str or Path
        Folder for the tables (created if needed).
    seed : int, default 42
        The first seed, and the bootstrap's.
    methods : list of str, optional
        Calibration methods to choose among (default: all).
    folds : int, default 5
        Cross-fitting folds.
    force : bool, default False
        Replace the files of an earlier comparison in `out`.
    quiet : bool, default False
        No progress bars.

    Returns
    -------
    LossComparison or None
        On rank 0; None on the other ranks.

    Examples
    --------
    >>> demo_losses(digits_learner, ["ce", "ls"], seeds=2, epochs=10, out="losses")  # doctest: +SKIP
    """
    out = writable_folder(out, force, names=LOSS_FILES)
    with quiet_bars(quiet):
        result = compare_losses(make_learner, losses, seeds, epochs, seed, methods, folds)
    if result is None:
        return None
    print_losses(result)
    result.table.to_csv(out / "losses.csv")
    result.per_seed.to_csv(out / "losses_per_seed.csv")
    print(f"wrote {', '.join(LOSS_FILES)} into {out}")
    return result
