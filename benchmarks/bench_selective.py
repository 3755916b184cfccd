"""Time of selective classification: every confidence score and its exact AURC/AUGRC with 1,000-replicate bootstrap
intervals on 50,000 x 1,000 logits, and the whole `compare_confidence_scores` (24 candidate scores, the cross-fitted
choice with its fallback bootstrap, the table); then, given netcal's CIFAR-10 records, the checks on real outputs.

    python benchmarks/bench_selective.py [--rows 50000] [--classes 1000] [--n-boot 1000] [--threads 2]
    python benchmarks/bench_selective.py --records FOLDER   # also the CIFAR-10 checks, FOLDER holding the .npz records

The target is under 30 s on 2 CPU cores for the scores, the metrics and their intervals. Regime: one cold call of
each stage (wall clock; the first touches the allocator), torch with `--threads` intra-op threads (the bootstrap and
the choice run on one, as the functions do themselves).

The records (`wideresnet-16-4-cifar-10.npz`, `lenet-5-cifar-10.npz`: `predictions` (N, C) softmax outputs and
`ground_truth`) are those of the netcal calibration framework's examples (EFS-OpenSource/calibration-framework,
examples/classification/records/cifar10/). For each: logits = log(predictions); the exact AURC/AUGRC of every score
against a plain loop over k; the held-out choice against MSP with its paired interval (it must never be worse beyond
it); and how far `CalibrationState`'s streamed AURC/AUGRC of MSP is from the exact value, with the stated bound.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch
from report import add_report_argument, report_to  # benchmarks/report.py, beside this script

from fastai_ls import CalibrationState, augrc, aurc, compare_confidence_scores, confidence_scores
from fastai_ls.calibration.selective import streamed_error_bound
from fastai_ls.calibration.selective_bootstrap import selective_table

TARGET_S = 30.0


def synthetic_logits(n: int, c: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 logits of a classifier right on about 3 rows in 4, more often where its target logit stands out."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, c, (n,), generator=g)
    z = torch.randn(n, c, generator=g)
    z[torch.arange(n), targets] += 3 * torch.rand(n, generator=g) + 2.5
    return z, targets


def plain_metrics(scores: np.ndarray, wrong: np.ndarray) -> tuple[float, float]:
    """AURC and AUGRC by a loop over k: E(k) = errors of the rows scored above the k-th score, plus the tied rows
    still needed times their error rate."""
    order = np.argsort(-scores, kind="stable")
    s, w = scores[order].tolist(), wrong[order].tolist()
    n = len(s)
    level_count, level_errors = {}, {}
    for value, e in zip(s, w):
        level_count[value] = level_count.get(value, 0) + 1
        level_errors[value] = level_errors.get(value, 0) + e
    above_count = above_errors = 0
    total_risk = total_errors = 0.0
    k = 0
    previous = None
    for value in s:
        if value != previous:
            if previous is not None:
                above_count += level_count[previous]
                above_errors += level_errors[previous]
            previous = value
        k += 1
        expected = above_errors + (k - above_count) * level_errors[value] / level_count[value]
        total_risk += expected / k
        total_errors += expected
    return total_risk / n, total_errors / n / n


def timed(label: str, call):
    start = time.perf_counter()
    out = call()
    seconds = time.perf_counter() - start
    print(f"{label:<62}{seconds:8.2f} s")
    return out, seconds


def speed(rows: int, classes: int, n_boot: int) -> None:
    z, y = synthetic_logits(rows, classes)
    print(f"\n{rows} x {classes} float32 logits, accuracy {float((z.argmax(1) == y).float().mean()):.3f}, "
          f"{n_boot} bootstrap replicates")
    scores, t_scores = timed("confidence_scores: all 8 scores (p = 2)", lambda: confidence_scores(z))
    correct = z.argmax(1) == y
    _, t_exact = timed("exact aurc + augrc of the 8 scores", lambda: [(aurc(s, correct), augrc(s, correct))
                                                                     for s in scores.values()])
    _, t_table = timed(f"intervals and paired differences of the 8 ({n_boot} replicates)",
                       lambda: selective_table(scores, correct, n_boot=n_boot))
    total = t_scores + t_exact + t_table
    print(f"{'scores, metrics and intervals':<62}{total:8.2f} s   target < {TARGET_S:.0f} s: "
          f"{'met' if total < TARGET_S else 'MISSED'}")
    table, t_compare = timed("compare_confidence_scores (24 candidates, 5 folds, table)",
                             lambda: compare_confidence_scores(z, y, n_boot=n_boot))
    print(f"  its choice: {table.loc['selected', 'choice']}")


def records(folder: Path, n_boot: int) -> None:
    paths = sorted(folder.glob("*cifar-10*.npz")) or sorted(folder.glob("*.npz"))
    if not paths:
        raise SystemExit(f"no .npz records in {folder}")
    for path in paths:
        data = np.load(path)
        probs, targets = data["predictions"], data["ground_truth"]
        with np.errstate(divide="ignore"):
            z = torch.from_numpy(np.log(probs))
        y = torch.from_numpy(targets.astype(np.int64))
        correct = z.argmax(1) == y
        wrong = (~correct).numpy().astype(float)
        print(f"\n{path.name}: {len(y)} rows, accuracy {float(correct.double().mean()):.4f}")
        worst = 0.0
        for s in confidence_scores(z).values():
            want = plain_metrics(s.numpy(), wrong)
            worst = max(worst, abs(aurc(s, correct) - want[0]), abs(augrc(s, correct) - want[1]))
        print(f"  exact AURC/AUGRC of the 8 scores against the plain loop: largest difference {worst:.1e}")
        start = time.perf_counter()
        table = compare_confidence_scores(z, y, n_boot=n_boot)
        print(f"  compare_confidence_scores: {time.perf_counter() - start:.2f} s")
        row = table.loc["selected"]
        verdict = "worse than MSP beyond its interval" if row["aurc_vs_msp_lo"] > 0 else "not worse than MSP"
        print(f"  selected: {row['choice']}; AURC {row['aurc']:.5f} vs MSP {table.loc['msp', 'aurc']:.5f}, "
              f"difference {row['aurc_vs_msp']:+.5f} [{row['aurc_vs_msp_lo']:+.5f}, {row['aurc_vs_msp_hi']:+.5f}]"
              f" (paired, same folds): {verdict}")
        for name in ("pnorm", "pnorm_softmax"):
            r = table.loc[name]
            print(f"  {name} ({r['choice']}): AURC {r['aurc']:.5f}, vs MSP {r['aurc_vs_msp']:+.5f} "
                  f"[{r['aurc_vs_msp_lo']:+.5f}, {r['aurc_vs_msp_hi']:+.5f}]")
        state = CalibrationState(probs.shape[1])
        state.update(torch.from_numpy(probs).double(), y)
        streamed, bound = state.metrics(), streamed_error_bound(state.fine)
        msp = torch.from_numpy(probs).double().max(1).values
        for name, exact in (("aurc", aurc(msp, correct)), ("augrc", augrc(msp, correct))):
            print(f"  streamed {name.upper()} of MSP (1000 fine cells) {streamed[name]:.5f}, exact {exact:.5f}: "
                  f"difference {abs(streamed[name] - exact):.1e}, stated bound {bound[name]:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--records", type=Path, default=None, help="folder of netcal's CIFAR-10 .npz records")
    add_report_argument(parser)
    args = parser.parse_args()
    with report_to(args.report, "Selective classification's speed (`benchmarks/bench_selective.py`)"):
        torch.set_num_threads(args.threads)
        print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads")
        speed(args.rows, args.classes, args.n_boot)
        if args.records is not None:
            records(args.records, args.n_boot)


if __name__ == "__main__":
    main()
