"""The `fastai-ls` command (also `python -m fastai_ls`): the demo, the Pets job and the seed article's checks."""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch
import torch.nn.functional as F

from fastai_ls.loss.formula import check_eps, uniform_eps
from fastai_ls.loss.functional import label_smoothing_cross_entropy

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
            # PyTorch has no other-classes option: the same target comes from its uniform smoothing with eps*C/(C-1).
            ref = F.cross_entropy(x, y, label_smoothing=uniform_eps(eps, smoothing, x.shape[1])).item()
            rows.append(f"{name:<28}{eps:>6.2f}  {smoothing:<9}{ours:>11.4f}{ref:>17.4f}")
    return "\n".join(rows)


def runs(eps: float, baseline: bool) -> dict[str, float]:
    """Report columns: the label-smoothing model, after the cross-entropy baseline when asked for."""
    smoothed = {f"label smoothing {eps:g}": eps}
    return {"cross-entropy": 0.0, **smoothed} if baseline else smoothed


def _article(args: argparse.Namespace) -> None:
    print(article_table())


def _demo(args: argparse.Namespace) -> None:
    from fastai_ls.cli.demo import compare
    from fastai_ls.digits import digits_learner

    make = partial(digits_learner, bs=args.bs, max_items=args.max_items, seed=args.seed)
    compare(make, runs(args.eps, baseline=True), epochs=args.epochs, out=args.out, seed=args.seed)


def _pets(args: argparse.Namespace) -> None:
    from fastai_ls.cli.demo import compare
    from fastai_ls.pets import pets_learner

    make = partial(pets_learner, path=args.path, arch=args.arch, pretrained=args.pretrained, bs=args.bs,
                   size=args.size, num_workers=args.num_workers, seed=args.seed)
    compare(make, runs(args.eps, args.baseline), epochs=args.epochs, out=args.out, seed=args.seed)


def _eps(text: str) -> float:
    value = float(text)
    try:
        check_eps(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        """Bad arguments: one line on stderr, exit status 2, no usage dump."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastai-ls", description="Label smoothing and calibration for fastai.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    article = commands.add_parser("article", help="recompute the seed article's label-smoothing checks")
    article.set_defaults(run=_article)

    demo = commands.add_parser("demo", help="cross-entropy vs label smoothing on scikit-learn's digits (offline)")
    demo.add_argument("--epochs", type=_positive_int, default=10, help="fit_one_cycle epochs per model (default 10)")
    demo.add_argument("--eps", type=_eps, default=0.1, help="label smoothing of the second model (default 0.1)")
    demo.add_argument("--bs", type=_positive_int, default=64, help="batch size (default 64)")
    demo.add_argument("--seed", type=int, default=42, help="seed of the split and of both trainings (default 42)")
    demo.add_argument("--max-items", type=_positive_int, default=None, help="use only this many images (quick runs)")
    demo.add_argument("--out", default="fastai_ls_out", help="output folder (default ./fastai_ls_out)")
    demo.set_defaults(run=_demo)

    pets = commands.add_parser("pets", help="the Oxford-IIIT Pets example (resnet34) with label smoothing")
    pets.add_argument("--path", default=None, help="extracted Pets folder (default: untar_data(URLs.PETS))")
    pets.add_argument("--epochs", type=_positive_int, default=4, help="fit_one_cycle epochs (default 4)")
    pets.add_argument("--eps", type=_eps, default=0.1, help="label smoothing (default 0.1)")
    pets.add_argument("--arch", default="resnet34", help="architecture name (default resnet34)")
    pets.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="train from scratch")
    pets.add_argument("--bs", type=_positive_int, default=64, help="batch size (default 64)")
    pets.add_argument("--size", type=_positive_int, default=224, help="image size (default 224)")
    pets.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: fastai's)")
    pets.add_argument("--seed", type=int, default=42, help="seed of the split and of training (default 42)")
    pets.add_argument("--baseline", action="store_true", help="also train a cross-entropy baseline and compare")
    pets.add_argument("--out", default="fastai_ls_out", help="output folder (default ./fastai_ls_out)")
    pets.set_defaults(run=_pets)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fastai-ls` command."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as err:  # bad values and missing data: one line, no traceback
        print(f"fastai-ls: error: {err}", file=sys.stderr)
        return 1
    return 0
