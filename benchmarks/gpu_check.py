"""Everything about the loss and the callback that needs a GPU, in one run that prints one summary. Start it through
`benchmarks/gpu_check.sh`, which installs the carried wheels first; it takes about 5 minutes on an H200.

    python benchmarks/gpu_check.py [--cpu-dry-run] [--quick] [--peak-tbps 4.8]

Steps, each reported OK or FAIL in the summary (the exit status is 1 if any failed):
1. environment: versions, the device, the peak memory bandwidth the shares below are taken of;
2. imports: every third-party package the check imports comes from the carried wheels or the GPU image;
3. tests: tests/loss/test_cuda.py (the Triton kernels against the CPU paths; no host synchronization after the
   loss's one argument check, with `torch.cuda.set_sync_debug_mode('error')`) and the callback's CUDA test (the same
   mode around its per-batch work);
4. triton interpreter (dry run only): the public loss routed through the Triton kernels on CPU tensors;
5. benchmark: the fused loss against `F.cross_entropy(label_smoothing=0.1)`, forward+backward and no-grad, from
   64 x 37 to Liger-style 16384 x 131072, bf16 and fp32: time, peak memory, and achieved bandwidth, the least
   traffic such a loss needs (read the logits; for training also write the gradient) per second, as a share of
   the peak;
6. fit: a short fastai fit with `CalibrationCallback` and `LabelSmoothingCrossEntropy` on the device, then
   `get_preds(with_loss=True)`.

`--cpu-dry-run` runs all of it on the CPU (Triton in its interpreter, TRITON_INTERPRET=1, set by the .sh): the CUDA
tests skip, the benchmark and the fit run on tiny CPU shapes to check the plumbing (their numbers mean nothing).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Distributions that the GPU image provides (its package list, read 2026-11) and that this check imports; any other
# third-party import must come from the wheels in .whl/ (benchmarks/gpu_wheels.sh).
ON_THE_GPU_IMAGE = {
    "accelerate", "anyio", "certifi", "charset-normalizer", "cloudpickle", "contourpy", "cuda-bindings",
    "cuda-pathfinder", "cycler", "filelock", "fonttools", "fsspec", "h11", "huggingface-hub", "hypothesis", "idna",
    "iniconfig", "jinja2", "joblib", "kiwisolver", "markdown-it-py", "markupsafe", "matplotlib", "mdurl", "mpmath",
    "narwhals", "networkx", "numpy", "opt-einsum", "packaging", "pandas", "pillow", "pluggy", "protobuf", "psutil",
    "pygments", "pyparsing", "pytest", "python-dateutil", "pyyaml", "requests", "rich", "safetensors",
    "scikit-learn", "scipy", "setuptools", "six", "sortedcontainers", "sympy", "threadpoolctl", "timm", "torch",
    "torchvision", "tqdm", "triton", "typing-extensions", "urllib3",
}
# Peak memory bandwidth by device name (TB/s): the H200's HBM3e, the H100 SXM's HBM3.
PEAK_TBPS = {"H200": 4.8, "H100": 3.35}
BENCH_SHAPES = [(64, 37), (4096, 1000), (2048, 32000), (4096, 65536), (8192, 131072), (16384, 131072)]
QUICK_SHAPES = [(64, 37), (4096, 32000)]
DRY_RUN_SHAPES = [(64, 37), (256, 1000)]
EPS = 0.1


class Summary:
    """One line per step, printed at the end; the run fails if any step did."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, bool, str]] = []

    def run(self, name: str, step: Callable[[], str]) -> None:
        print(f"\n===== {name} " + "=" * (100 - len(name)), flush=True)
        start = time.perf_counter()
        try:
            ok, text = True, step()
        except Exception as err:  # a failed step is reported, and the next ones still run
            traceback.print_exc()
            ok, text = False, f"{type(err).__name__}: {err}"
        self.lines.append((name, ok, f"{text} [{time.perf_counter() - start:.0f} s]"))

    def print(self) -> bool:
        print("\n===== gpu_check summary " + "=" * 77)
        for name, ok, text in self.lines:
            print(f"{name:<20}{'OK' if ok else 'FAIL':<6}{text}")
        return all(ok for _, ok, _ in self.lines)


def environment(device: torch.device, peak_tbps: float) -> str:
    import fastai

    import fastai_ls
    from fastai_ls.loss.backends import c_kernel
    from fastai_ls.loss.backends import triton as triton_backend

    parts = [f"python {sys.version.split()[0]}", f"torch {torch.__version__}", f"fastai {fastai.__version__}",
             f"fastai_ls {fastai_ls.__version__}", f"C kernel {'built' if c_kernel.AVAILABLE else 'absent'}"]
    if triton_backend.AVAILABLE:
        import triton

        parts.append(f"triton {triton.__version__}" + (" (interpreter)" if os.environ.get("TRITON_INTERPRET") else ""))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        parts.append(f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)")
    parts.append(f"peak {peak_tbps} TB/s")
    print("\n".join(parts))
    return ", ".join(parts)


def imports(wheels: str | None, dry_run: bool) -> str:
    """Which distribution every imported third-party module comes from. The dry run fails on one that the GPU
    machine lacks (there, a missing package would fail the import itself)."""
    import fastai.vision.all  # noqa: F401  (what a user's script imports)
    import hypothesis  # noqa: F401
    import pytest  # noqa: F401

    import fastai_ls.cli.main  # noqa: F401
    import fastai_ls.integration.callback  # noqa: F401
    import fastai_ls.integration.distributed  # noqa: F401
    import fastai_ls.pets  # noqa: F401

    by_module = importlib.metadata.packages_distributions()
    carried, missing = set(), set()
    for name, module in list(sys.modules.items()):
        for dist in by_module.get(name.split(".")[0], []):
            path = getattr(module, "__file__", None) or ""
            if wheels and path.startswith(wheels):
                carried.add(dist)
            elif _normal(dist) not in ON_THE_GPU_IMAGE and dist != "fastai_ls":
                missing.add(dist)
    print(f"from the carried wheels: {sorted(carried)}")
    if missing and dry_run:
        raise RuntimeError(f"imported but neither carried nor on the GPU image: {sorted(missing)}; add them to "
                           f"benchmarks/gpu_wheels.sh")
    if missing:
        print(f"from this machine, not on the GPU image's list: {sorted(missing)}")
    if wheels and "fastai" not in carried:
        raise RuntimeError("fastai was not imported from the carried wheels")
    return f"{len(carried)} packages from the wheels, the rest from the GPU image"


def tests(dry_run: bool) -> str:
    selected = ["tests/loss/test_cuda.py",
                "tests/integration/test_callback.py::test_the_per_batch_update_never_synchronises_with_the_gpu"]
    if dry_run:  # the Triton kernels in the interpreter, as CI runs them
        selected.append("tests/loss/test_fused.py::test_triton_kernels_equal_the_cpu_paths_in_the_interpreter")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                             *selected], cwd=ROOT, capture_output=True, text=True, timeout=420)
    print(result.stdout[-6000:], result.stderr[-3000:])
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "no output"
    if result.returncode != 0:
        raise RuntimeError(f"pytest failed: {last}")
    return last.strip("= ")


def triton_interpreter() -> str:
    """The public loss routed through the Triton kernels on CPU tensors (interpreter), against the C kernel."""
    from fastai_ls.loss.backends import triton as triton_backend

    if not (triton_backend.AVAILABLE and os.environ.get("TRITON_INTERPRET")):
        raise RuntimeError("needs triton with TRITON_INTERPRET=1")
    sys.path.insert(0, str(ROOT / "tests" / "loss"))
    from test_cuda import hostile_case

    # tests/loss/test_cuda.py's first test, with Triton in the interpreter instead of on a GPU: 5000 classes are two
    # column blocks (MAX_BLOCK 4096), the second ragged.
    n_checks = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for weighted in (False, True):
            x, y, w = hostile_case(40, 5000, weighted)
            x = x.to(dtype).float()  # the same values for both
            for eps in (0.0, 0.1):
                for reduction in ("mean", "sum", "none"):
                    for with_grad in (True, False):
                        loss, grad = _loss_on(x, y, w, dtype, eps, reduction, with_grad, triton=True)
                        expected, expected_grad = _loss_on(x, y, w, torch.float32, eps, reduction, with_grad,
                                                           triton=False)
                        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5, equal_nan=True)
                        if with_grad:
                            tolerance = (dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32
                                         else dict(rtol=1e-2, atol=1e-4))
                            torch.testing.assert_close(grad.float(), expected_grad, equal_nan=True, **tolerance)
                        n_checks += 1
    empty = _loss_on(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), None, torch.float32, 0.1, "mean", True,
                     triton=True)
    assert empty[0].isnan() and empty[1].shape == (0, 5)
    return (f"{n_checks} cases of tests/loss/test_cuda.py's first test (fused and no-grad, eps 0 and 0.1, fp32, bf16 "
            f"and "
            f"fp16, hostile rows) and an empty batch: the Triton kernels equal the C kernel")


def _loss_on(x, y, w, dtype, eps, reduction, with_grad, triton: bool):
    from fastai_ls import label_smoothing_cross_entropy
    from fastai_ls.loss.backends import c_kernel
    from fastai_ls.loss.backends import triton as triton_backend

    saved = triton_backend.accepts, c_kernel.AVAILABLE
    if triton:  # CPU tensors through the Triton kernels: the interpreter runs them
        triton_backend.accepts, c_kernel.AVAILABLE = (lambda x: x.dtype != torch.float64), False
    try:
        x = x.detach().to(dtype).clone().requires_grad_(with_grad)
        with torch.set_grad_enabled(with_grad):
            loss = label_smoothing_cross_entropy(x, y, eps, w, reduction)
        grad = torch.autograd.grad(loss.sum(), x)[0] if with_grad else None
        return loss.detach(), grad
    finally:
        triton_backend.accepts, c_kernel.AVAILABLE = saved


def benchmark(device: torch.device, shapes: list[tuple[int, int]], peak_tbps: float, reps: int) -> str:
    """Times, peak memory and achieved bandwidth of the fused loss and PyTorch's, per shape and dtype."""
    from fastai_ls import label_smoothing_cross_entropy

    methods = {"fastai_ls": lambda x, y: label_smoothing_cross_entropy(x, y, EPS),
               "torch": lambda x, y: F.cross_entropy(x, y, label_smoothing=EPS)}
    print(f"median of {reps} interleaved calls; bandwidth = least traffic (no grad: read the logits; training: "
          f"also write the gradient) / time, as a share of {peak_tbps} TB/s; memory = peak beyond the logits in "
          f"N x C buffers of the logits' dtype\n")
    header = (f"{'shape':<20}{'mode':<10}{'fastai_ls ms':>13}{'torch ms':>11}{'ratio':>7}{'ours BW':>9}"
              f"{'torch BW':>10}{'ours mem':>10}{'torch mem':>11}")
    print(header)
    print("-" * len(header))
    results = []
    for n_rows, n_classes in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            label = f"{n_rows}x{n_classes} {str(dtype).removeprefix('torch.')}"
            try:
                rows = _bench_shape(methods, device, n_rows, n_classes, dtype, peak_tbps, reps)
            except torch.cuda.OutOfMemoryError:
                print(f"{label:<20}out of memory", flush=True)
                continue
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            for mode, r in rows.items():
                print(f"{label:<20}{mode:<10}{1e3 * r['ours']:>13.3f}{1e3 * r['torch']:>11.3f}{r['ratio']:>7.2f}"
                      f"{r['ours BW']:>9.0%}{r['torch BW']:>10.0%}{r['ours mem']:>10.2f}{r['torch mem']:>11.2f}",
                      flush=True)
                label = ""
            results.append((n_rows, n_classes, dtype, rows))
    if not results:
        raise RuntimeError("no shape ran")
    loop = _loop_table(methods, device, [shape for shape in shapes if shape[0] * shape[1] <= 2**23], reps)
    n_rows, n_classes, _, _ = results[-1]
    largest = []
    for shape_rows, shape_classes, dtype, rows in results:
        if (shape_rows, shape_classes) == (n_rows, n_classes):
            largest.append(f"{str(dtype).removeprefix('torch.')} " + ", ".join(
                f"{mode} {r['ratio']:.2f}x torch's time ({r['ours BW']:.0%} of peak, torch {r['torch BW']:.0%})"
                for mode, r in rows.items()))
    return f"{n_rows}x{n_classes}: " + "; ".join(largest) + f"; back-to-back loop {loop}"


def _loop_table(methods, device, shapes, reps) -> str:
    """The regime of a training or validation loop: calls queued back to back, timed on the host over many calls
    (the loss's one host read per call keeps the CPU from running ahead of the GPU; PyTorch's loss has none)."""
    n_calls = 50 if device.type == "cuda" else 3
    print(f"\nback-to-back loop: host time per call over {n_calls} calls, median of {max(3, reps // 2)} rounds")
    print(f"{'shape':<20}{'mode':<10}{'fastai_ls ms':>13}{'torch ms':>11}{'ratio':>7}")
    worst = []
    for n_rows, n_classes in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n_rows, n_classes, generator=gen, device=device)
        y = torch.randint(0, n_classes, (n_rows,), generator=gen, device=device)
        label = f"{n_rows}x{n_classes} float32"
        for mode in ("training", "no grad"):
            x.requires_grad_(mode == "training")
            times: dict[str, list[float]] = {name: [] for name in methods}
            for rep in range(max(3, reps // 2) + 1):
                for name in (methods if rep % 2 else reversed(list(methods))):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    for _ in range(n_calls):
                        with torch.set_grad_enabled(mode == "training"):
                            loss = methods[name](x, y)
                        if mode == "training":
                            loss.backward()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if rep:  # the first round warms up
                        times[name].append((time.perf_counter() - start) / n_calls)
            ours, theirs = statistics.median(times["fastai_ls"]), statistics.median(times["torch"])
            print(f"{label:<20}{mode:<10}{1e3 * ours:>13.3f}{1e3 * theirs:>11.3f}{ours / theirs:>7.2f}", flush=True)
            worst.append((ours / theirs, f"{n_rows}x{n_classes} {mode}"))
            label = ""
        x.grad = None
    ratio, where = max(worst)
    return f"at worst {ratio:.2f}x torch's time ({where})"


def _bench_shape(methods, device, n_rows, n_classes, dtype, peak_tbps, reps) -> dict[str, dict[str, float]]:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n_rows, n_classes, generator=gen, device=device, dtype=torch.float32).to(dtype)
    y = torch.randint(0, n_classes, (n_rows,), generator=gen, device=device)
    nc_bytes = x.numel() * x.element_size()
    rows = {}
    for mode in ("training", "no grad"):
        x.requires_grad_(mode == "training")
        times: dict[str, list[float]] = {name: [] for name in methods}
        memory: dict[str, float] = {}
        for rep in range(reps + 2):  # two warm-up rounds: Triton compiles, the caching allocator fills
            for name in (methods if rep % 2 else reversed(list(methods))):
                x.grad = None
                elapsed, peak = _timed(methods[name], x, y, mode == "training", device)
                if rep >= 2:
                    times[name].append(elapsed)
                memory[name] = peak / nc_bytes
        ours, theirs = statistics.median(times["fastai_ls"]), statistics.median(times["torch"])
        least_bytes = nc_bytes * (2 if mode == "training" else 1)
        rows[mode] = {"ours": ours, "torch": theirs, "ratio": ours / theirs,
                      "ours BW": least_bytes / ours / (peak_tbps * 1e12),
                      "torch BW": least_bytes / theirs / (peak_tbps * 1e12),
                      "ours mem": memory["fastai_ls"], "torch mem": memory["torch"]}
    x.grad = None
    return rows


def _timed(func, x, y, training: bool, device: torch.device) -> tuple[float, int]:
    """Seconds of one call (CUDA events on a GPU) and the peak memory it allocated beyond what existed before."""
    if device.type != "cuda":
        start = time.perf_counter()
        with torch.set_grad_enabled(training):
            loss = func(x, y)
        if training:
            loss.backward()
        return time.perf_counter() - start, 0
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    with torch.set_grad_enabled(training):
        loss = func(x, y)
    if training:
        loss.backward()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / 1e3, torch.cuda.max_memory_allocated() - before


def fit(device: torch.device, dry_run: bool) -> str:
    """A short fastai fit with the callback and the loss on `device`, then get_preds with losses."""
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from torch import nn

    from fastai_ls import CalibrationCallback, LabelSmoothingCrossEntropy

    n_classes, n_features = 100, 64
    gen = torch.Generator().manual_seed(0)
    projection = torch.randn(n_features, n_classes, generator=gen)

    def items(n: int):  # labels a noisy linear function of the features: something to learn
        x = torch.randn(n, n_features, generator=gen)
        y = (x @ projection + 3 * torch.randn(n, n_classes, generator=gen)).argmax(1)
        return list(zip(x, y))

    n_train, n_valid = (256, 128) if dry_run else (8192, 2048)
    dls = DataLoaders.from_dsets(items(n_train), items(n_valid), bs=256, num_workers=0, device=device)
    model = nn.Sequential(nn.Linear(n_features, 256), nn.ReLU(), nn.Linear(256, n_classes))
    cb = CalibrationCallback(metrics=("ece", "nll"))
    learn = Learner(dls, model, loss_func=LabelSmoothingCrossEntropy(0.1), cbs=cb)
    start = time.perf_counter()
    with learn.no_bar(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learn.fit(2, 1e-2)
        preds, targets, losses = learn.get_preds(with_loss=True)
    seconds = time.perf_counter() - start
    print(cb.history.to_string())
    if losses.shape != (n_valid,) or not losses.isfinite().all():
        raise RuntimeError(f"get_preds(with_loss=True) gave losses of shape {tuple(losses.shape)}")
    expected = F.cross_entropy(preds.log(), targets, label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(losses, expected, rtol=1e-4, atol=1e-4)
    last = cb.history.iloc[-1]
    return (f"2 epochs + get_preds in {seconds:.1f} s; last epoch ece {last['ece']:.4f}, nll {last['nll']:.4f}, "
            f"accuracy {last['accuracy']:.3f}; get_preds losses equal F.cross_entropy")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="no GPU: run what can, Triton in its interpreter")
    parser.add_argument("--quick", action="store_true", help="two benchmark shapes")
    parser.add_argument("--peak-tbps", type=float, help="the device's peak memory bandwidth (default: by name)")
    parser.add_argument("--reps", type=int, default=10, help="timed calls per method and shape")
    args = parser.parse_args(argv)
    if args.cpu_dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("gpu_check: no CUDA device (use --cpu-dry-run to check what runs without one)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "H200 (dry run)"
    peak = args.peak_tbps or next((tbps for key, tbps in PEAK_TBPS.items() if key in name), None)
    if peak is None:
        print(f"gpu_check: unknown peak bandwidth for {name}; pass --peak-tbps", file=sys.stderr)
        return 2
    shapes = DRY_RUN_SHAPES if args.cpu_dry_run else QUICK_SHAPES if args.quick else BENCH_SHAPES
    summary = Summary()
    summary.run("environment", lambda: environment(device, peak))
    summary.run("imports", lambda: imports(os.environ.get("GPU_CHECK_WHEELS"), args.cpu_dry_run))
    summary.run("tests", lambda: tests(args.cpu_dry_run))
    if args.cpu_dry_run:
        summary.run("triton interpreter", triton_interpreter)
    summary.run("benchmark", lambda: benchmark(device, shapes, peak, 3 if args.cpu_dry_run else args.reps))
    summary.run("fit", lambda: fit(device, args.cpu_dry_run))
    ok = summary.print()
    if args.cpu_dry_run:
        print("\n(CPU dry run: CUDA tests skipped, benchmark and fit numbers are CPU plumbing checks, not results)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
