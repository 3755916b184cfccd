"""Train a cross-entropy baseline beside a label-smoothing model and report their calibration side by side."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from fastai.learner import Learner
from fastai.torch_core import rank_distrib, set_seed

from fastai_ls.calibration.plots import plot_reliability
from fastai_ls.callback import CalibrationCallback
from fastai_ls.distributed import distrib_ctx
from fastai_ls.posthoc import fit_temperature

if TYPE_CHECKING:  # matplotlib is imported only when the figure is drawn
    from matplotlib.figure import Figure

# Report rows: (label, column of `CalibrationCallback.history` or of the temperature fit).
ROWS = [
    ("error rate", "error_rate"), ("ECE", "ece"), ("MCE", "mce"), ("adaptive ECE", "adaptive_ece"),
    ("NLL", "nll"), ("Brier", "brier"), ("AURC", "aurc"), ("temperature", "temperature"),
    ("ECE after temperature scaling", "ece_after_ts"),
]


def calibration_callback(learn: Learner) -> CalibrationCallback:
    """The learner's `CalibrationCallback`.

    Parameters
    ----------
    learn : Learner
        A learner built with one (the factories' `calibration=True`).

    Returns
    -------
    CalibrationCallback

    Examples
    --------
    >>> calibration_callback(digits_learner())  # doctest: +SKIP
    CalibrationCallback
    """
    for cb in learn.cbs:
        if isinstance(cb, CalibrationCallback):
            return cb
    raise ValueError("the learner has no CalibrationCallback: build it with calibration=True")


def writable_folder(out: str | Path) -> Path:
    """`out`, created if needed, once a file could be written into it: checked before any training, so that a
    report that cannot be written fails at once, not after the runs.

    Parameters
    ----------
    out : str or Path
        The output folder.

    Returns
    -------
    Path

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     writable_folder(Path(folder) / "report").is_dir()
    True
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise OSError(f"cannot write the report into {out}: {err}") from err
    return out


def train(make_learner: Callable[..., Learner], eps: float, epochs: int, seed: int, label: str = "") -> Learner:
    """`make_learner(eps=eps)` trained with `fit_one_cycle(epochs)` from `seed`; distributed when launched so.

    Parameters
    ----------
    make_learner : callable
        `make_learner(eps=...)` builds a learner.
    eps : float
        Label smoothing.
    epochs : int
        `fit_one_cycle` epochs.
    seed : int
        Seed set before the learner is built (its split and initial weights) and trained.
    label : str, optional
        Printed (on rank 0) before fastai's progress table, with the number of images, to say which model trains.

    Returns
    -------
    Learner
        The trained learner.

    Examples
    --------
    >>> learn = train(digits_learner, eps=0.1, epochs=10, seed=42, label="label smoothing")  # doctest: +SKIP
    label smoothing: fit_one_cycle(10) on 1438 training and 359 validation images
    """
    set_seed(seed, reproducible=True)
    learn = make_learner(eps=eps)
    if label and rank_distrib() == 0:
        print(f"\n{label}: fit_one_cycle({epochs}) on {len(learn.dls.train_ds)} training and "
              f"{len(learn.dls.valid_ds)} validation images", flush=True)
    with distrib_ctx(learn):  # does nothing in a single process
        learn.fit_one_cycle(epochs)
    return learn


def summarize(learn: Learner) -> dict[str, float]:
    """The last epoch's calibration metrics, plus the fitted temperature and the ECE after scaling by it.

    Parameters
    ----------
    learn : Learner
        A trained learner with a `CalibrationCallback`.

    Returns
    -------
    dict of str to float
        One value per column of `ROWS`.

    Examples
    --------
    >>> summarize(learn)["ece"]  # doctest: +SKIP
    0.0259
    """
    last = calibration_callback(learn).history.iloc[-1]
    with learn.no_bar():  # its validation pass would leave a bar in a log, above the table
        fit = fit_temperature(learn)
    values = {column: float(last[column]) for _, column in ROWS if column in last.index}
    values.update(error_rate=1 - float(last["accuracy"]), temperature=fit.temperature, ece_after_ts=fit.ece_after)
    return values


def compare(
    make_learner: Callable[..., Learner],
    runs: dict[str, float],
    epochs: int,
    out: str | Path,
    seed: int = 42,
) -> pd.DataFrame:
    """Train one learner per run, print the side-by-side table and write calibration.csv and reliability.png.

    The output folder is checked first; each run is announced before its progress table. Under
    `torchrun`/`accelerate launch` every process trains; only rank 0 prints and writes.

    Parameters
    ----------
    make_learner : callable
        `make_learner(eps=...)` builds a learner with a `CalibrationCallback`.
    runs : dict of str to float
        Column title to eps, e.g. `{'cross-entropy': 0.0, 'label smoothing 0.1': 0.1}`, trained in this order.
    epochs : int
        `fit_one_cycle` epochs per run.
    out : str or Path
        Folder for calibration.csv and reliability.png (created if needed).
    seed : int, default 42
        The same seed for every run.

    Returns
    -------
    pandas.DataFrame
        The report: one row per metric, one column per run.

    Examples
    --------
    >>> compare(digits_learner, {"cross-entropy": 0.0, "label smoothing": 0.1}, 10, "report")  # doctest: +SKIP
    """
    out = writable_folder(out)
    learners = {title: train(make_learner, eps, epochs, seed, label=f"training {i}/{len(runs)}: {title}")
                for i, (title, eps) in enumerate(runs.items(), 1)}
    table = pd.DataFrame({title: summarize(learn) for title, learn in learners.items()})
    table = table.loc[[column for _, column in ROWS]].rename(index=dict((c, label) for label, c in ROWS))
    if rank_distrib() == 0:
        table.to_csv(out / "calibration.csv", index_label="metric")
        reliability_figure(learners).savefig(out / "reliability.png", dpi=120, bbox_inches="tight")
        print()
        print(table.to_string(float_format=lambda v: f"{v:.4f}"))
        print(f"\nwrote {out / 'calibration.csv'} and {out / 'reliability.png'}")
    return table


def reliability_figure(learners: dict[str, Learner]) -> Figure:
    """One reliability diagram per learner, side by side.

    Parameters
    ----------
    learners : dict of str to Learner
        Title to learner with a `CalibrationCallback`.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> reliability_figure({"cross-entropy": ce, "label smoothing": ls}).savefig("reliability.png")  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(learners), figsize=(5 * len(learners), 5), squeeze=False)
    for ax, (title, learn) in zip(axes[0], learners.items()):
        plot_reliability(calibration_callback(learn), ax=ax, title=title)
    fig.tight_layout()
    return fig
