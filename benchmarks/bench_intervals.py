"""Time of the confidence intervals: `state.metrics(ci=0.95, n_boot=1000)` on states of several shapes.

    python benchmarks/bench_intervals.py [--reps 7] [--threads 2] [--n-boot 1000]
    taskset -c 0,1 python benchmarks/bench_intervals.py   # on a bigger machine: two cores, as the target says

The target is at most 0.5 s on 2 CPU cores for 1000 replicates with all 1000 fine cells filled (the worst case:
every (cell, correct or not) category is drawn in every replicate). Regime: warm (the first call, which imports
scipy.fft and warms the allocator, is not timed), wall clock, a new seed per call, median over the repetitions.
"draws" is the multinomial draws alone (numpy), "rest" everything else of the call: every metric of every replicate
(torch and scipy.fft) and the point estimates; "total CPU" the CPU time of the call over all threads (on busy
shared cores it shows the work apart from the waiting); "point estimates" is the metrics without intervals, what
each epoch of the callback costs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch
from report import add_report_argument, report_to  # benchmarks/report.py, beside this script

from fastai_ls import CalibrationState
from fastai_ls.calibration.intervals import _resample, joint_cells
from fastai_ls.calibration.metrics import top_label_metrics

TARGET_S = 0.5


def state_of(n: int, shape: str, seed: int = 0) -> CalibrationState:
    """n rows whose top-label confidence fills every one of the 1000 fine cells ('all cells': 1000 classes, so
    that confidences go down to 0.001), is uniform over (0.1, 1] (10 classes: 900 cells), or piles up near 1 with a
    quarter at exactly 1.0 as a CIFAR-10 WideResNet's does ('skewed', 10 classes)."""
    g = np.random.default_rng(seed)
    n_classes = 1000 if shape == "all cells" else 10
    if shape == "skewed":
        conf = np.where(g.random(n) < 0.25, 1.0, 1 - 0.9 * g.beta(0.5, 12, n))
    else:
        conf = g.uniform(1 / n_classes + 1e-6, 1.0, n)
    correct = g.random(n) < conf ** 2
    target = np.where(correct, 0, g.integers(1, n_classes, n))
    state = CalibrationState(n_classes, classwise=False)
    for rows in np.array_split(np.arange(n), max(1, n * n_classes // 10_000_000)):  # ~40 MB of rows at a time
        probs = np.repeat(((1 - conf[rows]) / (n_classes - 1))[:, None], n_classes, 1).astype(np.float32)
        probs[:, 0] = conf[rows]
        state.update(torch.from_numpy(probs), torch.from_numpy(target[rows]))
    return state


def timed(fn, reps: int) -> tuple[float, float]:
    """Median wall-clock and median CPU time (of this process, all threads) of `reps` calls of fn(rep)."""
    wall, cpu = [], []
    for rep in range(reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn(rep)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7, help="timed calls per case")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--n-boot", type=int, default=1000)
    add_report_argument(parser)
    args = parser.parse_args()
    with report_to(args.report, "The intervals' cost (`benchmarks/bench_intervals.py`)"):
        torch.set_num_threads(args.threads)
        print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, numpy {np.__version__}, "
              f"torch threads {torch.get_num_threads()}, n_boot {args.n_boot}, median of {args.reps} warm calls")
        cases = [("all cells", 100_000), ("all cells", 10_000), ("uniform", 10_000), ("skewed", 10_000),
                 ("uniform", 359)]
        print(f"{'confidences':>12} {'rows':>8} {'cells used':>10} {'draws':>8} {'rest':>8} {'total':>8} "
              f"{'total CPU':>10} {'point estimates':>16} {'total / target':>15}")
        for shape, n in cases:
            state = state_of(n, shape)
            bins, fine = state.bins, state.fine
            state.metrics(ci=0.95, n_boot=args.n_boot)  # warm-up
            cells = joint_cells(bins, fine)[0]
            draws, _ = timed(lambda rep, cells=cells: _resample(cells, args.n_boot, rep), args.reps)
            total, total_cpu = timed(lambda rep, state=state: state.metrics(ci=0.95, n_boot=args.n_boot, seed=rep),
                                     args.reps)
            point, _ = timed(lambda rep, bins=bins, fine=fine: top_label_metrics(bins, fine), args.reps)
            used = int((fine[:, 0] > 0).sum())
            print(f"{shape:>12} {n:>8} {used:>10} {draws:>7.3f}s {total - draws:>7.3f}s {total:>7.3f}s "
                  f"{total_cpu:>9.3f}s {point * 1000:>14.1f}ms {total / TARGET_S:>15.2f}")


if __name__ == "__main__":
    main()
