"""Epoch time of one learner with and without `CalibrationCallback`, interleaved; prints the median ratio.

    python benchmarks/bench_callback.py --reps 9               # small CNN on 3x32x32 images (CIFAR-sized)
    python benchmarks/bench_callback.py --reps 9 --model mlp   # worst case: an MLP costing ~1 ms per batch

Runs alternate (with, without, without, with, ...) so that drifting load on shared cores hits both alike. The
target is a median overhead of at most 2% on a CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from report import add_report_argument, report_to  # benchmarks/report.py, beside this script
from torch import nn

from fastai_ls import CalibrationCallback, LabelSmoothingCrossEntropy


def synthetic(n: int, shape: tuple[int, ...], n_classes: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random inputs whose label is the noisy argmax of their first values, so the model has something to learn."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = (x.reshape(n, -1)[:, :n_classes] + torch.randn(n, n_classes, generator=g)).argmax(1)
    return list(zip(x, y))


def make_model(args) -> nn.Module:
    if args.model == "mlp":
        return nn.Sequential(nn.Linear(args.features, args.hidden), nn.ReLU(), nn.Linear(args.hidden, args.hidden),
                             nn.ReLU(), nn.Linear(args.hidden, args.classes))
    def block(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2))
    return nn.Sequential(block(3, 16), block(16, 32), block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, args.classes))


def make_learner(args, with_callback: bool) -> Learner:
    torch.manual_seed(0)
    shape = (args.features,) if args.model == "mlp" else (3, 32, 32)
    dls = DataLoaders.from_dsets(synthetic(args.n_train, shape, args.classes, 1),
                                 synthetic(args.n_valid, shape, args.classes, 2),
                                 bs=args.bs, num_workers=0, device=args.device)
    model = make_model(args)
    cbs = [CalibrationCallback(metrics=("ece", "nll"))] if with_callback else []
    return Learner(dls, model, loss_func=LabelSmoothingCrossEntropy(0.1), cbs=cbs)


def epoch_seconds(learn: Learner) -> float:
    with learn.no_bar(), learn.no_logging():
        start = time.perf_counter()
        learn.fit(1, 1e-3)
        if torch.device(learn.dls.device).type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=9, help="timed epochs per variant")
    parser.add_argument("--model", choices=("cnn", "mlp"), default="cnn")
    parser.add_argument("--n-train", type=int, help="default 4000 (cnn) / 20000 (mlp)")
    parser.add_argument("--n-valid", type=int, help="default 1000 (cnn) / 5000 (mlp)")
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_report_argument(parser)
    args = parser.parse_args()
    with report_to(args.report, "The callback's overhead (`benchmarks/bench_callback.py`)"):
        args.n_train = args.n_train or (4_000 if args.model == "cnn" else 20_000)
        args.n_valid = args.n_valid or (1_000 if args.model == "cnn" else 5_000)
        warnings.filterwarnings("ignore", category=FutureWarning)

        learners = {True: make_learner(args, True), False: make_learner(args, False)}
        for learn in learners.values():  # warm-up: allocator, thread pools, first-call overheads
            epoch_seconds(learn)
        times: dict[bool, list[float]] = {True: [], False: []}
        for rep in range(args.reps):
            order = (True, False) if rep % 2 == 0 else (False, True)
            for with_callback in order:
                times[with_callback].append(epoch_seconds(learners[with_callback]))
        ratios = [a / b for a, b in zip(times[True], times[False])]
        print(f"model={args.model} device={args.device} threads={torch.get_num_threads()} "
              f"train={args.n_train} valid={args.n_valid} "
              f"classes={args.classes} bs={args.bs} reps={args.reps}")
        print(f"epoch without callback: median {statistics.median(times[False]):.3f} s")
        print(f"epoch with callback:    median {statistics.median(times[True]):.3f} s")
        print(f"median ratio with/without: {statistics.median(ratios):.4f} "
              f"(overhead {100 * (statistics.median(ratios) - 1):+.2f}%; target <= +2%)")


if __name__ == "__main__":
    main()
