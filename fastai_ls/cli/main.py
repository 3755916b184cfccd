"""The `fastai-ls` command (also `python -m fastai_ls`): the demo, the Pets job and the seed article's checks.

The parser (`parser.py`) imports neither torch nor fastai (`fastai-ls --help`, `--version` and argument errors
answer at once); each subcommand imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from functools import partial

from fastai_ls.cli.parser import build_parser

# The checks printed in the first seed article: two batches of logits, targets [1, 2].
ARTICLE_LOGITS = {
    "[[1,8,1],[1,1,8]]": [[1.0, 8.0, 1.0], [1.0, 1.0, 8.0]],
    "[[0.1,8,0.1],[0.1,0.1,8]]": [[0.1, 8.0, 0.1], [0.1, 0.1, 8.0]],
}
ARTICLE_TARGET = [1, 2]


def article_table() -> str:
    """The seed article's checks recomputed: our loss beside `F.cross_entropy`, for each smoothing convention.

    Returns
    -------
    str
        A table with one row per logits, eps and smoothing convention, then two lines saying what 'others' is.

    Examples
    --------
    >>> print(article_table().splitlines()[2])
    [[1,8,1],[1,1,8]]             0.05  uniform       0.2352           0.2352
    """
    import torch
    import torch.nn.functional as F

    from fastai_ls.loss.formula import uniform_eps
    from fastai_ls.loss.functional import label_smoothing_cross_entropy

    y = torch.tensor(ARTICLE_TARGET)
    rows = [f"{'logits':<28}{'eps':>6}  {'smoothing':<9}{'fastai_ls':>11}{'F.cross_entropy':>17}"]
    for name, logits in ARTICLE_LOGITS.items():
        x = torch.tensor(logits)
        for eps, smoothing in [(0.0, "uniform"), (0.05, "uniform"), (0.05, "others")]:
            ours = label_smoothing_cross_entropy(x, y, eps=eps, smoothing=smoothing).item()
            # PyTorch has no other-classes option: the same target comes from its uniform smoothing with eps*C/(C-1).
            ref = F.cross_entropy(x, y, label_smoothing=uniform_eps(eps, smoothing, x.shape[1])).item()
            rows.append(f"{name:<28}{eps:>6.2f}  {smoothing:<9}{ours:>11.4f}{ref:>17.4f}")
    rows += ["others: smoothing='others', 1-eps on the true class, eps/(C-1) on each other class",
             "(F.cross_entropy: its uniform label_smoothing at eps*C/(C-1), the same target)"]
    return "\n".join(rows)


def runs(eps: float, baseline: bool) -> dict[str, float]:
    """The report's columns: the label-smoothing model, after the cross-entropy baseline when asked for.

    Parameters
    ----------
    eps : float
        Label smoothing of the second model.
    baseline : bool
        Also train a cross-entropy (eps 0) model, first.

    Returns
    -------
    dict of str to float
        Column title to eps, in training order.

    Examples
    --------
    >>> runs(0.1, baseline=True)
    {'cross-entropy': 0.0, 'label smoothing 0.1': 0.1}
    """
    smoothed = {f"label smoothing {eps:g}": eps}
    return {"cross-entropy": 0.0, **smoothed} if baseline else smoothed


def _article(args: argparse.Namespace) -> None:
    print(article_table())


def _demo(args: argparse.Namespace) -> None:
    if args.losses is None and args.seeds is not None:
        raise ValueError("--seeds is for --losses (the two-model demo trains from --seed alone): add --losses ce,ls")
    if args.losses is not None and args.eps is not None:
        raise ValueError("--eps sets the second model of the two-model demo; with --losses, 'ls' is label smoothing "
                         "0.1: leave --eps out")
    from fastai_ls.digits import digits_learner

    make = partial(digits_learner, bs=args.bs, max_items=args.max_items, seed=args.seed, label_noise=args.label_noise)
    if args.losses is not None:
        from fastai_ls.cli.losses import demo_losses

        demo_losses(make, args.losses, args.seeds or 1, epochs=args.epochs, out=args.out, seed=args.seed,
                    methods=args.methods, folds=args.folds, force=args.force, quiet=args.quiet)
        return
    from fastai_ls.cli.demo import compare

    compare(make, runs(0.1 if args.eps is None else args.eps, baseline=True), epochs=args.epochs, out=args.out,
            seed=args.seed, methods=args.methods, folds=args.folds, force=args.force, quiet=args.quiet)


def _pets(args: argparse.Namespace) -> None:
    from fastai_ls.cli.demo import compare
    from fastai_ls.pets import pets_learner

    make = partial(pets_learner, path=args.path, arch=args.arch, pretrained=args.pretrained, bs=args.bs,
                   presize=args.presize, size=args.size, num_workers=args.num_workers, seed=args.seed)
    compare(make, runs(args.eps, args.baseline), epochs=args.epochs, out=args.out, seed=args.seed,
            methods=args.methods, folds=args.folds, force=args.force, quiet=args.quiet)


def _calibrate(args: argparse.Namespace) -> None:
    from fastai_ls.cli.calibrate import calibrate

    calibrate(args.predictions, methods=args.methods, folds=args.folds, seed=args.seed, out=args.out,
              force=args.force, quiet=args.quiet)


def _selective(args: argparse.Namespace) -> None:
    from fastai_ls.cli.selective import selective

    selective(args.predictions, folds=args.folds, seed=args.seed, out=args.out, plot=args.plot, force=args.force)



INTERRUPTED = "\nfastai-ls: interrupted\n"
# torch's CPU and CUDA allocators raise RuntimeError (torch.OutOfMemoryError is one) when memory runs out
_OUT_OF_MEMORY = re.compile(r"out of memory|not enough memory|can't allocate memory|failed to allocate", re.IGNORECASE)


_main_pid = None  # the process that runs the command: DataLoader workers inherit its handler


def _exit_interrupted(signum, frame) -> None:
    if os.getpid() == _main_pid:
        sys.stderr.write(INTERRUPTED)
        sys.stderr.flush()
    os._exit(130)


def _interrupt(signum, frame) -> None:
    # The first Ctrl-C unwinds (fastai's after_fit, DataLoader workers, open files) to main's one line; a second one
    # while that runs ends the process at once, without a traceback from wherever the unwinding was.
    signal.signal(signal.SIGINT, _exit_interrupted)
    raise KeyboardInterrupt


@contextmanager
def _sigint_handler():
    """`_interrupt` as the SIGINT handler while the command runs (only the main thread may set one)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _main_pid
    _main_pid = os.getpid()
    previous = signal.signal(signal.SIGINT, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def _out_of_memory(args: argparse.Namespace, err: BaseException) -> str:
    if args.command == "calibrate":
        return f"{args.predictions} is too big for this machine's memory ({_first_line(err)})"
    return f"out of memory ({_first_line(err)}): try a smaller --bs, or --max-items" if args.command == "demo" else \
        f"out of memory ({_first_line(err)}): try a smaller --bs or --size"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fastai-ls` command.

    Parameters
    ----------
    argv : list of str, optional
        The arguments (default: `sys.argv[1:]`).

    Returns
    -------
    int
        The exit status: 0, or 1 after a one-line error about bad values, data or memory (2 for bad arguments,
        from the parser; 130 after Ctrl-C, at any time).

    Examples
    --------
    >>> main(["article"])  # doctest: +ELLIPSIS
    logits ...
    0
    """
    with _sigint_handler():  # first: an interrupt while the subcommand imports torch and fastai is one line too
        try:
            args = build_parser().parse_args(argv)
            run = {"article": _article, "demo": _demo, "pets": _pets, "calibrate": _calibrate,
                   "selective": _selective}[args.command]
            with warnings.catch_warnings():
                # fastai 2.8 applies torch.jit.script at import time, which torch 2.10+ deprecates: noise our users
                # cannot act on.
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
                run(args)
        except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback from wherever it came; 128 + SIGINT
            sys.stdout.flush()
            sys.stderr.write(INTERRUPTED)
            return 130
        except MemoryError as err:  # numpy's allocations
            print(f"fastai-ls: error: {_out_of_memory(args, err)}", file=sys.stderr)
            return 1
        except RuntimeError as err:
            if not _OUT_OF_MEMORY.search(str(err)):
                raise  # a defect: its traceback is what a bug report needs
            print(f"fastai-ls: error: {_out_of_memory(args, err)}", file=sys.stderr)
            return 1
        except (ValueError, OSError) as err:  # bad values and missing data: one line, no traceback
            print(f"fastai-ls: error: {_first_line(err, limit=2000)}", file=sys.stderr)
            return 1
    return 0
