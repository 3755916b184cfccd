"""Calibrators at the class counts people calibrate: fit and apply seconds, held-out NLL and ECE of every method at
(N, C) = (10,000, 10), (10,000, 100), (50,000, 1,000), side by side with the previous solvers (re-implemented
here: temperature by 100 bisection steps, vector/matrix/Dirichlet by float64 LBFGS with 100 steps of history from
the identity, the ODIR strength by 3-fold cross-validation over 6 strengths) or a plain reference (scikit-learn's
IsotonicRegression per class for isotonic). Optionally the whole cross-fitted comparison (`compare_calibrators`,
5 folds), the figure the README's targets are about.

Data: realistic over-confident outputs of a many-class model: a favourite class per row, labels drawn from the
true probabilities (the favourite right about 80% of the time), logits twice too sharp with a per-class bias and
some noise (float32). Each method is fitted on
the first 80% of the rows and scored on the other 20%.

    python benchmarks/bench_calibrators.py                                  # all sizes, all methods
    python benchmarks/bench_calibrators.py --sizes 10000x100 --methods temperature,vector --previous
    python benchmarks/bench_calibrators.py --sizes 10000x100 --compare      # 5 folds with intervals
    python benchmarks/bench_calibrators.py --sizes 50000x1000 --compare-only --ci none

The previous solvers take minutes per fit at 100 classes (matrix, Dirichlet: 6 strengths x 3 folds x 500 LBFGS
iterations) and hours at 1,000: `--previous` runs them up to `--previous-max-classes` (default 10; isotonic's
scikit-learn reference and the others up to 100).
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from report import add_report_argument, report_to  # benchmarks/report.py, beside this script

from fastai_ls.calibration import calibration_metrics
from fastai_ls.calibration.calibrators import CALIBRATORS, CalibrationWarning, stratified_folds
from fastai_ls.calibration.compare import compare_on_logits


def outputs(n: int, n_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, target): over-confident float32 logits (twice too sharp, a bias per class, noise)."""
    g = torch.Generator().manual_seed(seed)
    true_logits = torch.randn(n, n_classes, generator=g)
    # the favourite's logit this far above the others' makes it right about 80% of the time at any class count
    true_logits[torch.arange(n), torch.randint(0, n_classes, (n,), generator=g)] += math.log(n_classes) + 2
    target = torch.multinomial(true_logits.softmax(1), 1, generator=g).squeeze(1)
    logits = 2 * true_logits + 0.3 * torch.randn(n, n_classes, generator=g) + 0.5 * torch.randn(n_classes, generator=g)
    return logits, target


# --- the previous solvers, kept only here ---------------------------------------------------------------------------


def previous_lbfgs(params, objective, max_iter: int) -> None:
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  history_size=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)


def previous_temperature(z: torch.Tensor, y: torch.Tensor):
    z = z.double()
    z_target = z.gather(1, y[:, None]).squeeze(1)
    left, right = -math.log(100.0), -math.log(0.01)
    for _ in range(100):
        middle = (left + right) / 2
        p = (z * math.exp(middle)).softmax(1)
        left, right = (middle, right) if float(((p * z).sum(1) - z_target).mean()) < 0 else (left, middle)
        if right - left < 1e-12:
            break
    temperature = math.exp(-(left + right) / 2)
    return lambda x: (x.double() / temperature).softmax(1)


def previous_vector(z: torch.Tensor, y: torch.Tensor):
    z = z.double()
    weight = torch.ones(z.shape[1], dtype=z.dtype, requires_grad=True)
    bias = torch.zeros_like(weight, requires_grad=True)
    with torch.enable_grad():
        previous_lbfgs([weight, bias], lambda: F.cross_entropy(z * weight + bias, y), 200)
    w, b = weight.detach(), bias.detach()
    return lambda x: (x.double() * w + b).softmax(1)


def previous_odir(z: torch.Tensor, y: torch.Tensor, dirichlet: bool):
    def features(x):
        return x.double().log_softmax(1) if dirichlet else x.double()

    x = features(z)
    c = x.shape[1]
    off = 1 - torch.eye(c, dtype=x.dtype)

    def solve(x, y, reg, start=None):
        start = start or (torch.eye(c, dtype=x.dtype), torch.zeros(c, dtype=x.dtype))
        weight, bias = (t.clone().requires_grad_() for t in start)

        def objective():
            loss = F.cross_entropy(x @ weight.T + bias, y)
            return loss + reg * ((weight * off).square().sum() / (c * (c - 1)) + bias.square().sum() / c)

        with torch.enable_grad():
            previous_lbfgs([weight, bias], objective, 500)
        return weight.detach(), bias.detach()

    grid = (10.0, 1.0, 1e-1, 1e-2, 1e-3, 1e-4)
    fold_of = stratified_folds(y, 3, seed=0)
    held_out = dict.fromkeys(grid, 0.0)
    for k in range(3):
        train, held = fold_of != k, fold_of == k
        solution = None
        for reg in grid:
            solution = solve(x[train], y[train], reg, solution)
            held_out[reg] += float(F.cross_entropy(x[held] @ solution[0].T + solution[1], y[held], reduction="sum"))
    reg = min(grid, key=lambda r: (held_out[r], -r))
    weight, bias = solve(x, y, reg)
    return lambda new: (features(new) @ weight.T + bias).softmax(1)


def sklearn_isotonic(z: torch.Tensor, y: torch.Tensor):
    from sklearn.isotonic import IsotonicRegression

    q = z.double().softmax(1).numpy()
    curves = [IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(q[:, k], (y.numpy() == k))
              for k in range(q.shape[1])]

    def probs(x):
        qx = x.double().softmax(1).numpy()
        p = np.stack([curve.predict(qx[:, k]) for k, curve in enumerate(curves)], 1)
        total = p.sum(1, keepdims=True)
        return torch.from_numpy(np.where(total > 0, p / np.maximum(total, 1e-300), 1 / p.shape[1]))

    return probs


PREVIOUS = {"temperature": previous_temperature, "vector": previous_vector,
            "matrix": lambda z, y: previous_odir(z, y, dirichlet=False),
            "dirichlet": lambda z, y: previous_odir(z, y, dirichlet=True), "isotonic": sklearn_isotonic}
SLOW_PREVIOUS = {"matrix", "dirichlet"}  # minutes per fit at 100 classes, hours at 1,000


# --- measurement ------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def held_out_scores(probs: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    probs = probs.double().cpu()
    nll = float(-probs.gather(1, target.cpu()[:, None]).clamp_min(1e-300).log().mean())
    return nll, calibration_metrics(probs, target.cpu(), n_bins=15)["ece"]


def time_ours(method: str, z, y, z_test, y_test, device) -> dict:
    calibrator = CALIBRATORS[method]()
    reason = calibrator.skip_reason(*z.shape)
    if reason is not None:
        return {"skipped": reason}
    sync(device)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        calibrator.fit(z, y)
    sync(device)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    probs = calibrator(z_test)
    sync(device)
    apply_s = time.perf_counter() - start
    return {"fit_s": fit_s, "apply_s": apply_s, **dict(zip(("nll", "ece"), held_out_scores(probs, y_test)))}


def time_previous(method: str, z, y, z_test, y_test) -> dict:
    start = time.perf_counter()
    apply = PREVIOUS[method](z.cpu(), y.cpu())
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    probs = apply(z_test.cpu())
    apply_s = time.perf_counter() - start
    return {"fit_s": fit_s, "apply_s": apply_s, **dict(zip(("nll", "ece"), held_out_scores(probs, y_test)))}


def fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def bench_size(n: int, n_classes: int, methods: list[str], args, device: torch.device) -> None:
    logits, target = outputs(n, n_classes)
    logits, target = logits.to(device), target.to(device)
    cut = int(0.8 * n)
    z, y, z_test, y_test = logits[:cut], target[:cut], logits[cut:], target[cut:]
    nll, ece = held_out_scores(z_test.softmax(1), y_test)
    print(f"\n(N, C) = ({n:,}, {n_classes:,}) on {device}: fitted on {cut:,} rows, scored on {n - cut:,}; "
          f"uncalibrated NLL {nll:.4f}, ECE {ece:.4f}")
    header = (f"{'method':<20}{'fit s':>9}{'apply s':>9}{'NLL':>9}{'ECE':>9}   |{'prev fit s':>11}{'prev NLL':>10}"
              f"{'prev ECE':>10}{'speed-up':>10}")
    print(header)
    print("-" * len(header))
    for method in methods if not args.compare_only else []:
        ours = time_ours(method, z, y, z_test, y_test, device)
        if "skipped" in ours:
            print(f"{method:<20}skipped: {ours['skipped']}")
            continue
        previous = {}
        limit = args.previous_max_classes if method in SLOW_PREVIOUS else max(args.previous_max_classes, 100)
        if args.previous and method in PREVIOUS and n_classes <= limit:
            previous = time_previous(method, z, y, z_test, y_test)
        speed_up = previous["fit_s"] / ours["fit_s"] if previous else None
        print(f"{method:<20}{ours['fit_s']:>9.2f}{ours['apply_s']:>9.2f}{ours['nll']:>9.4f}{ours['ece']:>9.4f}   |"
              f"{fmt(previous.get('fit_s'), '11.2f'):>11}{fmt(previous.get('nll'), '10.4f'):>10}"
              f"{fmt(previous.get('ece'), '10.4f'):>10}{fmt(speed_up, '9.1f') + ('x' if speed_up else ''):>10}")
    if args.compare or args.compare_only:
        ci = None if args.ci == "none" else float(args.ci)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationWarning)
            table = compare_on_logits(logits, target, methods=methods, folds=args.folds, ci=ci, progress=False)
        total = time.perf_counter() - start
        print(f"\ncompare_calibrators on all {n:,} rows, {args.folds} folds, ci={ci}: {total:.1f} s in all")
        print(table[["nll", "ece", "n_unscored", "fit_s"]].to_string(float_format=lambda v: f"{v:.4f}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000x10,10000x100,50000x1000",
                        help="comma-separated NxC (default: %(default)s)")
    parser.add_argument("--methods", default=",".join(CALIBRATORS), help="comma-separated (default: all)")
    parser.add_argument("--previous", action="store_true", help="also time the previous solvers / references")
    parser.add_argument("--previous-max-classes", type=int, default=10,
                        help="the most classes the previous matrix/Dirichlet solvers run at (default: %(default)s)")
    parser.add_argument("--compare", action="store_true", help="also time compare_calibrators on all rows")
    parser.add_argument("--compare-only", action="store_true", help="time compare_calibrators only")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--ci", default="0.95", help="interval level of --compare, or 'none' (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_report_argument(parser)
    args = parser.parse_args()
    with report_to(args.report, "The calibrators' cost (`benchmarks/bench_calibrators.py`)"):
        methods = args.methods.split(",")
        unknown = [m for m in methods if m not in CALIBRATORS]
        if unknown:
            parser.error(f"unknown methods {unknown}; known: {', '.join(CALIBRATORS)}")
        device = torch.device(args.device)
        # The first optimizer of a process imports torch._dynamo (seconds): paid here, not by the first method timed.
        torch.optim.LBFGS([torch.zeros(1, requires_grad=True)])
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
        for size in args.sizes.split(","):
            n, n_classes = (int(part) for part in size.lower().split("x"))
            bench_size(n, n_classes, methods, args, device)


if __name__ == "__main__":
    main()
