"""`fastai-ls selective PREDICTIONS.npz`: which confidence score should decide when to abstain? Every score of
`compare_confidence_scores` on outputs saved by any framework (the files of `fastai-ls calibrate`), with intervals,
the cross-fitted choice among them, and whether the softmax response ranks worse than a normalised score."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd

__all__ = ["SHOWN", "selective_text", "selective", "selective_section"]

WIDTH = 110  # explanatory lines are wrapped to this many characters
# The columns shown on the console, with their headers: estimate [lower, upper] each.
SHOWN = {"aurc": "AURC", "augrc": "AUGRC", "aurc_vs_msp": "AURC - MSP"}


def selective_text(table: pd.DataFrame, digits: int = 4) -> str:
    """A `compare_confidence_scores` table as console text: `estimate [lower, upper]` for AURC, AUGRC and the
    paired AURC difference from the softmax response, and the choice of p or score.

    Parameters
    ----------
    table : pandas.DataFrame
        A `compare_confidence_scores` table.
    digits : int
        Digits after the decimal point.

    Returns
    -------
    str

    Examples
    --------
    >>> t = pd.DataFrame({"aurc": [0.05], "aurc_lo": [0.04], "aurc_hi": [0.06], "augrc": [0.03], "augrc_lo": [0.02],
    ...                   "augrc_hi": [0.04], "aurc_vs_msp": [0.0], "aurc_vs_msp_lo": [0.0],
    ...                   "aurc_vs_msp_hi": [0.0], "choice": [""]}, index=pd.Index(["msp"], name="score"))
    >>> print(selective_text(t))  # doctest: +NORMALIZE_WHITESPACE
                             AURC                    AUGRC                AURC - MSP choice
    score
    msp    0.0500 [0.0400, 0.0600]  0.0300 [0.0200, 0.0400]  0.0000 [0.0000, 0.0000]
    """
    from fastai_ls.calibration.report import interval_text

    text = interval_text(table, list(SHOWN), digits).rename(columns=SHOWN)
    text["choice"] = table["choice"]
    return text.to_string()


def _say(text: str, file=None) -> None:
    print(textwrap.fill(text, WIDTH, subsequent_indent="  " if text.startswith("note:") else ""), file=file)


def _explain(table: pd.DataFrame) -> None:
    """The lines under a table: how the choice was made, and the softmax response's note."""
    from fastai_ls.calibration.compare_scores import softmax_response_note

    folds = table.attrs["folds"]
    _say(f"pnorm, pnorm_softmax: p from 1..9 chosen on {folds - 1} of {folds} folds and scored on the other, in turn; "
         "selected: the score (any, any p) with the lowest AURC there, kept only if it beats the softmax response "
         "(msp) beyond its paired interval; 'per fold' rows are ranked within each fold. AURC - MSP: paired, on the "
         "same rows (negative: ranks better).")
    _say(softmax_response_note(table))


def selective(
    path: str | Path,
    folds: int = 5,
    seed: int = 0,
    out: str | Path | None = None,
    plot: str | Path | None = None,
    force: bool = False,
) -> pd.DataFrame:
    """Run `compare_confidence_scores` on the predictions in `path` (the format of `fastai-ls calibrate`), print the
    table with 95% intervals and the softmax response's note, and write the table to `out` (CSV) and the
    risk-coverage curves to `plot` (PNG) if given.

    Parameters
    ----------
    path : str or Path
        The predictions (`fastai_ls.cli.archive`'s module docstring: logits or probabilities, and targets).
    folds : int, default 5
        Folds of the cross-fitted choice.
    seed : int, default 0
        Seed of the folds and of the bootstrap.
    out : str or Path, optional
        CSV file for the table (checked before the comparison runs).
    plot : str or Path, optional
        PNG file for `plot_selective`'s figure (checked before the comparison runs).
    force : bool, default False
        Replace `out` and `plot` if they exist (never the predictions file itself).

    Returns
    -------
    pandas.DataFrame
        The `compare_confidence_scores` table.

    Examples
    --------
    >>> selective("valid.npz", out="selective.csv")  # doctest: +SKIP
    """
    from fastai_ls.cli.archive import read_predictions
    from fastai_ls.cli.calibrate import check_csv_path

    out = check_csv_path(out, force, source=path) if out is not None else None
    plot = check_csv_path(plot, force, source=path) if plot is not None else None
    predictions = read_predictions(path)
    import torch

    from fastai_ls.calibration.compare_scores import compare_confidence_scores

    logits, targets = torch.from_numpy(predictions.logits), torch.from_numpy(predictions.targets)
    n, n_classes = logits.shape
    _say(f"{path}: {n} rows, {n_classes} classes, {predictions.source}"
         + (" (their logs taken as logits)" if predictions.source == "probabilities" else ""))
    if predictions.source == "probabilities":
        _say("note: from probabilities, max_logit is the log of the largest probability (msp's ranking up to "
             "rounding) and energy is log(sum p) = 0 up to rounding, no information: both need the model's logits.")
    table = compare_confidence_scores(logits, targets, folds=folds, seed=seed)
    _say(f"selective classification: accuracy {table.attrs['accuracy']:.4f}; exact AURC and AUGRC (ties share their "
         "errors), 95% intervals (a bootstrap over the rows, the same replicates for every score):")
    print(selective_text(table))
    _explain(table)
    if out is not None:
        table.to_csv(out)
        print(f"wrote {out}")
    if plot is not None:
        from fastai_ls.calibration.plots import plot_selective

        plot_selective(logits, targets, seed=seed).savefig(plot, dpi=120, bbox_inches="tight")
        print(f"wrote {plot}")
    return table


def selective_section(held_out: dict, out: str | Path, folds: int = 5, seed: int = 0) -> list[str]:
    """The demo's selective-classification section: `compare_confidence_scores` for each model's held-out logits,
    printed one table after the other with the softmax response's note, and written together to
    `out`/selective.csv (columns model, score, then the table's). Too few rows for the folds: one line saying so,
    nothing written.

    Parameters
    ----------
    held_out : dict
        Model title to its (logits, targets) on the same held-out rows.
    out : str or Path
        The report folder.
    folds : int, default 5
        Folds of the cross-fitted choice.
    seed : int, default 0
        Seed of the folds and of the bootstrap.

    Returns
    -------
    list of str
        The files written: ['selective.csv'], or [].

    Examples
    --------
    >>> selective_section({"cross-entropy": (ce_z, y), "label smoothing": (ls_z, y)}, "out")  # doctest: +SKIP
    ['selective.csv']
    """
    from fastai_ls.calibration.compare_scores import compare_confidence_scores

    tables = {}
    for title, (logits, targets) in held_out.items():
        try:
            table = compare_confidence_scores(logits.detach().cpu(), targets.detach().cpu(), folds=folds, seed=seed)
        except ValueError as err:  # e.g. fewer rows than folds: the rest of the report stands
            print()
            _say(f"selective classification not compared: {err}")
            return []
        print()
        _say(f"{title}: selective classification on the {table.attrs['n']} validation images (abstain on the "
             "least confident first), exact AURC and AUGRC with 95% intervals:")
        print(selective_text(table))
        _explain(table)
        tables[title] = table
    pd.concat(tables, names=["model", "score"]).to_csv(Path(out) / "selective.csv")
    return ["selective.csv"]
