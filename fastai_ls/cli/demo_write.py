"""The demo's files (the write step of `fastai-ls demo`): the output folder, checked before any training, the
tables as CSV and the reliability diagrams as PNG."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from fastai_ls.calibration.best_calibrator import Calibrated
from fastai_ls.calibration.plots import plot_reliability, plot_smooth_reliability
from fastai_ls.calibration.state import CalibrationState
from fastai_ls.cli.demo_render import CI

if TYPE_CHECKING:  # matplotlib is imported only when the figure is drawn
    from matplotlib.figure import Figure

__all__ = ["OUTPUT_FILES", "writable_folder", "write_tables", "reliability_figure", "write_figures"]

# Every file `compare` may write into its folder.
OUTPUT_FILES = ("calibration.csv", "calibrators.csv", "differences.csv", "selective.csv", "reliability.png",
                "smooth_reliability.png", "calibrated_reliability.png")


def writable_folder(out: str | Path, force: bool = False, names: tuple[str, ...] = OUTPUT_FILES) -> Path:
    """`out`, created if needed, once a file could be written into it and it holds none of `names` (unless
    `force`; even then each must be a regular file, not a link, folder or FIFO): checked before any training, so
    that a report that cannot be written, or would replace an earlier one, fails at once, not after the runs.

    Parameters
    ----------
    out : str or Path
        The output folder.
    force : bool, default False
        Replace the files of an earlier report (`--force`).
    names : tuple of str, default OUTPUT_FILES
        The files the report writes.

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
    if out.exists() and not out.is_dir():  # mkdir's own message, "File exists", reads as if the folder were taken
        raise OSError(f"cannot write the report into {out}: it is a file, not a folder (give a folder, e.g. "
                      "fastai_ls_out)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise OSError(f"cannot write the report into {out}: {err}") from err
    existing = [name for name in names if (out / name).exists() or (out / name).is_symlink()]
    for name in existing:  # --force replaces the report's own files, never what a link points to
        path = out / name
        what = f"a link to {os.readlink(path)}" if path.is_symlink() else "a folder" if path.is_dir() else \
            None if path.is_file() else "a FIFO (named pipe)" if stat.S_ISFIFO(path.stat().st_mode) else \
            "not a regular file"
        if what is not None:  # a folder fails the write after the training; a FIFO blocks it forever
            raise OSError(f"cannot replace {path}: it is {what}, not a file of an earlier report: remove it, or "
                          "give another --out")
    if existing and not force:
        raise OSError(f"{out} already holds {', '.join(existing)} (an earlier report?): pass --force to replace them, "
                      "or give another --out")
    return out


def write_tables(out: Path, reports: dict[str, pd.DataFrame], calibrated: dict[str, Calibrated],
                 differences: pd.DataFrame | None) -> dict[str, pd.DataFrame]:
    """calibration.csv (model, metric, estimate, lower, upper), calibrators.csv (model, method, the
    `compare_calibrators` columns) when calibrators were compared, differences.csv when given.

    Parameters
    ----------
    out : Path
        The report folder (`writable_folder`).
    reports : dict of str to pandas.DataFrame
        Title to `model_report`.
    calibrated : dict of str to Calibrated
        Title to `calibrate_learner` result (may be empty).
    differences : pandas.DataFrame or None
        `paired_differences` of two models.

    Returns
    -------
    dict of str to pandas.DataFrame
        File name to the table written, in the order written.

    Examples
    --------
    >>> list(write_tables(Path("report"), reports, {}, None))  # doctest: +SKIP
    ['calibration.csv']
    """
    tables = {"calibration.csv": pd.concat({title: report for title, report in reports.items()},
                                           names=["model", "metric"])}
    if calibrated:
        tables["calibrators.csv"] = pd.concat({title: r.table for title, r in calibrated.items()},
                                              names=["model", "method"])
    if differences is not None:
        tables["differences.csv"] = differences
    for name, table in tables.items():
        table.to_csv(out / name)
    return tables


def reliability_figure(
    states: dict[str, CalibrationState], smooth: bool = False, seed: int = 0, suptitle: str | None = None
) -> Figure:
    """One reliability diagram per model, side by side.

    Parameters
    ----------
    states : dict of str to CalibrationState
        Title to counters (e.g. `learn.calibration.state_of(-1)`).
    smooth : bool, default False
        The smooth diagram (`plot_smooth_reliability`) instead of the binned one.
    seed : int, default 0
        Seed of the smooth diagram's bootstrap band.
    suptitle : str, optional
        A title above the diagrams.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> reliability_figure({"cross-entropy": ce_state, "label smoothing": ls_state}).savefig("r.png")  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    # The counts (or density) in a panel below each diagram, as `cb.plot_reliability()` draws them.
    fig, axes = plt.subplots(2, len(states), figsize=(5 * len(states), 7.6), squeeze=False, sharex="col",
                             gridspec_kw={"height_ratios": [3, 1]})
    for top, panel, (title, state) in zip(axes[0], axes[1], states.items()):
        if smooth:
            plot_smooth_reliability(state, ax=(top, panel), title=title, ci=CI, seed=seed)
        else:
            plot_reliability(state, ax=(top, panel), title=title, ci=CI)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def write_figures(out: Path, figures: dict[str, Figure]) -> list[str]:
    """Each figure saved as PNG (120 dpi) into `out` under its name.

    Parameters
    ----------
    out : Path
        The report folder.
    figures : dict of str to matplotlib.figure.Figure
        File name to figure.

    Returns
    -------
    list of str
        The names written.

    Examples
    --------
    >>> write_figures(Path("report"), {"reliability.png": reliability_figure(states)})  # doctest: +SKIP
    ['reliability.png']
    """
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=120, bbox_inches="tight")
    return list(figures)
