"""Train a cross-entropy baseline beside a label-smoothing model and report their calibration side by side."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
from fastai.learner import Learner
from fastai.torch_core import rank_distrib, set_seed

from fastai_ls.calibration.plots import plot_reliability
from fastai_ls.callback import CalibrationCallback
from fastai_ls.distributed import distrib_ctx
from fastai_ls.posthoc import fit_temperature

# Report rows: (label, column of `CalibrationCallback.history` or of the temperature fit).
ROWS = [
    ("error rate", "error_rate"), ("ECE", "ece"), ("MCE", "mce"), ("adaptive ECE", "adaptive_ece"),
    ("NLL", "nll"), ("Brier", "brier"), ("AURC", "aurc"), ("temperature", "temperature"),
    ("ECE after temperature scaling", "ece_after_ts"),
]


def calibration_callback(learn: Learner) -> CalibrationCallback:
    """The learner's `CalibrationCallback`."""
    for cb in learn.cbs:
        if isinstance(cb, CalibrationCallback):
            return cb
    raise ValueError("the learner has no CalibrationCallback: build it with calibration=True")


def train(make_learner: Callable[..., Learner], eps: float, epochs: int, seed: int) -> Learner:
    """`make_learner(eps=eps)` trained with `fit_one_cycle(epochs)` from `seed`; distributed when launched so."""
    set_seed(seed, reproducible=True)
    learn = make_learner(eps=eps)
    with distrib_ctx(learn):  # does nothing in a single process
        learn.fit_one_cycle(epochs)
    return learn


def summarize(learn: Learner) -> dict[str, float]:
    """The last epoch's calibration metrics, plus the fitted temperature and the ECE after scaling by it."""
    last = calibration_callback(learn).history.iloc[-1]
    fit = fit_temperature(learn)
    values = {column: float(last[column]) for _, column in ROWS if column in last.index}
    values.update(error_rate=1 - float(last["accuracy"]), temperature=fit.temperature, ece_after_ts=fit.ece_after)
    return values


def compare(
    make_learner: Callable[..., Learner],  # `make_learner(eps=...)` builds a learner
    runs: dict[str, float],  # column title -> eps, e.g. {'cross-entropy': 0.0, 'label smoothing 0.1': 0.1}
    epochs: int,  # `fit_one_cycle` epochs per run
    out: str | Path,  # folder for calibration.csv and reliability.png
    seed: int = 42,  # the same seed for every run
) -> pd.DataFrame:
    """Train one learner per run, print the side-by-side table and write calibration.csv and reliability.png.

    Under `torchrun`/`accelerate launch` every process trains; only rank 0 prints and writes.
    """
    learners = {title: train(make_learner, eps, epochs, seed) for title, eps in runs.items()}
    table = pd.DataFrame({title: summarize(learn) for title, learn in learners.items()})
    table = table.loc[[column for _, column in ROWS]].rename(index=dict((c, label) for label, c in ROWS))
    if rank_distrib() == 0:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "calibration.csv", index_label="metric")
        reliability_figure(learners).savefig(out / "reliability.png", dpi=120, bbox_inches="tight")
        print(table.to_string(float_format=lambda v: f"{v:.4f}"))
        print(f"\nwrote {out / 'calibration.csv'} and {out / 'reliability.png'}")
    return table


def reliability_figure(learners: dict[str, Learner]):
    """One reliability diagram per learner, side by side."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(learners), figsize=(5 * len(learners), 5), squeeze=False)
    for ax, (title, learn) in zip(axes[0], learners.items()):
        plot_reliability(calibration_callback(learn), ax=ax, title=title)
    fig.tight_layout()
    return fig
