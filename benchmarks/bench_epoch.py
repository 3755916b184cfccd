"""What a fastai user gains end to end: one epoch (training, then validation) and `get_preds(with_loss=True)` of the
same Learner with `LabelSmoothingCrossEntropy(0.1)` and with fastai's `CrossEntropyLossFlat(label_smoothing=0.1)`.

    python benchmarks/bench_epoch.py [--reps 8] [--model cnn|mlp|wide ...] [--threads N] [--device cuda]

Models (synthetic data, so that nothing is downloaded; the loss's share of the time grows down the list):
- cnn: a small CNN on 3x32x32 images, 10 classes (CIFAR-sized);
- mlp: a 2-layer MLP on 256 features, 1000 classes (ImageNet-sized output);
- wide: a 2-layer MLP on 128 features, 32000 classes (a language model's vocabulary).

Each loss has its own Learner, from the same initial weights and with the same batches, keeping its optimizer's state
from one epoch to the next (as in a real fit). Every repetition runs both, in alternating order (A B, B A, ...), so
that drifting load on shared cores hits both alike; the table gives each loss's median time and
the median of the per-repetition ratios (ours / fastai's; below 1 is faster). Runs on the CPU, or on CUDA with
`--device cuda`.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings
from functools import partial

import fastai.callback.progress  # noqa: F401  (Learner.no_bar, as `from fastai.vision.all import *` brings it)
import torch
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from report import add_report_argument, report_to  # benchmarks/report.py, beside this script
from torch import nn

from fastai_ls import LabelSmoothingCrossEntropy

MODELS = {  # name: (input shape, classes, train items, valid items)
    "cnn": ((3, 32, 32), 10, 1024, 256),
    "mlp": ((256,), 1000, 2048, 512),
    "wide": ((128,), 32000, 512, 256),
}


def synthetic(n: int, shape: tuple[int, ...], n_classes: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random inputs whose label is the noisy argmax of a fixed projection, so the model has something to learn."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    projection = torch.randn(x[0].numel(), n_classes, generator=torch.Generator().manual_seed(1))
    y = (x.reshape(n, -1) @ projection + torch.randn(n, n_classes, generator=g)).argmax(1)
    return list(zip(x, y))


def make_model(name: str, shape: tuple[int, ...], n_classes: int) -> nn.Module:
    torch.manual_seed(0)
    if name == "cnn":
        def block(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                                 nn.MaxPool2d(2))
        return nn.Sequential(block(3, 16), block(16, 32), block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(64, n_classes))
    hidden = 512 if name == "mlp" else 256
    return nn.Sequential(nn.Linear(shape[0], hidden), nn.ReLU(), nn.Linear(hidden, n_classes))


def bench_model(name: str, reps: int, bs: int, device: str) -> dict[str, dict[str, float]]:
    shape, n_classes, n_train, n_valid = MODELS[name]
    dls = DataLoaders.from_dsets(synthetic(n_train, shape, n_classes, 0), synthetic(n_valid, shape, n_classes, 1),
                                 bs=bs, num_workers=0, device=device)
    model = make_model(name, shape, n_classes)
    losses = {"fastai_ls": LabelSmoothingCrossEntropy(0.1),
              "fastai CrossEntropyLossFlat": CrossEntropyLossFlat(label_smoothing=0.1)}
    # One Learner per loss, from the same weights, each keeping its optimizer: a fresh Adam state every epoch would
    # time page faults (the wide model's 8M parameters: two 33 MB buffers), not the loss.
    learners = {loss: Learner(dls, copy.deepcopy(model), loss_func=loss_func) for loss, loss_func in losses.items()}
    times = {task: {loss: [] for loss in losses} for task in ("epoch", "validate", "get_preds")}
    order = list(losses)
    for rep in range(reps + 1):  # repetition 0 warms up (and creates the optimizers' state)
        for loss in order if rep % 2 else order[::-1]:
            learn = learners[loss]
            torch.manual_seed(rep)  # the same shuffled batches for both losses
            with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for task, run in (("epoch", partial(learn.fit, 1, 1e-3)), ("validate", learn.validate),
                                  ("get_preds", partial(learn.get_preds, with_loss=True))):
                    _synchronize(device)
                    start = time.perf_counter()
                    run()
                    _synchronize(device)
                    if rep:
                        times[task][loss].append(time.perf_counter() - start)
    return {task: {"ours": statistics.median(by_loss["fastai_ls"]),
                   "fastai": statistics.median(by_loss["fastai CrossEntropyLossFlat"]),
                   "ratio": statistics.median(a / b for a, b in zip(by_loss["fastai_ls"],
                                                                    by_loss["fastai CrossEntropyLossFlat"]))}
            for task, by_loss in times.items()}


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=8, help="repetitions of each loss (medians over them)")
    parser.add_argument("--model", action="append", choices=list(MODELS), help="repeatable; default: all")
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch's threads (1 on cores that other jobs share: a thread "
                        "waiting for a busy core stalls every parallel region)")
    add_report_argument(parser)
    args = parser.parse_args(argv)
    with report_to(args.report, "An epoch's time with each loss (`benchmarks/bench_epoch.py`)"):
        if args.threads:
            torch.set_num_threads(args.threads)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, device "
              f"{args.device}, batch size {args.bs}, {args.reps} repetitions; load average {os.getloadavg()[0]:.1f}")
        print("epoch = fit(1): training and validation; validate = learn.validate(); get_preds = "
              "learn.get_preds(with_loss=True). ratio = median of per-repetition (fastai_ls / CrossEntropyLossFlat)\n")
        header = f"{'model':<7}{'classes':>8}{'task':>11}{'fastai_ls s':>13}{'fastai s':>11}{'ratio':>8}"
        print(header)
        print("-" * len(header))
        for name in args.model or list(MODELS):
            results = bench_model(name, args.reps, args.bs, args.device)
            for task, r in results.items():
                print(f"{name:<7}{MODELS[name][1]:>8}{task:>11}{r['ours']:>13.3f}{r['fastai']:>11.3f}{r['ratio']:>8.3f}")


if __name__ == "__main__":
    main()
