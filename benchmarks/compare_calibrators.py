"""Compare the post-hoc calibrators on real CNN outputs: CIFAR-10 test-set softmax outputs of LeNet-5 and
WideResNet-16-4 (netcal's example records; see the data folder's README). Prints one table per model.

    python benchmarks/compare_calibrators.py                     # data in ../shared/data next to the repository
    python benchmarks/compare_calibrators.py --data PATH --folds 5 --seed 0 --methods temperature,dirichlet

The logits are the logs of the stored probabilities. `compare_calibrators` splits the 10,000 images into stratified
folds; each method is fitted on all folds but one and predicts the remaining one, in turn, so every row is scored by
a calibrator that never saw it. `fit_s` is the mean wall time of one fit on (folds - 1) / folds of the rows, on the
CPU, each fit from scratch (a user's post-hoc fit runs once, so nothing is warmed up). The last line per model says
how much temperature scaling lowers the ECE.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fastai_ls.calibration.calibrators import CALIBRATORS
from fastai_ls.calibration.compare import COLUMNS, compare_on_logits
from fastai_ls.calibration.report import interval_text

MODELS = {"lenet-5-cifar-10.npz": "LeNet-5", "wideresnet-16-4-cifar-10.npz": "WideResNet-16-4"}
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def load(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities as logits, class ids) of one record."""
    with np.load(path) as record:
        probs, target = record["predictions"], record["ground_truth"]
    with np.errstate(divide="ignore"):  # a probability of 0 becomes a -inf logit, which the calibrators accept
        return torch.from_numpy(np.log(probs)), torch.from_numpy(target.astype(np.int64))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding the two .npz records")
    parser.add_argument("--folds", type=int, default=5, help="cross-fitting folds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fold assignment")
    parser.add_argument("--methods", default=",".join(CALIBRATORS), help="comma-separated method names")
    parser.add_argument("--bins", type=int, default=15, help="equal-width bins of the ECE columns")
    args = parser.parse_args(argv)
    missing = [name for name in MODELS if not (args.data / name).is_file()]
    if missing:
        parser.error(f"{args.data} lacks {', '.join(missing)}: pass --data")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads; folds={args.folds}, seed={args.seed}, ECE with {args.bins} "
          "equal-width bins")
    pd.set_option("display.width", 200)
    for name, title in MODELS.items():
        logits, target = load(args.data / name)
        probs = logits.exp()
        accuracy = float((probs.argmax(1) == target).double().mean())
        print(f"\n{title} on CIFAR-10 ({len(target)} test images, accuracy {accuracy:.3f}, mean confidence "
              f"{float(probs.amax(1).double().mean()):.3f})")
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            table = compare_on_logits(logits, target, methods=methods, folds=args.folds, seed=args.seed,
                                        n_bins=args.bins)
        seconds = time.perf_counter() - start
        # each metric as `estimate [lower, upper]` (95%: bootstrap over the rows, normal for NLL and Brier)
        shown = interval_text(table, [c for c in COLUMNS if c in table.columns])
        shown["fit_s"] = table["fit_s"].map(lambda v: f"{v:.3f}")
        shown["may_change_prediction"] = table["may_change_prediction"]
        print(shown.to_string())
        for w in caught:
            print(f"warning: {w.message}")
        if "temperature" in table.index:
            before, after = table.loc["uncalibrated", "ece"], table.loc["temperature", "ece"]
            print(f"temperature scaling: ECE {100 * before:.2f}% -> {100 * after:.2f}% ({before / after:.1f}x "
                  f"lower); whole comparison {seconds:.1f} s")


if __name__ == "__main__":
    main()
