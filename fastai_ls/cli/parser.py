"""The `fastai-ls` command's parser: its subcommands, options and argument types, in the standard library alone
(`fastai-ls --help`, `--version` and argument errors answer without loading torch or fastai)."""

from __future__ import annotations

import argparse
import math
import textwrap

from fastai_ls import __version__
from fastai_ls.calibrator_names import CALIBRATOR_NAMES

__all__ = ["SEED_MAX", "build_parser"]

SEED_MAX = 2**32 - 1  # numpy's seeds, which fastai's `set_seed` sets, are 0 .. 2**32 - 1


# Argument types. Their messages follow `--option: ` in the error line: `--epochs: expected a positive integer,
# got 'abc'`.


def _integer(text: str, low: int, high: float, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _integer(text, 1, math.inf, "a positive integer")


def _digit_count(text: str) -> int:  # two of each of the ten digits: one to train on, one to validate
    return _integer(text, 20, math.inf, "an integer of at least 20 (two images of each digit)")


def _non_negative_int(text: str) -> int:
    return _integer(text, 0, math.inf, "a non-negative integer")


def _seed(text: str) -> int:
    return _integer(text, 0, SEED_MAX, f"an integer from 0 to {SEED_MAX}")


def _eps(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _folds(text: str) -> int:
    return _integer(text, 2, math.inf, "an integer >= 2")


def _path(text: str) -> str:
    # An empty path would silently mean the current folder (Path('') is Path('.')).
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a path, got {text!r}")
    return text


def _methods(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in CALIBRATOR_NAMES:
            import difflib

            close = difflib.get_close_matches(name.lower(), CALIBRATOR_NAMES, n=1)  # the names are lower case
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise argparse.ArgumentTypeError(f"unknown method {name!r}{hint}; known: {','.join(CALIBRATOR_NAMES)}")
    if not names or len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated method names, got {text!r}")
    return names


def _losses(text: str) -> list[str]:
    from fastai_ls.integration.loss_registry import check_loss_names

    try:
        return check_loss_names([name.strip() for name in text.split(",") if name.strip()])
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _calibration_options(parser: argparse.ArgumentParser) -> None:
    # ", " between the names: the help is wrapped at spaces only, so each name stays whole for copy and paste
    parser.add_argument("--methods", type=_methods, default=list(CALIBRATOR_NAMES), metavar="M1,M2",
                        help="comma-separated calibration methods to compare (default: all of "
                             f"{', '.join(CALIBRATOR_NAMES)})")
    parser.add_argument("--folds", type=_folds, default=5, help="cross-fitting folds (default 5)")


def _output_options(parser: argparse.ArgumentParser, force_help: str) -> None:
    parser.add_argument("--force", action="store_true", help=force_help)
    parser.add_argument("--quiet", action="store_true", help="no progress bars (the tables are printed as usual)")


def _version() -> str:
    """This package's version, and fastai's and torch's as installed (read without importing them)."""
    from importlib.metadata import PackageNotFoundError, version

    installed = []
    for name in ("fastai", "torch"):
        try:
            installed.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            installed.append(f"{name} not installed")
    return f"fastai-ls {__version__} ({', '.join(installed)})"


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's layout, wrapped at spaces only: a method name (`top_label_isotonic`) or an option (`--max-items`)
    is never broken across lines, where copying it from the terminal would give a wrong name."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_long_words=False, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_long_words=False, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        """argparse's, with arguments it does not know told by the subcommand's parser, not the top-level one."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = getattr(self, "commands", {}).get(getattr(parsed, "command", None), self)
            message = f"unrecognized arguments: {' '.join(extras)}"
            split = [name for name in (extra.strip(",") for extra in extras) if name in CALIBRATOR_NAMES]
            if split and getattr(parsed, "methods", None) is not None:  # "--methods temperature, vector", pasted
                names = ",".join(dict.fromkeys([*parsed.methods, *split]))
                message += ("; --methods takes one word, the names separated by commas without spaces: --methods "
                            f"{names}")
            parser.error(message)
        return parsed

    def error(self, message: str) -> None:
        """Bad arguments: one line on stderr, exit status 2, no usage dump."""
        message = message.removeprefix("argument ")  # argparse's "argument --epochs: ..." reads "--epochs: ..."
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The `fastai-ls` command's parser: subcommands `article`, `demo`, `pets`, `calibrate` and `selective`.

    Returns
    -------
    argparse.ArgumentParser
        Its `parse_args` result has `command`, the subcommand's name, and the subcommand's options.

    Examples
    --------
    >>> args = build_parser().parse_args(["demo", "--max-items", "100"])
    >>> args.command, args.max_items, args.epochs
    ('demo', 100, 10)
    """
    parser = _Parser(prog="fastai-ls", description="Label smoothing and calibration for fastai.")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    commands.add_parser("article", help="recompute the seed article's label-smoothing checks")

    demo = commands.add_parser(
        "demo", help="cross-entropy vs label smoothing on scikit-learn's digits (offline)",
        description="Train a cross-entropy baseline and a label-smoothing model (a small CNN, same seed) on "
                    "scikit-learn's 1,797 handwritten digits, which it writes as PNG files into fastai's data "
                    "folder on first use; print their calibration side by side with 95% intervals, compare "
                    "post-hoc calibrators for each by cross-fitting on the validation set, and compare confidence "
                    "scores for abstaining (selective classification). Writes into --out the tables "
                    "calibration.csv, calibrators.csv, differences.csv (label smoothing minus cross-entropy) and "
                    "selective.csv, and the reliability diagrams reliability.png, smooth_reliability.png and "
                    "calibrated_reliability.png (each model after its best calibrator). With --losses it writes "
                    "losses.csv and losses_per_seed.csv instead.")
    demo.add_argument("--epochs", type=_positive_int, default=10, help="fit_one_cycle epochs per model (default 10)")
    demo.add_argument("--eps", type=_eps, default=None, help="label smoothing of the second model (default 0.1)")
    demo.add_argument("--bs", type=_positive_int, default=64, help="batch size (default 64)")
    demo.add_argument("--seed", type=_seed, default=42,
                      help="seed of the split, the label noise, both trainings and the folds (default 42)")
    demo.add_argument("--max-items", type=_digit_count, default=None,
                      help="use only this many images, each digit in its share (at least 20); the training gets "
                           "quicker, the calibrators' comparison much less so (see --methods)")
    demo.add_argument("--label-noise", type=_eps, default=0.0, metavar="FRACTION",
                      help="replace this share of the training labels by a random wrong digit (seeded); the "
                           "validation labels stay clean (default 0)")
    demo.add_argument("--losses", type=_losses, default=None, metavar="L1,L2",
                      help="compare these training losses instead (ce, ls, focal, flsd53, mbls, maxsup, logitnorm), "
                           "each trained from every seed of --seeds on the same splits, as trained and after its best "
                           "calibrator, with paired differences from ce; writes losses.csv and losses_per_seed.csv")
    demo.add_argument("--seeds", type=_positive_int, default=None,
                      help="with --losses: train each loss from this many seeds, --seed, --seed + 1, ... (default 1)")
    _calibration_options(demo)
    demo.add_argument("--out", type=_path, default="fastai_ls_out", help="output folder (default ./fastai_ls_out)")
    _output_options(demo, "replace the files of an earlier report in --out (default: refused, before any training)")

    pets = commands.add_parser(
        "pets", help="the Oxford-IIIT Pets example (resnet34) with label smoothing",
        description="Train fastai's Oxford-IIIT Pets example with label smoothing (and a cross-entropy baseline "
                    "with --baseline), print the calibration report, compare post-hoc calibrators and confidence "
                    "scores, and write the tables (calibration.csv, calibrators.csv, differences.csv with "
                    "--baseline, selective.csv) and reliability diagrams (reliability.png, smooth_reliability.png, "
                    "calibrated_reliability.png) into --out. Images are named <breed>_<n>.jpg. Offline, pass --path "
                    "an extracted copy.")
    pets.add_argument("--path", type=_path, default=None, help="extracted Pets folder or its images/ (default: "
                      "untar_data(URLs.PETS), ~/.fastai/data/oxford-iiit-pet)")
    pets.add_argument("--epochs", type=_positive_int, default=4, help="fit_one_cycle epochs (default 4)")
    pets.add_argument("--eps", type=_eps, default=0.1, help="label smoothing (default 0.1)")
    pets.add_argument("--arch", default="resnet34", help="torchvision or timm architecture name (default resnet34)")
    pets.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                      help="train from scratch (default: ImageNet weights from torch's cache, or downloaded)")
    pets.add_argument("--bs", type=_positive_int, default=64, help="batch size (default 64)")
    pets.add_argument("--presize", type=_positive_int, default=460,
                      help="per-image resize before the random crops, larger than --size (default 460)")
    pets.add_argument("--size", type=_positive_int, default=224, help="training image size (default 224)")
    pets.add_argument("--num-workers", type=_non_negative_int, default=None,
                      help="DataLoader workers (default: fastai's)")
    pets.add_argument("--seed", type=_seed, default=42, help="seed of the split and of training (default 42)")
    pets.add_argument("--baseline", action="store_true", help="also train a cross-entropy baseline and compare")
    _calibration_options(pets)
    pets.add_argument("--out", type=_path, default="fastai_ls_pets", help="output folder (default ./fastai_ls_pets)")
    _output_options(pets, "replace the files of an earlier report in --out (default: refused, before any training)")

    calibrate = commands.add_parser(
        "calibrate", help="compare post-hoc calibrators on saved predictions (.npz)",
        description="Compare post-hoc calibrators on held-out predictions saved by any framework, by cross-fitting "
                    "(no row is scored by a calibrator fitted on it), and print the table with 95% intervals. "
                    "PREDICTIONS.npz (numpy.savez) holds 'logits' (N, C) or 'probabilities' (N, C; their logs are "
                    "taken as logits), and 'targets' (N,) integer class ids. From fastai: "
                    "fastai_ls.save_predictions(learn, 'valid.npz').")
    calibrate.add_argument("predictions", type=_path, metavar="PREDICTIONS.npz", help="the saved predictions")
    _calibration_options(calibrate)
    calibrate.add_argument("--seed", type=_seed, default=0, help="seed of the folds and intervals (default 0)")
    calibrate.add_argument("--out", type=_path, default=None, metavar="FILE.csv",
                           help="also write the table to this CSV file (never the predictions file itself)")
    _output_options(calibrate, "replace the --out file if it exists (default: refused, before the comparison)")

    selective = commands.add_parser(
        "selective", help="compare confidence scores for abstaining on saved predictions (.npz)",
        description="Rank held-out predictions by each confidence score (softmax response, max logit, margin, "
                    "energy, negative entropy, DOCTOR, MaxLogit-pNorm, p-NormSoftmax) and print exact AURC and AUGRC "
                    "with 95% intervals, paired differences from the softmax response, and a cross-fitted choice of "
                    "score that keeps the softmax response unless another is better beyond its interval. "
                    "PREDICTIONS.npz: the files of 'fastai-ls calibrate' ('logits' or 'probabilities', and "
                    "'targets').")
    selective.add_argument("predictions", type=_path, metavar="PREDICTIONS.npz", help="the saved predictions")
    selective.add_argument("--folds", type=_folds, default=5, help="folds of the cross-fitted choice (default 5)")
    selective.add_argument("--seed", type=_seed, default=0, help="seed of the folds and intervals (default 0)")
    selective.add_argument("--out", type=_path, default=None, metavar="FILE.csv",
                           help="also write the table to this CSV file (never the predictions file itself)")
    selective.add_argument("--plot", type=_path, default=None, metavar="FILE.png",
                           help="also draw the risk-coverage curves of every score into this PNG file")
    selective.add_argument("--force", action="store_true",
                           help="replace the --out and --plot files if they exist (default: refused, before the "
                                "comparison)")
    parser.commands = commands.choices  # the subcommands' parsers, which `parse_args` has tell unknown arguments
    return parser
