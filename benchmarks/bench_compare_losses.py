"""The loss comparison's own cost, everything but the training: for L losses x S seeds at the digits' shape (359
validation images, 10 classes), the held-out logits of each model are given (seeded, over-confident by a different
amount per loss), and `compare_losses` runs as `fastai-ls demo --losses ... --seeds S` does (every calibrator,
5 folds, 1,000 bootstrap replicates). Printed: seconds for the calibrators' comparisons and for the two-level
bootstrap, so that the comparison's time is the training's plus these.

    python benchmarks/bench_compare_losses.py                   # 7 losses x 5 seeds
    python benchmarks/bench_compare_losses.py --losses 2 --seeds 5
"""

from __future__ import annotations

import argparse
import time

import torch
from report import add_report_argument, report_to  # benchmarks/report.py, beside this script

import fastai_ls.integration.compare_losses as compare_module
from fastai_ls.integration.loss_registry import LOSSES, LossSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", type=int, default=7, help="how many losses (default 7)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per loss (default 5)")
    parser.add_argument("--rows", type=int, default=359, help="validation images per seed (default 359)")
    add_report_argument(parser)
    args = parser.parse_args()
    # Stand-ins for the family's classes, so that the scoring runs whatever this installation has: the loss only
    # names the fake logits' sharpness, nothing is trained.
    with report_to(args.report, "The loss comparison's scoring time (`benchmarks/bench_compare_losses.py`)"):
        names = [f"loss{k}" for k in range(args.losses)]
        for k, name in enumerate(names):
            LOSSES[name] = LossSpec("fastai_ls.loss.modules", "LabelSmoothingCrossEntropyFlat", {"eps": k / 20}, name)

        def held_out(learn):
            g = torch.Generator().manual_seed(learn["seed"])
            logits = 2 * torch.randn(args.rows, 10, generator=g)
            target = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
            return (3.0 - 2 * learn["loss"].eps) * logits, target

        compare_module.train = lambda make, eps, epochs, seed, label="", loss_func=None: {"loss": loss_func,
                                                                                          "seed": seed}
        compare_module.validation_logits = held_out
        spent = {"bootstrap": 0.0}
        real = compare_module.seed_bootstrap

        def timed(*a, **k):
            start = time.perf_counter()
            out = real(*a, **k)
            spent["bootstrap"] += time.perf_counter() - start
            return out

        compare_module.seed_bootstrap = timed
        start = time.perf_counter()
        compare_module.compare_losses(lambda eps=0.0, seed=0: None, names, seeds=args.seeds)
        total = time.perf_counter() - start
        print(f"{args.losses} losses x {args.seeds} seeds, {args.rows} x 10 held-out logits each: {total:.1f} s in "
              "all, "
              f"{total - spent['bootstrap']:.1f} s comparing calibrators, {spent['bootstrap']:.1f} s in the two-level "
              "bootstrap")


if __name__ == "__main__":
    main()
