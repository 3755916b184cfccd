"""The `fastai-ls` command (also `python -m fastai_ls`)."""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from fastai_ls.losses import label_smoothing_cross_entropy

# The checks printed in the first seed article: two batches of logits, targets [1, 2].
ARTICLE_LOGITS = {
    "[[1,8,1],[1,1,8]]": [[1.0, 8.0, 1.0], [1.0, 1.0, 8.0]],
    "[[0.1,8,0.1],[0.1,0.1,8]]": [[0.1, 8.0, 0.1], [0.1, 0.1, 8.0]],
}
ARTICLE_TARGET = [1, 2]


def article_table() -> str:
    """The article's checks recomputed: our loss beside `F.cross_entropy`, for each smoothing convention."""
    y = torch.tensor(ARTICLE_TARGET)
    rows = [f"{'logits':<28}{'eps':>6}  {'smoothing':<9}{'fastai_ls':>11}{'F.cross_entropy':>17}"]
    for name, logits in ARTICLE_LOGITS.items():
        x = torch.tensor(logits)
        for eps, smoothing in [(0.0, "uniform"), (0.05, "uniform"), (0.05, "others")]:
            ours = label_smoothing_cross_entropy(x, y, eps=eps, smoothing=smoothing).item()
            # PyTorch has no other-classes option: its uniform eps*C/(C-1) gives the same target.
            torch_eps = eps if smoothing == "uniform" else eps * x.shape[1] / (x.shape[1] - 1)
            ref = F.cross_entropy(x, y, label_smoothing=torch_eps).item()
            rows.append(f"{name:<28}{eps:>6.2f}  {smoothing:<9}{ours:>11.4f}{ref:>17.4f}")
    return "\n".join(rows)


def _article(args: argparse.Namespace) -> None:
    print(article_table())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastai-ls", description="Label smoothing and calibration for fastai.")
    commands = parser.add_subparsers(dest="command", required=True)
    article = commands.add_parser("article", help="recompute the seed article's label-smoothing checks")
    article.set_defaults(run=_article)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fastai-ls` command."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"fastai-ls: error: {err}", file=sys.stderr)
        return 1
    return 0
